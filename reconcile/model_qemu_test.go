package reconcile

// This file tests the model of the VM against a real QEMU: one rig (a
// netns, a VM and its monitor) shared by its cases, hence its length.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// modelVM is a q35 QEMU with four root ports, native PCIe hot-plug and no
// guest OS: with nobody to power a slot on, QEMU completes an unplug at
// once and sends DEVICE_DELETED. Besides the sandbox's QMP socket it has a
// second one for the test, the "outside actor".
type modelVM struct {
	qmp     string
	outside *qmp.Client
	trace   string // QEMU's trace of the QMP commands it receives
}

func startModelVM(t *testing.T) modelVM {
	t.Helper()
	trace := filepath.Join(t.TempDir(), "trace.log")
	sock, test := startQEMU(t, "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
		"-trace", "handle_qmp_command", "-D", trace)
	out, err := qmp.Dial(context.Background(), test, qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { out.Close() })
	return modelVM{qmp: sock, outside: out, trace: trace}
}

// commands returns the QMP commands QEMU has received so far, in order,
// each as its name, and for human-monitor-command its command line:
// "human-monitor-command info network". QEMU writes each trace line as
// it takes the command, before it answers.
func (vm modelVM) commands(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(vm.trace)
	if err != nil {
		t.Fatal(err)
	}
	var cmds []string
	for _, line := range strings.Split(string(b), "\n") {
		_, req, ok := strings.Cut(line, "handle_qmp_command mon ")
		if !ok {
			continue
		}
		_, req, _ = strings.Cut(req, "req: ")
		var m struct {
			Execute   string `json:"execute"`
			Arguments struct {
				CommandLine string `json:"command-line"`
			} `json:"arguments"`
		}
		if err := json.Unmarshal([]byte(req), &m); err != nil {
			t.Fatalf("trace line %q: %v", line, err)
		}
		cmds = append(cmds, strings.TrimSpace(m.Execute+" "+m.Arguments.CommandLine))
	}
	return cmds
}

// do runs a command on the outside monitor.
func (vm modelVM) do(t *testing.T, cmd string, args map[string]any) {
	t.Helper()
	b := fmt.Sprintf(`{"execute": %q}`, cmd)
	if args != nil {
		a := ""
		for k, v := range args {
			if a != "" {
				a += ", "
			}
			a += fmt.Sprintf("%q: %q", k, v)
		}
		b = fmt.Sprintf(`{"execute": %q, "arguments": {%s}}`, cmd, a)
	}
	if _, err := vm.outside.Run([]byte(b)); err != nil {
		t.Fatalf("outside %s: %v", b, err)
	}
}

// awaitNoNICs waits until QEMU's peripherals hold no NIC of ours, as
// after an outside device_del.
func (vm modelVM) awaitNoNICs(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		raw, err := vm.outside.Run([]byte(`{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}`))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(raw), "tapsync-net") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("NICs of ours still in QEMU: %s", raw)
		}
		time.Sleep(20 * time.Millisecond) // polling for the unplug, bounded by the deadline
	}
}

type modelRig struct {
	r     *Reconciler
	sb    Sandbox
	vm    modelVM
	ns    testnet.NS
	peer  testnet.NS
	log   *bytes.Buffer
	ctx   context.Context
	store *state.Store
}

func newModelRig(t *testing.T, links int) *modelRig {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("skipping: no /dev/net/tun")
	}
	g := &modelRig{ns: testnet.NewNS(t, "tapsync-model"), peer: testnet.NewNS(t, "tapsync-modelpeer"), log: &bytes.Buffer{}}
	for i := range links {
		testnet.Veth(t, g.ns, fmt.Sprintf("net%d", i), macN(i+1), g.peer, fmt.Sprintf("peer%d", i))
	}
	g.vm = startModelVM(t)
	var err error
	if g.store, err = state.Open(filepath.Join(t.TempDir(), "state")); err != nil {
		t.Fatal(err)
	}
	g.r = New(g.store)
	t.Cleanup(g.r.Close)
	g.sb = Sandbox{ID: "model", Netns: g.ns.Path, QMP: g.vm.qmp, Queues: 1, Vhost: datapath.VhostOff, UnplugTimeout: 5 * time.Second,
		Placement: qmp.Placement{Hotplug: qmp.HotplugRootPort}}
	if _, err := g.r.Register(g.sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	g.ctx = zerolog.New(g.log).WithContext(context.Background())
	converge(t, g.ctx, g.r, g.sb.ID)
	return g
}

