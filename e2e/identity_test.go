//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testctr"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
)

// TestDaemonOneSandboxPerNetns runs the real binary with a real
// containerd: a VM that both the config file and containerd name (one
// netns, one QMP socket) is one sandbox. The config's wins, the
// containerd sandbox is never registered, and the single QMP client wires
// the VM's link: passes converge with no error (two clients would fight
// over the socket). (Spellings of one netns, /run/netns/x and
// /var/run/netns/x, are TestOneSandboxPerNetns in cmd/tapsync: a config
// netns must be spelled under netns_dir, and containerd's is rewritten
// to it.)
func TestDaemonOneSandboxPerNetns(t *testing.T) {
	p := newContainerdPod(t, "tsi", "tapsync-id")
	ctr, id, sb, host, stateDir := p.ctr, p.id, p.sb, p.host, p.stateDir
	vm := testvm.StartNoGuest(t, testvm.Options{NetNS: sb.Path, Dir: p.vmDir})
	testnet.Veth(t, sb, "eth0", testvm.TestMAC(1), host, "peth0")
	cfg := writeConfig(t, p.config(fmt.Sprintf(`[guest]
agent = "none"
[[sandbox]]
id = "vm1"
netns = %q
qmp = %q
`, sb.Path, vm.QMP)))
	d := startDaemon(t, "--config", cfg)
	d.waitLog("tapsync running", nil)
	before := time.Now()
	testctr.RunSandbox(t, ctr, "tapsync-e2e", id, sb.Path, testctr.RuntimeRunc, nil)
	// The daemon's first word about the containerd sandbox: registered
	// beside vm1 (the bug), or left to vm1.
	var decided map[string]any
	for deadline := time.Now().Add(time.Minute); decided == nil; time.Sleep(10 * time.Millisecond) {
		d.mu.Lock()
		for _, m := range d.log {
			if msg, _ := m["message"].(string); m["sandbox"] == id &&
				(msg == "sandbox registered" || strings.Contains(msg, "ranks at least as high")) {
				decided = m
			}
		}
		d.mu.Unlock()
		if decided == nil && time.Now().After(deadline) {
			t.Fatalf("the daemon never registered nor left containerd sandbox %s", id)
		}
	}
	if decided["registered_as"] != "vm1" {
		t.Errorf("containerd sandbox %s: %v; want it left to vm1", id, decided)
	}

	st := waitReconciled(t, stateDir, before)
	if st["id"] != "vm1" || st["source"] != "config" || st["last_error"] != nil {
		t.Errorf("status = %v, want vm1 from the config, converged", st)
	}
	if eps, _ := st["endpoints"].([]any); len(eps) != 1 {
		t.Errorf("endpoints = %v, want eth0 wired once", st["endpoints"])
	}
	if n := len(status(t, stateDir)); n != 1 {
		t.Errorf("%d sandboxes registered, want 1", n)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, m := range d.log {
		if m["message"] == "sandbox registered" && m["sandbox"] == id {
			t.Errorf("the containerd sandbox was registered beside the config's: %v", m)
		}
	}
}
