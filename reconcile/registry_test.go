package reconcile

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/state"
)

func newTestReconciler(t *testing.T) *Reconciler {
	t.Helper()
	store, err := state.Open(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	r := New(store)
	t.Cleanup(r.Close)
	return r
}

// A netns is known by its namespace (device, inode of the nsfs inode), so
// /run/netns/x and /var/run/netns/x are one; two namespaces are two.
func TestNetnsIdentity(t *testing.T) {
	a, b := testnet.NewNS(t, "tsida"), testnet.NewNS(t, "tsidb")
	ida := identify(a.Path)
	if ida.ns == [2]uint64{} {
		t.Fatalf("%s has no namespace identity", a.Path)
	}
	if !ida.same(identify("/run/netns/" + a.Name)) {
		t.Errorf("%s and /run/netns/%s are not the same netns", a.Path, a.Name)
	}
	if ida.same(identify(b.Path)) {
		t.Errorf("%s and %s are the same netns", a.Path, b.Path)
	}
}

// A netns with no identity yet (a placeholder before its bind mount, or
// no file at all) is known by its place: its directory's identity and its
// name, however the directory is spelled.
func TestNetnsIdentityWithoutNamespace(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "netns")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	alias := filepath.Join(dir, "alias")
	if err := os.Symlink(real, alias); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(real, "placeholder"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"placeholder", "missing"} {
		p, q := filepath.Join(real, name), filepath.Join(alias, name)
		if !identify(p).same(identify(q)) {
			t.Errorf("%s and %s are not the same netns", p, q)
		}
	}
	if identify(filepath.Join(real, "placeholder")).same(identify(filepath.Join(alias, "missing"))) {
		t.Error("two names in one directory are the same netns")
	}
	if !identify("/nonexistent/dir/x").same(identify("/nonexistent/dir/./x")) {
		t.Error("with no directory to stat, cleaned paths do not compare")
	}
}

// Between sources naming one netns, the higher ranked wins whatever the
// order: config > containerd > /proc; of two of one rank, the first stays.
func TestRegisterPrecedence(t *testing.T) {
	sources := []Source{SourceProc, SourceContainerd, SourceConfig}
	for _, first := range sources {
		for _, second := range sources {
			t.Run(string(first)+" then "+string(second), func(t *testing.T) {
				r := newTestReconciler(t)
				netns := filepath.Join(t.TempDir(), "ns") // no netns yet: known by its place
				if _, err := r.Register(Sandbox{ID: "a", Netns: netns, QMP: "/a.sock"}, first); err != nil {
					t.Fatal(err)
				}
				reg, err := r.Register(Sandbox{ID: "b", Netns: netns, QMP: "/b.sock"}, second)
				if err != nil {
					t.Fatal(err)
				}
				want, wantSrc := "a", first
				if second.rank() > first.rank() {
					want, wantSrc = "b", second
				}
				if ids := r.Sandboxes(); !slices.Equal(ids, []string{want}) {
					t.Errorf("sandboxes = %v, want [%s]", ids, want)
				}
				if reg.ID != want || reg.Source != wantSrc || reg.Outranked != (want == "a") {
					t.Errorf("registration = %+v, want id %s from %s", reg, want, wantSrc)
				}
				if want == "b" && reg.Replaced != "a" {
					t.Errorf("registration = %+v, want a replaced", reg)
				}
				if sb, src, ok := r.Registered(want); !ok || src != wantSrc || sb.QMP != "/"+want+".sock" {
					t.Errorf("registered %s = %+v from %q", want, sb, src)
				}
			})
		}
	}
}