// pass runs one pass and returns its QMP command count.
func (g *modelRig) pass(t *testing.T) (uint64, error) {
	t.Helper()
	c, err := g.r.client(g.ctx, g.sb)
	if err != nil {
		t.Fatal(err)
	}
	before := c.Commands()
	err = g.r.Reconcile(g.ctx, g.sb.ID)
	return c.Commands() - before, err
}

func (g *modelRig) model() (m *vmModel) {
	withRuntime(g.r, g.sb.ID, func(rt *sandboxRuntime) {
		if rt != nil {
			m = rt.model
		}
	})
	return m
}

func (g *modelRig) modelNICs() []string {
	m := g.model()
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, n := range m.nics {
		out = append(out, n.QOMPath+"@"+n.Bus)
	}
	slices.Sort(out)
	return out
}

// A pass with nothing to do asks QEMU nothing; an add costs getfd,
// netdev_add and device_add only.
func TestModelNoOpPassNoQMP(t *testing.T) {
	g := newModelRig(t, 2)
	for range 3 {
		n, err := g.pass(t)
		if err != nil || n != 0 {
			t.Fatalf("a no-op pass: %d QMP commands, err %v; want 0", n, err)
		}
	}
	testnet.Veth(t, g.ns, "net2", macN(3), g.peer, "peer2")
	n, err := g.pass(t)
	if err != nil || n != 3 {
		t.Errorf("a pass adding one NIC: %d QMP commands, err %v; want 3 (getfd, netdev_add, device_add)", n, err)
	}
	if n, err := g.pass(t); err != nil || n != 0 {
		t.Errorf("the pass after: %d QMP commands, err %v; want 0", n, err)
	}
	// The verify pass reads QEMU again and finds the model right.
	g.r.Verify(g.sb.ID)
	if n, err := g.pass(t); err != nil || n == 0 {
		t.Errorf("verify pass: %d QMP commands, err %v; want a full observation", n, err)
	}
	if strings.Contains(g.log.String(), "differed") {
		t.Errorf("verify found the model wrong:\n%s", g.log)
	}
	if n, err := g.pass(t); err != nil || n != 0 {
		t.Errorf("the pass after verify: %d QMP commands, err %v; want 0", n, err)
	}
}

