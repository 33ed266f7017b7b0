package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/e2e/testctr"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/watcher"
)

// Each way a sandbox's monitor socket can be found, probed for real where
// that is cheap, maps to a level and a message that says what to do.
func TestMonitorResult(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	// The fake monitors are served by this process, in its own netns.
	here := func(path string) watcher.Sandbox {
		return watcher.Sandbox{ID: "sb1", QMP: path, Netns: "/proc/self/ns/net"}
	}
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
		{"answers", probeMonitor(context.Background(), here(answering)), false, "ok", "answers", ""},
		{"missing", probeMonitor(context.Background(), here(missing)), false, "FAIL", "no QMP monitor at " + missing, `extra_monitor_socket = "qmp"`},
		{"refused", probeMonitor(context.Background(), here(refused)), false, "FAIL", "refuses connections", "enable_debug = true"},
		{"served from another netns", probeMonitor(context.Background(), watcher.Sandbox{QMP: answering, Netns: testnet.NewNS(t, "tschk").Path}), false,
			"FAIL", "not in the sandbox's network namespace", "config.d/"},
		{"held by the daemon", busy, true, "ok", "running tapsync daemon", ""},
		{"held by another", busy, false, "warn", "another client", "no other tool"},
	} {
		r := monitorResult(watcher.Sandbox{ID: "sb1", QMP: "/p", Flavour: watcher.FlavourGo}, c.probe, c.daemonUp)
		if r.level != c.level || !strings.Contains(r.what, strings.ReplaceAll(c.what, missing, "/p")) || !strings.Contains(r.todo, c.todo) || (c.todo == "" && r.todo != "") {
			t.Errorf("%s (probe %v): %+v, want level %s, %q in what, %q in todo", c.name, c.probe, r, c.level, c.what, c.todo)
		}
		if !strings.Contains(r.what, "sandbox sb1") {
			t.Errorf("%s: %q does not name the sandbox", c.name, r.what)
		}
	}
}

// `tapsync check` against a real (private) containerd: its running
// sandboxes are listed through the watcher's code, and each one's monitor
// is tried as the daemon would: one served by a real QEMU in the pod's
// netns, one not served (it gets Kata's settings), one served by a
// process outside the pod's netns (refused); a confidential handler's is
// left alone.
func TestCheckContainerdSandboxes(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	if testing.Short() {
		t.Skip("starts a private containerd")
	}
	ctr := testctr.Start(t)
	base := shortDir(t)
	const ns = "tapsync-check"
	netns := map[string]string{}
	for _, id := range []string{"served", "unserved", "impostor"} {
		netns[id] = testnet.NewNS(t, "tschk").Path
		testctr.RunSandbox(t, ctr, ns, id, netns[id], testctr.RuntimeRunc, nil)
	}
	testctr.RunSandbox(t, ctr, ns, "confidential", testnet.NewNS(t, "tschk").Path, testctr.RuntimeRunc, nil)
	testctr.RunSandbox(t, ctr, ns, "other-runtime", testnet.NewNS(t, "tschk").Path, testctr.RuntimeOther, nil)
	vm := testvm.StartNoGuest(t, testvm.Options{NetNS: netns["served"]})
	if err := os.Symlink(vm.QMP, filepath.Join(base, "served.sock")); err != nil {
		t.Fatal(err)
	}
	startOddQEMUAt(t, filepath.Join(base, "impostor.sock"))

	cfg := quietConfig(t)
	cfg.NetnsDir = "/var/run/netns"
	cfg.Containerd.Enabled = true
	cfg.Containerd.Address = ctr.Address()
	cfg.Containerd.Namespaces = []string{ns}
	cfg.Containerd.Runtimes = []string{testctr.RuntimeRunc}
	cfg.Containerd.SkipRuntimes = []string{"io.containerd.runc.v2-never"}
	cfg.Containerd.QMPSocket = filepath.Join(base, "{id}.sock")
	cfg.Containerd.WrapperSocket = filepath.Join(base, "w", "{id}.sock")
	cfg.Containerd.AgentURL = ""
	results := checkContainerdSandboxes(context.Background(), cfg)
	var lines []string
	for _, r := range results {
		lines = append(lines, r.level+" "+r.what+" → "+r.todo)
	}
	all := strings.Join(lines, "\n")
	t.Logf("check:\n%s", all)
	for _, want := range []string{
		"info sandbox served: kata-go (io.containerd.runc.v2)",
		"ok sandbox served: QMP monitor " + filepath.Join(base, "served.sock") + " answers",
		"info sandbox served: no tapsync-qemu monitor at " + filepath.Join(base, "w", "served.sock"),
		"FAIL sandbox unserved: no QMP monitor at " + filepath.Join(base, "w", "unserved.sock"),
		"run tapsync install-kata",
		`enable_debug = true and extra_monitor_socket = "qmp"`,
		"config.d/",
		"FAIL sandbox impostor: QMP monitor " + filepath.Join(base, "impostor.sock"),
		"not in the sandbox's network namespace",
		"warn sandbox served: guest side off",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("check output lacks %q:\n%s", want, all)
		}
	}
	if strings.Contains(all, "other-runtime") {
		t.Errorf("check output names a sandbox of an unwatched runtime:\n%s", all)
	}

	// The same node with the runtime taken for a confidential handler.
	cfg.Containerd.SkipRuntimes = []string{"io.containerd.runc.*"}
	results = checkContainerdSandboxes(context.Background(), cfg)
	lines = lines[:0]
	for _, r := range results {
		lines = append(lines, r.level+" "+r.what)
	}
	all = strings.Join(lines, "\n")
	if n := strings.Count(all, "left alone"); n != 4 || strings.Contains(all, "monitor") {
		t.Errorf("with the runtime skipped: %d sandboxes left alone, want 4, and no monitor probed:\n%s", n, all)
	}
}