// The registry compares a registration with the identities it read
// before; a netns file replaced by another at the same path is still found
// to be the one registered there, and a netns event for the path finds it.
func TestRegisterAfterNetnsReplaced(t *testing.T) {
	ns := testnet.NewNS(t, "tsrep")
	r := newTestReconciler(t)
	if _, err := r.Register(Sandbox{ID: "a", Netns: ns.Path, QMP: "/a.sock"}, SourceProc); err != nil {
		t.Fatal(err)
	}
	before := identify(ns.Path)
	for _, args := range [][]string{{"netns", "del", ns.Name}, {"netns", "add", ns.Name}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	if identify(ns.Path).same(before) {
		t.Fatal("the netns was not replaced")
	}
	if ids := r.InNetns("/run/netns/" + ns.Name); !slices.Equal(ids, []string{"a"}) {
		t.Errorf("InNetns after the replacement = %v, want [a]", ids)
	}
	reg, err := r.Register(Sandbox{ID: "b", Netns: "/run/netns/" + ns.Name, QMP: "/b.sock"}, SourceContainerd)
	if err != nil {
		t.Fatal(err)
	}
	if reg.Replaced != "a" || !slices.Equal(r.Sandboxes(), []string{"b"}) {
		t.Errorf("registration = %+v, sandboxes %v; want b replacing a", reg, r.Sandboxes())
	}
	if ids := r.InNetns(ns.Path); !slices.Equal(ids, []string{"b"}) {
		t.Errorf("InNetns = %v, want [b]", ids)
	}
}

// One id named by two sources keeps the settings of the higher ranked;
// the same source updates them.
func TestRegisterSameID(t *testing.T) {
	r := newTestReconciler(t)
	dir := t.TempDir()
	if _, err := r.Register(Sandbox{ID: "vm", Netns: filepath.Join(dir, "a"), QMP: "/config.sock"}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	reg, err := r.Register(Sandbox{ID: "vm", Netns: filepath.Join(dir, "b"), QMP: "/ctr.sock"}, SourceContainerd)
	if err != nil || !reg.Outranked {
		t.Errorf("containerd over config: %+v, %v; want outranked", reg, err)
	}
	if sb, _, _ := r.Registered("vm"); sb.QMP != "/config.sock" {
		t.Errorf("QMP = %s, want the config's", sb.QMP)
	}
	reg, err = r.Register(Sandbox{ID: "vm", Netns: filepath.Join(dir, "a"), QMP: "/config2.sock", Queues: 2}, SourceConfig)
	if err != nil || reg.Outranked || reg.New {
		t.Errorf("config update: %+v, %v", reg, err)
	}
	if sb, _, _ := r.Registered("vm"); sb.QMP != "/config2.sock" || sb.Queues != 2 {
		t.Errorf("after update: %+v", sb)
	}
	if _, err := r.Register(Sandbox{ID: "vm", Netns: "x", QMP: "/q"}, "elsewhere"); err == nil {
		t.Error("an unknown source was accepted")
	}
}

// When a better source renames a VM, the record follows: the new id's
// first pass takes it over (a plan shows it before), and a pass under the
// old id finds nothing to do.
func TestRegisterRenameKeepsRecord(t *testing.T) {
	r := newTestReconciler(t)
	ctx := context.Background()
	netns := filepath.Join(t.TempDir(), "ns")
	if _, err := r.Register(Sandbox{ID: "proc-ns", Netns: netns, QMP: "/q.sock"}, SourceProc); err != nil {
		t.Fatal(err)
	}
	ep := state.Endpoint{Index: 2, LinkName: "eth0", LinkIfindex: 5, LinkMAC: "02:00:00:00:00:01", Queues: 1}
	if err := r.store.Save(state.Record{Sandbox: "proc-ns", Netns: netns, Endpoints: []state.Endpoint{ep}}); err != nil {
		t.Fatal(err)
	}
	release, err := r.beginPass(ctx, "proc-ns") // a pass under the old name is running
	if err != nil {
		t.Fatal(err)
	}
	reg, err := r.Register(Sandbox{ID: "pod", Netns: netns, QMP: "/run/vc/vm/pod/extra-monitor.sock"}, SourceContainerd)
	if err != nil || reg.Replaced != "proc-ns" || !reg.New {
		t.Fatalf("registration = %+v, %v; want proc-ns replaced", reg, err)
	}
	if ids := r.Sandboxes(); !slices.Equal(ids, []string{"pod"}) {
		t.Errorf("sandboxes = %v, want [pod]", ids)
	}
	if rec, err := r.loadRecord(ctx, "pod"); err != nil || len(rec.Endpoints) != 1 || rec.Sandbox != "pod" {
		t.Errorf("pod's record as a plan sees it = %+v, %v; want proc-ns's endpoint", rec, err)
	}
	// The new name's pass waits for the old name's: one VM, one pass lock.
	done, cancel := context.WithCancel(ctx)
	cancel()
	if _, rel, err := r.lockPass(done, "pod"); err == nil {
		rel()
		t.Fatal("pod's pass could start while proc-ns's runs")
	}
	release()
	rel, err := r.beginPass(ctx, "pod")
	if err != nil {
		t.Fatal(err)
	}
	rel()
	got, err := r.store.Load(ctx, "pod")
	if err != nil || len(got.Endpoints) != 1 || got.Endpoints[0] != ep {
		t.Errorf("pod's record = %+v, %v; want proc-ns's endpoint", got, err)
	}
	if ids, _ := r.store.List(); !slices.Equal(ids, []string{"pod"}) {
		t.Errorf("records = %v, want [pod]", ids)
	}
	if _, err := r.beginPass(ctx, "proc-ns"); !errors.Is(err, ErrUnknownSandbox) {
		t.Errorf("a pass under the old name: %v, want ErrUnknownSandbox", err)
	}
}

// Unregister drops the sandbox and keeps its record; it can come back.
func TestUnregister(t *testing.T) {
	r := newTestReconciler(t)
	netns := filepath.Join(t.TempDir(), "ns")
	sb := Sandbox{ID: "vm", Netns: netns, QMP: "/q.sock"}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if err := r.store.Save(state.Record{Sandbox: "vm", Netns: netns, Endpoints: []state.Endpoint{{Index: 0}}}); err != nil {
		t.Fatal(err)
	}
	r.Unregister("vm")
	r.Unregister("vm") // twice is fine
	if ids, st := r.Sandboxes(), r.Status(); len(ids) != 0 || len(st) != 0 || len(r.InNetns(netns)) != 0 {
		t.Errorf("after Unregister: sandboxes %v, status %v", ids, st)
	}
	if ids, _ := r.store.List(); !slices.Equal(ids, []string{"vm"}) {
		t.Errorf("records = %v, want vm's kept", ids)
	}
	// A lesser source may now name the netns.
	reg, err := r.Register(Sandbox{ID: "pod", Netns: netns, QMP: "/q.sock"}, SourceContainerd)
	if err != nil || reg.Outranked || !reg.New {
		t.Errorf("registration after Unregister = %+v, %v", reg, err)
	}
}

// Dial locks are per QMP socket and go when nobody holds or waits for
// them (Reconciler.dialing no longer grows with every sandbox ever seen),
// yet a dial in flight still keeps a second one out, across an
// unregistration and a new registration of the same socket.
func TestDialLocks(t *testing.T) {
	r := newTestReconciler(t)
	sock := filepath.Join(t.TempDir(), "none.sock")
	sb := Sandbox{ID: "vm", Netns: filepath.Join(t.TempDir(), "ns"), QMP: sock}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if _, err := r.client(context.Background(), sb.withDefaults()); err == nil {
		t.Fatal("dial of a missing socket succeeded")
	}
	dialLocks := func() int {
		r.mu.Lock()
		defer r.mu.Unlock()
		return len(r.dialing)
	}
	if n := dialLocks(); n != 0 {
		t.Errorf("%d dial locks left after a dial", n)
	}

	unlock := r.lockDial(sock)
	r.Unregister("vm")
	if _, err := r.Register(Sandbox{ID: "vm2", Netns: sb.Netns, QMP: sock}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	var holding atomic.Bool
	holding.Store(true)
	second := make(chan struct{})
	go func() {
		defer close(second)
		unlock := r.lockDial(filepath.Join(filepath.Dir(sock), ".", "none.sock"))
		if holding.Load() {
			t.Error("a second dial of the socket got in while the first was in flight")
		}
		unlock()
	}()
	// Wait until the second dial waits on the same lock.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Millisecond) {
		r.mu.Lock()
		l := r.dialing[filepath.Clean(sock)]
		waiting := l != nil && l.users == 2
		r.mu.Unlock()
		if waiting {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second dial never waited on the first's lock")
		}
	}
	holding.Store(false)
	unlock()
	<-second
	if n := dialLocks(); n != 0 {
		t.Errorf("%d dial locks left, want 0", n)
	}
}

// NetnsHeld vouches for a path only while the netns kept from the last
// pass is the one there.
func TestNetnsHeld(t *testing.T) {
	r := newTestReconciler(t)
	a, b := testnet.NewNS(t, "tsheld"), testnet.NewNS(t, "tsheldb")
	if _, err := r.Register(Sandbox{ID: "sb", Netns: a.Path, QMP: "/nonexistent.sock"}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if r.NetnsHeld("sb", a.Path) {
		t.Error("held with nothing kept")
	}
	h, err := datapath.Open(a.Path)
	if err != nil {
		t.Fatal(err)
	}
	withRuntime(r, "sb", func(rt *sandboxRuntime) { rt.host = h })
	if !r.NetnsHeld("sb", a.Path) {
		t.Error("the kept netns at its own path is not held")
	}
	if r.NetnsHeld("sb", b.Path) || r.NetnsHeld("other", a.Path) {
		t.Error("held for another path or another sandbox")
	}
	// The path now names another netns (deleted, then made again).
	testnet.IP(t, "netns", "del", a.Name)
	if r.NetnsHeld("sb", a.Path) {
		t.Error("held after the path was deleted")
	}
	testnet.IP(t, "netns", "add", a.Name)
	if r.NetnsHeld("sb", a.Path) {
		t.Error("held after the path was given to a new netns")
	}
}

// The netns a pass has opened is held while the pass runs: a netns event
// for it then asks for no second pass (the daemon's netns dir scan at
// start lands during the first passes). Once the pass has ended and its
// kept netns is released, nothing vouches for the path.
func TestNetnsHeldDuringPass(t *testing.T) {
	g := newModelRig(t, 1)
	held := 0
	g.r.afterObserve = func(id string) {
		if g.r.NetnsHeld(id, g.ns.Path) {
			held++
		}
	}
	t.Cleanup(func() { g.r.afterObserve = nil })
	// Not kept between passes: what is held is the pass's own.
	g.r.ReleaseNetns(g.sb.ID)
	if g.r.NetnsHeld(g.sb.ID, g.ns.Path) {
		t.Fatal("held before the pass")
	}
	if _, err := g.pass(t); err != nil {
		t.Fatalf("pass: %v\n%s", err, g.log)
	}
	if held != 1 {
		t.Errorf("the netns was held in %d of 1 passes while they ran", held)
	}
	g.r.ReleaseNetns(g.sb.ID)
	if g.r.NetnsHeld(g.sb.ID, g.ns.Path) {
		t.Error("held after the pass ended and its kept netns was released")
	}
}
