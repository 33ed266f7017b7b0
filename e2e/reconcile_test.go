//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
)

// rig is one sandbox under test: its netns, a node-side netns holding the
// veth peers, a running guest, and a state directory.
type rig struct {
	t        *testing.T
	ctx      context.Context
	sb, host testnet.NS
	vm       *testvm.VM
	obs      *qmp.Client // on the VM's second monitor, for observations
	stateDir string
	n        *datapath.Netns
	links    map[string]net.HardwareAddr // container links that should be wired
	queues   int
	model    string // the sandbox's interworking model ("": tcfilter)
	teardown bool   // the helper tears the sandbox down instead
}

func newRig(t *testing.T, queues int) *rig {
	testnet.SkipUnlessRoot(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	t.Cleanup(cancel)
	r := &rig{t: t, ctx: ctx, sb: testnet.NewNS(t, "tapsync-rc"), host: testnet.NewNS(t, "tapsync-rchost"),
		stateDir: t.TempDir(), links: map[string]net.HardwareAddr{}, queues: queues}
	r.vm = testvm.ForTest(t, testvm.Options{NetNS: r.sb.Path, RootPorts: 6, SelfConfig: true})
	c, err := qmp.Dial(ctx, r.vm.TestQMP, qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r.obs = c
	n, err := datapath.Open(r.sb.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	r.n = n
	return r
}

// addLink adds a veth container link whose node-side peer can ping the
// guest address derived from mac.
func (r *rig) addLink(name string, mac net.HardwareAddr) {
	peer := "p" + name
	testnet.Veth(r.t, r.sb, name, mac, r.host, peer)
	testnet.IP(r.t, "-n", r.host.Name, "addr", "add", fmt.Sprintf("%s/%d", testvm.PeerIP(mac), testvm.PrefixLen), "dev", peer)
	r.links[name] = mac
}

func (r *rig) delLink(name string) {
	testnet.IP(r.t, "-n", r.sb.Name, "link", "del", name)
	delete(r.links, name)
}

// reconcile runs the one-shot reconciler process; crashAfter > 0 makes it
// SIGKILL itself after that many actions. It returns the mutations made
// (-1 when killed) and whether it was killed.
func (r *rig) reconcile(crashAfter int) (mutations int, killed bool) {
	r.t.Helper()
	cmd := exec.CommandContext(r.ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=reconcile",
		"TAPSYNC_E2E_SANDBOX=sb1", "TAPSYNC_E2E_NETNS="+r.sb.Path, "TAPSYNC_E2E_QMP="+r.vm.QMP,
		"TAPSYNC_E2E_STATE="+r.stateDir, fmt.Sprintf("TAPSYNC_E2E_QUEUES=%d", r.queues),
		fmt.Sprintf("TAPSYNC_E2E_CRASH_AFTER=%d", crashAfter), "TAPSYNC_E2E_MODEL="+r.model)
	if r.teardown {
		cmd.Env = append(cmd.Env, "TAPSYNC_E2E_TEARDOWN=1")
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return -1, true
		}
	}
	if err != nil {
		r.t.Fatalf("reconcile process: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	if _, err := fmt.Sscanf(stdout.String(), "mutations=%d", &mutations); err != nil {
		r.t.Fatalf("reconcile process printed %q: %v\n%s", stdout.String(), err, stderr.String())
	}
	return mutations, false
}

// converge reconciles until a pass makes no mutation, and fails if that
// takes more than a few passes.
func (r *rig) converge() {
	r.t.Helper()
	for range 3 {
		if m, _ := r.reconcile(0); m == 0 {
			return
		}
	}
	r.t.Fatal("no convergence after 3 passes")
}

// check verifies that exactly the wanted links are wired, nothing of ours
// is left over, and the guest answers on every wired link.
func (r *rig) check() {
	r.t.Helper()
	st, err := r.n.Observe(datapath.All)
	if err != nil {
		r.t.Fatal(err)
	}
	nics, err := r.obs.ListNICs(r.ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	netdevs, err := r.obs.ListNetdevs(r.ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	netdevs = slices.DeleteFunc(netdevs, func(id string) bool { return !strings.HasPrefix(id, "tapsync-") })
	want := len(r.links)
	devices, redirects := len(st.Taps), 2*want
	if r.model == reconcile.ModelMacvtap {
		devices, redirects = len(st.Macvtaps), 0
		if len(st.Taps) != 0 {
			r.t.Errorf("taps %v in the macvtap model", st.Taps)
		}
		for name, mac := range r.links {
			if l := link(r.t, r.n, name); !bytes.Equal(l.MAC, datapath.HostMAC(mac, macvtapOf(st, l.Ifindex))) || len(globalAddrs(l.Addrs)) != 0 {
				r.t.Errorf("%s = %s with %v while lent; want its host MAC and no address", name, l.MAC, l.Addrs)
			}
		}
	}
	if devices != want || len(nics) != want || len(netdevs) != want {
		r.t.Errorf("want %d endpoints; taps %v, macvtaps %v, NICs %+v, netdevs %v", want, st.Taps, st.Macvtaps, nics, netdevs)
	}
	for _, rd := range st.Redirects {
		if !rd.Owned || rd.ToName == "" {
			r.t.Errorf("unexpected or dangling redirect %v", rd)
		}
	}
	if len(st.Redirects) != redirects {
		r.t.Errorf("want %d redirects, have %v", redirects, st.Redirects)
	}
	for name, mac := range r.links {
		if !slices.ContainsFunc(nics, func(n qmp.NICInfo) bool { return n.Owned && n.MAC.String() == mac.String() }) {
			r.t.Errorf("no NIC for %s (%s) in %+v", name, mac, nics)
		}
		pingable(r.t, r.host, testvm.GuestIP(mac))
	}
	for _, tp := range st.Taps {
		if tp.Attached != r.queues {
			r.t.Errorf("%s: %d queues attached, want %d", tp.Name, tp.Attached, r.queues)
		}
	}
	store, err := state.Open(r.stateDir)
	if err != nil {
		r.t.Fatal(err)
	}
	rec, err := store.Load(r.ctx, "sb1")
	if err != nil {
		r.t.Fatal(err)
	}
	if len(rec.Endpoints) != want || slices.ContainsFunc(rec.Endpoints, func(e state.Endpoint) bool { return e.Removing }) {
		r.t.Errorf("record endpoints = %+v, want %d live ones", rec.Endpoints, want)
	}
	if !r.vm.Alive() {
		r.t.Fatal("QEMU died")
	}
}

// macvtapOf is the endpoint index of the macvtap on link ifindex (-1:
// none).
func macvtapOf(st datapath.State, ifindex int) int {
	for _, m := range st.Macvtaps {
		if m.Parent == ifindex {
			return m.Index
		}
	}
	return -1
}

// deviceOf returns the QEMU device serving mac.
func (r *rig) deviceOf(mac net.HardwareAddr) qmp.NICInfo {
	r.t.Helper()
	nics, err := r.obs.ListNICs(r.ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	i := slices.IndexFunc(nics, func(n qmp.NICInfo) bool { return n.MAC.String() == mac.String() })
	if i < 0 {
		r.t.Fatalf("no device for %s", mac)
	}
	return nics[i]
}

func (r *rig) waitSerial(off int64, re *regexp.Regexp) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(r.ctx, time.Minute)
	defer cancel()
	if _, err := r.vm.WaitSerialFrom(ctx, off, re); err != nil {
		r.t.Fatal(err)
	}
}

// TestReconcileConvergesAndSurvivesCrashes converges a sandbox from empty,
// then kills the reconciling process (SIGKILL) after every step of an add
// and of a remove in turn; a fresh process must converge each time, leak
// nothing, and never re-plug the endpoint that was not being changed.
func TestReconcileConvergesAndSurvivesCrashes(t *testing.T) {
	r := newRig(t, 1)
	eth0 := testvm.TestMAC(1)
	r.addLink("eth0", eth0)
	off := r.vm.SerialOffset()
	r.converge()
	r.waitSerial(off, testvm.NICUpRE(eth0))
	r.check()
	if m, _ := r.reconcile(0); m != 0 {
		t.Fatalf("second reconcile of a converged sandbox made %d mutations", m)
	}
	stable := r.deviceOf(eth0)
	stableSince := r.vm.SerialOffset()

	net1 := testvm.TestMAC(2)
	for k := 1; ; k++ { // add path
		r.addLink("net1", net1)
		off := r.vm.SerialOffset()
		if _, killed := r.reconcile(k); !killed {
			t.Logf("add path: %d steps, each crash repaired", k-1)
			r.converge()
			r.check()
			r.delLink("net1")
			r.converge()
			break
		}
		r.converge()
		r.waitSerial(off, testvm.NICUpRE(net1))
		r.check()
		off = r.vm.SerialOffset()
		r.delLink("net1")
		r.converge()
		r.waitSerial(off, testvm.NICGoneRE(net1))
		r.check()
	}
	for k := 1; ; k++ { // remove path
		off := r.vm.SerialOffset()
		r.addLink("net1", net1)
		r.converge()
		// The guest must have taken the NIC before it is unplugged, or it
		// never announces it and never reports it gone either.
		r.waitSerial(off, testvm.NICUpRE(net1))
		off = r.vm.SerialOffset()
		r.delLink("net1")
		_, killed := r.reconcile(k)
		r.converge()
		r.waitSerial(off, testvm.NICGoneRE(net1))
		r.check()
		if !killed {
			t.Logf("remove path: %d steps, each crash repaired", k-1)
			break
		}
	}

	if now := r.deviceOf(eth0); now.ID != stable.ID || now.Bus != stable.Bus || now.Addr != stable.Addr {
		t.Errorf("eth0's device changed from %+v to %+v", stable, now)
	}
	if b, err := os.ReadFile(r.vm.Serial); err == nil && testvm.NICGoneRE(eth0).Match(b[stableSince:]) {
		t.Errorf("the guest lost eth0 while other endpoints changed")
	}
}

// TestReconcileRepairsHandDamage breaks a wired sandbox the ways an
// operator or a CNI plugin might, and checks that one reconcile repairs
// each with the least change.
func TestReconcileRepairsHandDamage(t *testing.T) {
	r := newRig(t, 2)
	eth0 := testvm.TestMAC(1)
	r.addLink("eth0", eth0)
	r.converge()
	r.check()
	before := r.deviceOf(eth0)

	// Our filter deleted by hand: re-added, NIC untouched.
	testnet.Run(t, "tc", "-n", r.sb.Name, "filter", "del", "dev", "eth0", "ingress", "prio", fmt.Sprint(datapath.FilterPriority))
	if m, _ := r.reconcile(0); m != 1 {
		t.Errorf("repairing one filter made %d mutations, want 1", m)
	}
	r.check()

	// MTU changed by the CNI plugin: the tap follows, NIC untouched.
	testnet.IP(t, "-n", r.sb.Name, "link", "set", "eth0", "mtu", "1400")
	if m, _ := r.reconcile(0); m != 1 {
		t.Errorf("following an MTU change made %d mutations, want 1", m)
	}
	if tp := tapOf(t, r.n, 0); tp.MTU != 1400 {
		t.Errorf("tap mtu = %d, want 1400", tp.MTU)
	}
	r.check()
	if now := r.deviceOf(eth0); now.ID != before.ID || now.Addr != before.Addr || now.Bus != before.Bus {
		t.Errorf("device changed from %+v to %+v", before, now)
	}

	// The container link re-created under the same name (new ifindex):
	// the endpoint is replaced.
	off := r.vm.SerialOffset()
	r.delLink("eth0")
	r.addLink("eth0", eth0)
	r.converge()
	r.waitSerial(off, testvm.NICGoneRE(eth0))
	r.waitSerial(off, testvm.NICUpRE(eth0))
	r.check()
	if now := r.deviceOf(eth0); now.ID == before.ID {
		t.Errorf("re-created link kept device %s; want a new endpoint", now.ID)
	}
}

// lend gives container link name what the macvtap model takes from it
// and must give back: an address and a route through a gateway on it.
func (r *rig) lend(name string, n int) {
	r.t.Helper()
	testnet.IP(r.t, "-n", r.sb.Name, "addr", "add", fmt.Sprintf("192.168.%d.2/24", 70+n), "dev", name)
	testnet.IP(r.t, "-n", r.sb.Name, "route", "add", fmt.Sprintf("172.30.%d.0/24", n), "via", fmt.Sprintf("192.168.%d.1", 70+n), "dev", name)
}

// linkFacts is what must come back exactly when a macvtap endpoint goes:
// the link's MAC, addresses and routes.
func (r *rig) linkFacts(name string) string {
	r.t.Helper()
	l := link(r.t, r.n, name)
	routes, err := r.n.Routes()
	if err != nil {
		r.t.Fatal(err)
	}
	as := slices.Clone(l.Addrs)
	slices.SortFunc(as, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	var rs []string
	for _, rt := range routes {
		if rt.LinkIndex == l.Ifindex {
			rs = append(rs, fmt.Sprintf("%+v", rt))
		}
	}
	slices.Sort(rs)
	return fmt.Sprintf("%s %v %v", l.MAC, as, rs)
}

// TestReconcileMacvtapSurvivesCrashes is TestReconcileConvergesAndSurvivesCrashes
// for the macvtap model: a link with an address and a route is added
// with a SIGKILL after every step, and the sandbox is torn down with a
// SIGKILL after every step (the endpoints go, the links stay); a fresh
// process converges each time, and after each teardown every link has
// exactly its MAC, addresses and routes back and nothing of ours is left.
func TestReconcileMacvtapSurvivesCrashes(t *testing.T) {
	r := newRig(t, 1)
	r.model = reconcile.ModelMacvtap
	eth0 := testvm.TestMAC(1)
	r.addLink("eth0", eth0)
	r.lend("eth0", 0)
	off := r.vm.SerialOffset()
	r.converge()
	r.waitSerial(off, testvm.NICUpRE(eth0))
	r.check()
	if m, _ := r.reconcile(0); m != 0 {
		t.Fatalf("second reconcile of a converged sandbox made %d mutations", m)
	}
	stable := r.deviceOf(eth0)

	net1 := testvm.TestMAC(2)
	for k := 1; ; k++ { // add path
		r.addLink("net1", net1)
		r.lend("net1", 1)
		off := r.vm.SerialOffset()
		_, killed := r.reconcile(k)
		r.converge()
		r.waitSerial(off, testvm.NICUpRE(net1))
		r.check()
		if !killed {
			t.Logf("add path: %d steps, each crash repaired", k-1)
			break
		}
		off = r.vm.SerialOffset()
		r.delLink("net1")
		r.converge()
		r.waitSerial(off, testvm.NICGoneRE(net1))
		r.check()
	}
	if now := r.deviceOf(eth0); now.ID != stable.ID || now.Bus != stable.Bus || now.Addr != stable.Addr {
		t.Errorf("eth0's device changed from %+v to %+v", stable, now)
	}

	// Remove path: the links as they are with nothing lent, then a
	// teardown killed after every step.
	links := map[string]net.HardwareAddr{"eth0": eth0, "net1": net1}
	r.teardown = true
	r.reconcile(0)
	r.teardown = false
	orig := map[string]string{}
	for name := range links {
		orig[name] = r.linkFacts(name)
		if !strings.Contains(orig[name], "192.168.") || !strings.Contains(orig[name], "172.30.") {
			t.Fatalf("%s before the teardowns: %s; want its address and route", name, orig[name])
		}
		t.Logf("%s: %s", name, orig[name])
	}
	for k := 1; ; k++ {
		off := r.vm.SerialOffset()
		r.converge()
		for _, mac := range links {
			r.waitSerial(off, testvm.NICUpRE(mac))
		}
		r.check()
		off = r.vm.SerialOffset()
		r.teardown = true
		_, killed := r.reconcile(k)
		if killed {
			r.reconcile(0)
		}
		r.teardown = false
		for _, mac := range links {
			r.waitSerial(off, testvm.NICGoneRE(mac))
		}
		st, err := r.n.Observe(datapath.All)
		if err != nil {
			t.Fatal(err)
		}
		nics, err := r.obs.ListNICs(r.ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Macvtaps) != 0 || len(st.RateLimits) != 0 || slices.ContainsFunc(nics, func(n qmp.NICInfo) bool { return n.Owned }) {
			t.Errorf("teardown killed after step %d left macvtaps %v, limits %v, NICs %+v", k, st.Macvtaps, st.RateLimits, nics)
		}
		for name := range links {
			if now := r.linkFacts(name); now != orig[name] {
				t.Errorf("teardown killed after step %d: %s is\n%s\nwas\n%s", k, name, now, orig[name])
			}
		}
		if t.Failed() {
			t.FailNow()
		}
		if !killed {
			t.Logf("teardown: %d steps, each crash repaired", k-1)
			break
		}
	}
}
