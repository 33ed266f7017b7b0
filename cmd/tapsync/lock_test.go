package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The real binary, started twice on one state dir: the second exits
// non-zero naming the first one's pid; the first keeps its control socket
// and keeps answering on it.
func TestSecondDaemonProcessRefused(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the tapsync binary")
	}
	bin := filepath.Join(t.TempDir(), "tapsync")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cfg := quietConfig(t)
	conf := filepath.Join(t.TempDir(), "config.toml")
	body := fmt.Sprintf("netns_dir = %q\nstate_dir = %q\nmetrics_address = \"\"\n[containerd]\nenabled = false\n[discovery]\nproc = false\n",
		cfg.NetnsDir, cfg.StateDir)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	var firstLog syncBuffer
	first := exec.Command(bin, "run", "--config", conf)
	first.Stdout, first.Stderr = &firstLog, &firstLog
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- first.Wait() }()
	t.Cleanup(func() {
		first.Process.Signal(syscall.SIGTERM) // by pid: the process this test started
		select {
		case <-exited:
		case <-time.After(time.Minute):
			first.Process.Kill()
			t.Errorf("first daemon ignored SIGTERM; log:\n%s", firstLog.String())
		}
	})
	sock := controlSocketPath(cfg.StateDir)
	var before os.FileInfo
	eventually(t, "the first daemon's control socket", func() bool {
		var err error
		before, err = os.Stat(sock)
		return err == nil
	}, firstLog.String)

	var out bytes.Buffer
	second := exec.Command(bin, "run", "--config", conf)
	second.Stdout, second.Stderr = &out, &out
	err := second.Run()
	if code := second.ProcessState.ExitCode(); err == nil || code == 0 {
		t.Fatalf("second daemon exited with %d (%v), want non-zero; output:\n%s", code, err, out.String())
	}
	if want := fmt.Sprintf("pid %d", first.Process.Pid); !strings.Contains(out.String(), want) {
		t.Errorf("second daemon's message does not name %q:\n%s", want, out.String())
	}
	after, err := os.Stat(sock)
	if err != nil || !os.SameFile(before, after) {
		t.Errorf("the first daemon's control socket was replaced or removed: %v", err)
	}
	select {
	case err := <-exited:
		t.Fatalf("first daemon exited: %v; log:\n%s", err, firstLog.String())
	default:
	}
	if os.Geteuid() == 0 { // the control socket answers root only
		if out, err := exec.Command(bin, "status", "--state-dir", cfg.StateDir).CombinedOutput(); err != nil {
			t.Errorf("first daemon does not answer on its control socket: %v\n%s", err, out)
		}
	}
}
