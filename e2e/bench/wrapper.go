package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/tapsync/tapsync/e2e/testvm"
)

// wrapperInstall is tapsync-qemu as install-kata leaves it: the binary
// with its conf beside it, naming the real QEMU and the socket dir.
type wrapperInstall struct {
	exe     string // what testvm executes as QEMU
	sockDir string // where the wrapper binds <id>.sock
}

// installWrapper copies bin into base/wrapper and writes its conf there
// (root's, 0644, as the wrapper trusts it), with base/qmp as its socket
// dir: base is root's and 0700, /tmp above it sticky, so the wrapper
// takes that dir. A copy, not a link: the wrapper finds its conf beside
// the resolved path of its own executable.
func installWrapper(bin, base string) (wrapperInstall, error) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return wrapperInstall{}, fmt.Errorf("find QEMU for the wrapper's conf: %w", err)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		return wrapperInstall{}, fmt.Errorf("read the wrapper: %w (make build makes bin/tapsync-qemu; or -skip-wrapper)", err)
	}
	dir := filepath.Join(base, "wrapper")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return wrapperInstall{}, err
	}
	w := wrapperInstall{exe: filepath.Join(dir, "tapsync-qemu"), sockDir: filepath.Join(base, "qmp")}
	if err := os.WriteFile(w.exe, b, 0o755); err != nil {
		return wrapperInstall{}, err
	}
	conf := fmt.Sprintf("# tapsync-bench\nqemu = %s\ndir = %s\n", qemu, w.sockDir)
	if err := os.WriteFile(w.exe+".conf", []byte(conf), 0o644); err != nil {
		return wrapperInstall{}, err
	}
	return w, nil
}

// vmOptions makes a VM start through the wrapper as Kata's would: named
// sandbox-<id>, so the wrapper adds its monitor at sockDir/<id>.sock, which
// it returns.
func (w wrapperInstall) vmOptions(opts *testvm.Options, id string) string {
	opts.Binary, opts.Name = w.exe, "sandbox-"+id
	return filepath.Join(w.sockDir, id+".sock")
}

// waitGreeting waits for a QMP greeting on the wrapper's socket sock of
// vm; if none comes, the error carries the line the wrapper wrote to
// QEMU's log to say why it added no monitor. It sends no command: the
// measured monitor's trace starts with the wirer's own.
func waitGreeting(ctx context.Context, vm *testvm.VM, sock string) error {
	err := eventually(ctx, 10*time.Second, 10*time.Millisecond, "QMP greeting on tapsync-qemu's socket "+sock, func() (bool, string, error) {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err != nil {
			return false, err.Error(), nil
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return false, err.Error(), nil
		}
		return strings.HasPrefix(line, `{"QMP":`), "not a QMP greeting: " + line, nil
	})
	if err != nil {
		log, _ := os.ReadFile(vm.Log)
		for _, l := range bytes.Split(log, []byte("\n")) {
			if bytes.HasPrefix(l, []byte("tapsync-qemu")) {
				return fmt.Errorf("%w; QEMU's log: %s", err, l)
			}
		}
	}
	return err
}