// restart stands for a daemon restart: the rig's reconciler closes, a new
// one on the same record store takes over the sandbox.
func (g *modelRig) restart(t *testing.T) {
	t.Helper()
	g.r.Close()
	g.r = New(g.store)
	t.Cleanup(g.r.Close)
	if _, err := g.r.Register(g.sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
}

// The first reading of a VM after a restart lists its netdevs only when
// the record does not account for its NICs: one round trip instead of two
// for a converged sandbox; a NIC gone under a recorded endpoint (its
// netdev left behind, as after a crash between netdev_add and device_add)
// makes the reading list them, and the pass repairs the endpoint.
func TestFirstReadingNetdevs(t *testing.T) {
	t.Run("record accounts for every NIC", func(t *testing.T) {
		g := newModelRig(t, 2)
		g.restart(t)
		if n, err := g.pass(t); err != nil || n != 1 {
			t.Errorf("first pass after a restart: %d QMP commands, err %v; want 1 (info network)", n, err)
		}
		testnet.Veth(t, g.ns, "net2", macN(3), g.peer, "peer2")
		if n, err := g.pass(t); err != nil || n != 4 {
			t.Errorf("a pass adding one NIC: %d QMP commands, err %v; want 4 (info qtree, getfd, netdev_add, device_add)", n, err)
		}
	})
	// The daemon is gone (a crash) when the VM's last NIC goes, its netdev
	// left; with the record kept (an endpoint without its NIC), then with
	// the record lost too (the tap without its NIC is all that shows).
	for _, lost := range []bool{false, true} {
		name := "a recorded endpoint without its NIC"
		if lost {
			name = "a tap of ours without its NIC, the record lost"
		}
		t.Run(name, func(t *testing.T) {
			g := newModelRig(t, 2)
			g.r.Close()
			g.vm.do(t, "device_del", map[string]any{"id": qmp.DeviceID(0)})
			g.vm.do(t, "device_del", map[string]any{"id": qmp.DeviceID(1)})
			g.vm.awaitNoNICs(t)
			if lost {
				if err := g.store.Delete(g.sb.ID); err != nil {
					t.Fatal(err)
				}
			}
			g.restart(t)
			n, err := g.pass(t)
			if err != nil {
				t.Fatalf("first pass after a restart, the NICs gone and their netdevs left: %v (%d commands)\n%s", err, n, g.log)
			}
			// info qtree, info network, then lookBeforeAdd's reading,
			// netdev_del, getfd, netdev_add, device_add.
			if n < 6 {
				t.Errorf("first pass: %d QMP commands; want the netdevs listed and both NICs plugged again", n)
			}
			// Asked of QEMU, not of the model: the outside device_del's
			// DEVICE_DELETED may reach the new connection after qom-list
			// stops showing the NIC, and then rightly leaves the model
			// unknown.
			vm, err := g.vm.outside.ReadVM(g.ctx)
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, n := range vm.NICs {
				ids = append(ids, n.ID)
			}
			if slices.Sort(ids); !slices.Equal(ids, []string{qmp.DeviceID(0), qmp.DeviceID(1)}) {
				t.Errorf("NICs in QEMU after the pass = %q; want both\n%s", ids, g.log)
			}
		})
	}
}

// A restart's pass verifies the record, changing nothing, with the
// connection's greeting and one reading of the VM's NICs and netdevs
// (info network): no device tree. The first pass after it that acts reads
// the device tree once (the free slots), then plugs; the pass after that
// asks QEMU nothing.
func TestRestartPassCommands(t *testing.T) {
	g := newModelRig(t, 2)
	check := func(what string, from int, want ...string) int {
		t.Helper()
		cmds := g.vm.commands(t)
		if got := cmds[from:]; !slices.Equal(got, want) {
			t.Errorf("%s: QEMU received %q; want %q", what, got, want)
		}
		return len(cmds)
	}
	from := len(g.vm.commands(t))
	g.restart(t)
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	if st, _ := g.r.StatusOf(g.sb.ID); st.Mutations != 0 || len(st.Endpoints) != 2 {
		t.Errorf("restart pass: %d mutations, endpoints %+v; want none, both recorded", st.Mutations, st.Endpoints)
	}
	from = check("restart pass", from, "qmp_capabilities", "human-monitor-command info network")
	testnet.Veth(t, g.ns, "net2", macN(3), g.peer, "peer2")
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	from = check("the add after it", from, "human-monitor-command info qtree", "getfd", "netdev_add", "device_add")
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	check("the pass after the add", from)
}

// An outside device_del: QEMU's DEVICE_DELETED takes the NIC out of the
// model, and the next ordinary pass plugs it again. An outside device_add
// is not seen by an ordinary pass, but by the next verify pass, which
// logs the difference.
func TestModelOutsideActor(t *testing.T) {
	g := newModelRig(t, 2)
	g.vm.do(t, "device_del", map[string]any{"id": qmp.DeviceID(1)})
	want := "/machine/peripheral/" + qmp.DeviceID(0)
	deadline := time.Now().Add(10 * time.Second)
	for nics := g.modelNICs(); len(nics) != 1 || !strings.HasPrefix(nics[0], want+"@"); nics = g.modelNICs() {
		if time.Now().After(deadline) {
			t.Fatalf("model NICs after an outside device_del = %q; want only %s", nics, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The netdev stays (nobody deleted it): the pass deletes and remakes it.
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	if nics := g.modelNICs(); len(nics) != 2 {
		t.Fatalf("model NICs after the pass = %q; want both back", nics)
	}
	if n, err := g.pass(t); err != nil || n != 0 {
		t.Errorf("no-op pass after the re-plug: %d QMP commands, err %v", n, err)
	}

	// Another actor plugs a NIC into the last free root port.
	g.vm.do(t, "device_add", map[string]any{"driver": "virtio-net-pci", "id": "outsider", "bus": "rp1", "romfile": ""})
	if n, err := g.pass(t); err != nil || n != 0 || len(g.modelNICs()) != 2 {
		t.Errorf("ordinary pass: %d QMP commands, %v, model %q; want the model trusted", n, err, g.modelNICs())
	}
	g.r.Verify(g.sb.ID)
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	if nics := g.modelNICs(); !slices.Contains(nics, "/machine/peripheral/outsider@rp1") {
		t.Errorf("model NICs after verify = %q; want the outsider's", nics)
	}
	if !strings.Contains(g.log.String(), "unknown NIC /machine/peripheral/outsider") {
		t.Errorf("verify did not log the outsider:\n%s", g.log)
	}
}

// A model that is wrong makes a plug fail; the failed pass forgets the
// model and the next one observes QEMU fully and succeeds.
func TestModelErrorObservesFully(t *testing.T) {
	g := newModelRig(t, 1)
	// The model picks root ports from the top: rp4 went to net0, rp3 is
	// next. Another actor takes it unseen.
	g.vm.do(t, "device_add", map[string]any{"driver": "virtio-net-pci", "id": "outsider", "bus": "rp3", "romfile": ""})
	testnet.Veth(t, g.ns, "net1", macN(2), g.peer, "peer1")
	n, err := g.pass(t)
	if err == nil {
		t.Fatalf("a plug into the outsider's port succeeded (%d commands)", n)
	}
	t.Logf("pass with a wrong model: %d commands: %v", n, err)
	if _, _, ok := g.model().fresh(); ok {
		t.Fatal("the model is still trusted after a failed pass")
	}
	n, err = g.pass(t)
	if err != nil {
		t.Fatalf("the pass after the failure: %v", err)
	}
	if n <= 3 {
		t.Errorf("the pass after the failure sent %d commands; want a full observation before the plug", n)
	}
	if nics := g.modelNICs(); len(nics) != 3 || !slices.Contains(nics, "/machine/peripheral/outsider@rp3") {
		t.Errorf("model NICs = %q; want ours two and the outsider", nics)
	}
}

// A pass that fails on the host side asks QEMU nothing and leaves the
// model trusted: only QMP failures make it unknown. Here a link takes the
// name of the tap a new endpoint needs (tsn1) after the observation, so
// the tap cannot be made.
func TestModelKeptOverHostFailure(t *testing.T) {
	g := newModelRig(t, 1)
	testnet.Veth(t, g.ns, "net1", macN(2), g.peer, "peer1")
	g.squatAfterObserve(t, "tsn1")
	for range 2 {
		n, err := g.pass(t)
		if err == nil {
			t.Fatalf("the pass made a tap tsn1 beside the veth tsn1 (%d commands)", n)
		}
		if CauseOf(err) != CauseNetns || n != 0 {
			t.Errorf("failed pass: cause %q, %d QMP commands; want %q and none: %v", CauseOf(err), n, CauseNetns, err)
		}
		if _, _, ok := g.model().fresh(); !ok {
			t.Fatal("a host-side failure made the model unknown")
		}
	}
}

// linkVanished tells a link deleted under a pass from other failures.
func TestLinkVanished(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("redirect from link 4: %w", netlink.LinkNotFoundError{}), true},
		{fmt.Errorf("endpoint 0: %w", errors.Join(fmt.Errorf("a: %w", netlink.LinkNotFoundError{}), netlink.LinkNotFoundError{})), true},
		{errors.Join(fmt.Errorf("a: %w", netlink.LinkNotFoundError{}), fmt.Errorf("add filter: %w", unix.EEXIST)), false},
		{fmt.Errorf("open /dev/vhost-net: %w", unix.ENODEV), false}, // a driver not loaded: not a link gone
		{fmt.Errorf("add filter: %w", unix.EEXIST), false},
		{errors.New("Link not found"), false}, // words are not evidence
		{fmt.Errorf("netns x: redirect from link index 4: %w", datapath.ErrLinkGone), true},
		{errors.Join(fmt.Errorf("a: %w", datapath.ErrLinkGone), fmt.Errorf("add filter: %w", unix.EEXIST)), false},
	} {
		if got := linkVanished(tc.err); got != tc.want {
			t.Errorf("linkVanished(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// A link deleted after a pass observed the netns and noted before the
// pass acts (the daemon notes each RTM_DELLINK): the pass observes again
// and its plan removes the endpoint, in the same pass. Without the second
// look the plan, made while the link was there, would do nothing (or
// repair a link about to go) and leave the removal to another pass.
func TestLinkGoneDuringPass(t *testing.T) {
	g := newModelRig(t, 2)
	ns, err := netns.GetFromPath(g.ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	net0, err := h.LinkByName("net0")
	if err != nil {
		t.Fatal(err)
	}
	observations := 0
	g.r.afterObserve = func(id string) {
		observations++
		if observations == 1 {
			if err := h.LinkDel(net0); err != nil {
				t.Errorf("delete net0: %v", err)
			}
			g.r.NoteNetlink(id, Netlink{LinkGone: net0.Attrs().Index})
		}
	}
	t.Cleanup(func() { g.r.afterObserve = nil })
	if _, err := g.pass(t); err != nil {
		t.Fatalf("pass: %v\n%s", err, g.log)
	}
	rec, err := g.store.Load(g.ctx, g.sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range rec.Endpoints {
		if e.LinkName == "net0" {
			t.Errorf("net0's endpoint still recorded after the pass: %+v\n%s", e, g.log)
		}
	}
	if nics := g.modelNICs(); len(nics) != 1 {
		t.Errorf("NICs after the pass: %v; want net1's only", nics)
	}
	if !strings.Contains(g.log.String(), "observing again") {
		t.Errorf("the pass did not say it looked again:\n%s", g.log)
	}
}

// A sandbox's netns (and its netlink socket) is kept from one pass to the
// next, dropped after a failure on the host side, and closed with the
// sandbox.
func TestNetnsKeptBetweenPasses(t *testing.T) {
	g := newModelRig(t, 1)
	kept := func() (h *datapath.Netns) {
		withRuntime(g.r, g.sb.ID, func(rt *sandboxRuntime) {
			if rt != nil {
				h = rt.host
			}
		})
		return h
	}
	h := kept()
	if h == nil {
		t.Fatal("no netns kept after a pass")
	}
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	if kept() != h {
		t.Error("the next pass opened the netns again instead of using the kept one")
	}
	testnet.Veth(t, g.ns, "net1", macN(2), g.peer, "peer1")
	g.squatAfterObserve(t, "tsn1") // endpoint 1's tap name, taken
	if _, err := g.pass(t); err == nil || CauseOf(err) != CauseNetns {
		t.Fatalf("pass: %v; want a host-side failure", err)
	}
	if kept() != nil {
		t.Error("the netns was kept after a host-side failure")
	}
	if out, err := exec.Command("ip", "-n", g.ns.Name, "link", "del", "tsn1").CombinedOutput(); err != nil {
		t.Fatalf("ip link del tsn1: %v: %s", err, out)
	}
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	if kept() == nil {
		t.Fatal("no netns kept after the pass that recovered")
	}
	g.r.ReleaseNetns(g.sb.ID) // its path went away
	if kept() != nil {
		t.Fatal("ReleaseNetns kept the netns")
	}
	if _, err := g.pass(t); err != nil || kept() == nil {
		t.Fatalf("pass after the release: %v, kept %v", err, kept() != nil)
	}
	held := netnsFDs(t, g.ns.Path)
	g.r.Unregister(g.sb.ID)
	if n := netnsFDs(t, g.ns.Path); n != held-1 {
		t.Errorf("%d descriptors of the netns open after the sandbox was unregistered, %d before; want its kept netns closed", n, held)
	}
}

// netnsFDs counts this process's descriptors of the netns at path.
func netnsFDs(t *testing.T, path string) int {
	t.Helper()
	var want unix.Stat_t
	if err := unix.Stat(path, &want); err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc/self/fd", fd.Name()), &st) == nil && st.Dev == want.Dev && st.Ino == want.Ino {
			n++
		}
	}
	return n
}
