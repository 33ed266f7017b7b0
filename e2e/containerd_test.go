//go:build e2e

package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testctr"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/state"
)

// TestDaemonFollowsContainerd runs the daemon against a real containerd
// (its own socket, root and state): a sandbox container started in a
// netns registers the sandbox through events and its link is wired into
// the guest; a containerd restart is survived with a resync; deleting the
// container unregisters the sandbox and removes what tapsync made.
func TestDaemonFollowsContainerd(t *testing.T) {
	p := newContainerdPod(t, "tsc", "tapsync-ctr")
	ctr, id, sb, host, stateDir := p.ctr, p.id, p.sb, p.host, p.stateDir
	vm := testvm.ForTest(t, testvm.Options{NetNS: sb.Path, Dir: p.vmDir, SelfConfig: true})
	eth0 := testvm.TestMAC(1)
	testnet.Veth(t, sb, "eth0", eth0, host, "peth0")
	testnet.IP(t, "-n", host.Name, "addr", "add", fmt.Sprintf("%s/%d", testvm.PeerIP(eth0), testvm.PrefixLen), "dev", "peth0")
	// The guest configures itself (SelfConfig): no agent for this host-side test.
	cfg := writeConfig(t, p.config(""))
	d := startDaemon(t, "--config", cfg)
	d.waitLog("tapsync running", nil)

	// A container of another runtime in the same netns is not a sandbox.
	testctr.RunSandbox(t, ctr, "tapsync-e2e", id+"-other", sb.Path, testctr.RuntimeOther, nil)
	off := vm.SerialOffset()
	c := testctr.RunSandbox(t, ctr, "tapsync-e2e", id, sb.Path, testctr.RuntimeRunc, nil)
	d.waitLog("sandbox registered", map[string]any{"sandbox": id, "source": "containerd"})
	if _, err := vm.WaitSerialFrom(t.Context(), off, testvm.NICUpRE(eth0)); err != nil {
		t.Fatal(err)
	}
	pingable(t, host, testvm.GuestIP(eth0))
	if st := status(t, stateDir); len(st) != 1 || st[0]["id"] != id {
		t.Fatalf("status = %v, want only sandbox %s", st, id)
	}

	// containerd dies and comes back: the daemon reconnects and resyncs.
	before, mark := time.Now(), d.mark()
	ctr.Restart()
	d.waitLogAfter(mark, "containerd unavailable", nil)
	d.waitLogAfter(mark, "containerd connected", nil)
	d.waitLogAfter(mark, "resyncing every sandbox", map[string]any{"source": "containerd"})
	if st := waitReconciled(t, stateDir, before); st["last_mutations"].(float64) != 0 || st["last_error"] != nil {
		t.Errorf("resync after containerd restart: %v", st)
	}
	pingable(t, host, testvm.GuestIP(eth0))

	// The pod goes away: the VM stops (as Kata's does), then its sandbox
	// container is deleted. tapsync forgets it and removes its taps and
	// filters from the netns, which the test keeps alive to look at.
	vm.Stop()
	if err := c.Delete(); err != nil {
		t.Fatal(err)
	}
	d.waitLog("sandbox gone", map[string]any{"sandbox": id})
	deadline := time.Now().Add(time.Minute)
	for len(status(t, stateDir)) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("sandbox still listed: %v", status(t, stateDir))
		}
		time.Sleep(20 * time.Millisecond)
	}
	ns := openNetns(t, sb.Path)
	st, err := ns.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Taps) != 0 || len(st.Redirects) != 0 {
		t.Errorf("left in the netns: taps %v, redirects %v", st.Taps, st.Redirects)
	}
	store, _ := state.Open(stateDir)
	if ids, _ := store.List(); len(ids) != 0 {
		t.Errorf("records left: %v", ids)
	}
}

// containerdPod is what the containerd tests share: a private containerd,
// a sandbox id, a pod netns and a host-side netns, the VM directory the
// [containerd] qmp_socket template points into, and a state dir.
type containerdPod struct {
	ctr         *testctr.Containerd
	id          string
	base, vmDir string
	sb, host    testnet.NS
	stateDir    string
}

func newContainerdPod(t *testing.T, dirPrefix, nsPrefix string) *containerdPod {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	p := &containerdPod{ctr: testctr.Start(t), stateDir: t.TempDir()}
	b := make([]byte, 3)
	rand.Read(b)
	p.id = "pod-" + hex.EncodeToString(b)
	var err error
	if p.base, err = os.MkdirTemp("", dirPrefix); err != nil { // short: unix socket paths are limited to 108 bytes
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(p.base) })
	p.sb, p.host = testnet.NewNS(t, nsPrefix), testnet.NewNS(t, nsPrefix+"host")
	p.vmDir = filepath.Join(p.base, p.id)
	if err := os.MkdirAll(p.vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}

// config is the daemon config following this containerd, plus extra TOML.
func (p *containerdPod) config(extra string) string {
	return fmt.Sprintf(`
netns_dir = "/var/run/netns"
state_dir = %q
metrics_address = ""
[containerd]
enabled = true
address = %q
namespaces = ["tapsync-e2e"]
runtimes = [%q]
qmp_socket = %q
agent_url = ""
[discovery]
proc = false
%s`, p.stateDir, p.ctr.Address(), testctr.RuntimeRunc, filepath.Join(p.base, "{id}", "qmp.sock"), extra)
}
