package main

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/e2e/testctr"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/qmp"
)

// Each way a sandbox's monitor socket can be found, probed for real where
// that is cheap, maps to a level and a message that says what to do.
func TestMonitorResult(t *testing.T) {
	dir := shortDir(t)
	missing := filepath.Join(dir, "missing.sock")

	refused := filepath.Join(dir, "refused.sock") // a socket file nobody listens on
	ln, err := net.Listen("unix", refused)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()

	answering := startOddQEMU(t).path
	busy := fmt.Errorf("qmp dial %s: %w", answering, qmp.ErrNoGreeting)
	for _, c := range []struct {
		name     string
		probe    error
		daemonUp bool
		level    string
		what     string
		todo     string
	}{
		{"answers", probeMonitor(context.Background(), answering), false, "ok", "answers", ""},
		{"missing", probeMonitor(context.Background(), missing), false, "FAIL", "no QMP socket at " + missing, `extra_monitor_socket = "qmp"`},
		{"refused", probeMonitor(context.Background(), refused), false, "FAIL", "refuses connections", "enable_debug = true"},
		{"held by the daemon", busy, true, "ok", "running tapsync daemon", ""},
		{"held by another", busy, false, "warn", "another client", "no other tool"},
	} {
		r := monitorResult("sb1", "/p", c.probe, c.daemonUp)
		if r.level != c.level || !strings.Contains(r.what, strings.ReplaceAll(c.what, missing, "/p")) || !strings.Contains(r.todo, c.todo) || (c.todo == "" && r.todo != "") {
			t.Errorf("%s (probe %v): %+v, want level %s, %q in what, %q in todo", c.name, c.probe, r, c.level, c.what, c.todo)
		}
		if !strings.Contains(r.what, "sandbox sb1") {
			t.Errorf("%s: %q does not name the sandbox", c.name, r.what)
		}
	}
}

// `tapsync check` against a real (private) containerd: its running
// sandboxes are listed through the watcher's code, and the qmp_socket
// template is tried for each: one VM serves its monitor, the other does
// not and gets Kata's settings.
func TestCheckContainerdSandboxes(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	if testing.Short() {
		t.Skip("starts a private containerd")
	}
	ctr := testctr.Start(t)
	base := shortDir(t)
	const ns = "tapsync-check"
	for _, id := range []string{"served", "unserved"} {
		netns := testnet.NewNS(t, "tschk")
		testctr.RunSandbox(t, ctr, ns, id, netns.Path, testctr.RuntimeRunc, nil)
	}
	testctr.RunSandbox(t, ctr, ns, "other-runtime", testnet.NewNS(t, "tschk").Path, testctr.RuntimeOther, nil)
	startOddQEMUAt(t, filepath.Join(base, "served.sock"))

	cfg := quietConfig(t)
	cfg.NetnsDir = "/var/run/netns"
	cfg.Containerd.Enabled = true
	cfg.Containerd.Address = ctr.Address()
	cfg.Containerd.Namespaces = []string{ns}
	cfg.Containerd.Runtimes = []string{testctr.RuntimeRunc}
	cfg.Containerd.QMPSocket = filepath.Join(base, "{id}.sock")
	results := checkContainerdSandboxes(context.Background(), cfg)
	var lines []string
	for _, r := range results {
		lines = append(lines, r.level+" "+r.what+" → "+r.todo)
	}
	all := strings.Join(lines, "\n")
	t.Logf("check:\n%s", all)
	if len(results) != 2 {
		t.Fatalf("%d results, want one per running sandbox of the watched runtime (2):\n%s", len(results), all)
	}
	for _, want := range []string{
		"ok sandbox served: QMP socket " + filepath.Join(base, "served.sock") + " answers",
		"FAIL sandbox unserved: no QMP socket at " + filepath.Join(base, "unserved.sock"),
		`enable_debug = true and extra_monitor_socket = "qmp"`,
	} {
		if !strings.Contains(all, want) {
			t.Errorf("check output lacks %q:\n%s", want, all)
		}
	}
}
