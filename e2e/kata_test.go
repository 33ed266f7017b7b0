//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
	"golang.org/x/sys/unix"
)

// kataRig is a sandbox wired partly the way Kata's runtime wires one, in
// a real netns with a real guest, and reconciled by an in-process
// Reconciler.
type kataRig struct {
	t        *testing.T
	ctx      context.Context
	sb, host testnet.NS
	vm       *testvm.VM
	n        *datapath.Netns
	r        *reconcile.Reconciler
	sandbox  reconcile.Sandbox
}

func newKataRig(t *testing.T) *kataRig {
	testnet.SkipUnlessRoot(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	t.Cleanup(cancel)
	k := &kataRig{t: t, ctx: ctx, sb: testnet.NewNS(t, "tapsync-kata"), host: testnet.NewNS(t, "tapsync-katahost")}
	k.vm = testvm.ForTest(t, testvm.Options{NetNS: k.sb.Path, SelfConfig: true})
	k.n = openNetns(t, k.sb.Path)
	store, err := state.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	k.r = reconcile.New(store)
	t.Cleanup(k.r.Close)
	k.sandbox = reconcile.Sandbox{ID: "kata1", Netns: k.sb.Path, QMP: k.vm.QMP, Queues: 1, UnplugTimeout: 30 * time.Second}
	k.set()
	return k
}

func (k *kataRig) set() {
	k.t.Helper()
	if _, err := k.r.Register(k.sandbox, reconcile.SourceConfig); err != nil {
		k.t.Fatal(err)
	}
}

func (k *kataRig) addLink(name string, mac net.HardwareAddr) {
	k.t.Helper()
	peer := "p" + name
	testnet.Veth(k.t, k.sb, name, mac, k.host, peer)
	testnet.IP(k.t, "-n", k.host.Name, "addr", "add", fmt.Sprintf("%s/%d", testvm.PeerIP(mac), testvm.PrefixLen), "dev", peer)
}

// kataWire wires container link name as Kata's tcfilter model does: a
// tap tap<N>_kata with netlink's defaults (persistent, vnet_hdr, no PI),
// filters at priority 49152 both ways, and an anonymous virtio-net device
// with the link's MAC hot-plugged into pci-bridge slot `slot` on the
// fd of the tap, through the VM's second monitor (getfd, netdev_add,
// device_add without an id).
func (k *kataRig) kataWire(name string, n, slot int) {
	k.t.Helper()
	tap := fmt.Sprintf("tap%d_kata", n)
	l := link(k.t, k.n, name)
	testnet.IP(k.t, "-n", k.sb.Name, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
	testnet.IP(k.t, "-n", k.sb.Name, "link", "set", tap, "mtu", fmt.Sprint(l.MTU), "up")
	for _, pair := range [][2]string{{name, tap}, {tap, name}} {
		testnet.Run(k.t, "tc", "-n", k.sb.Name, "qdisc", "add", "dev", pair[0], "ingress")
		testnet.Run(k.t, "tc", "-n", k.sb.Name, "filter", "add", "dev", pair[0], "parent", "ffff:", "prio", "49152",
			"protocol", "all", "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", pair[1])
	}
	var f *os.File
	err := k.n.Do(func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(tap)
		if err != nil {
			unix.Close(fd)
			return err
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return fmt.Errorf("TUNSETIFF %s: %w", tap, err)
		}
		f = os.NewFile(uintptr(fd), tap)
		return nil
	})
	if err != nil {
		k.t.Fatal(err)
	}
	defer f.Close()
	netdev := fmt.Sprintf("network-%d", n)
	rawQMP(k.t, k.vm.TestQMP, []rawCmd{
		{`{"execute":"getfd","arguments":{"fdname":"kfd` + fmt.Sprint(n) + `"}}`, f},
		{fmt.Sprintf(`{"execute":"netdev_add","arguments":{"type":"tap","id":%q,"fd":"kfd%d"}}`, netdev, n), nil},
		{fmt.Sprintf(`{"execute":"device_add","arguments":{"driver":"virtio-net-pci","netdev":%q,"mac":%q,"bus":%q,"addr":"%#x"}}`,
			netdev, l.MAC, testvm.BridgeID, slot), nil},
	})
}

type rawCmd struct {
	json string
	fd   *os.File // passed with SCM_RIGHTS, or nil
}

// rawQMP runs commands on a monitor as a plain client would (Kata's
// runtime, here), and fails the test on any error reply.
func rawQMP(t *testing.T, sock string, cmds []rawCmd) {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	uc.SetDeadline(time.Now().Add(30 * time.Second))
	rd := bufio.NewReader(uc)
	reply := func(what string) {
		for {
			line, err := rd.ReadBytes('\n')
			if err != nil {
				t.Fatalf("qmp %s: %v", what, err)
			}
			var m struct {
				Return json.RawMessage `json:"return"`
				Error  *struct{ Desc string }
				Event  string `json:"event"`
			}
			if err := json.Unmarshal(line, &m); err != nil {
				t.Fatalf("qmp %s: %s: %v", what, line, err)
			}
			switch {
			case m.Error != nil:
				t.Fatalf("qmp %s: %s", what, m.Error.Desc)
			case m.Return != nil:
				return
			}
		}
	}
	if _, err := rd.ReadBytes('\n'); err != nil { // greeting
		t.Fatalf("qmp greeting on %s: %v", sock, err)
	}
	all := append([]rawCmd{{`{"execute":"qmp_capabilities"}`, nil}}, cmds...)
	for _, cmd := range all {
		var oob []byte
		if cmd.fd != nil {
			oob = unix.UnixRights(int(cmd.fd.Fd()))
		}
		if _, _, err := uc.WriteMsgUnix([]byte(cmd.json+"\n"), oob, nil); err != nil {
			t.Fatal(err)
		}
		reply(cmd.json)
	}
}

// waitUp waits for the guest to announce the NIC with mac, and shows the
// end of the serial console when it does not.
func (k *kataRig) waitUp(off int64, mac net.HardwareAddr) {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(k.ctx, 90*time.Second)
	defer cancel()
	if _, err := k.vm.WaitSerialFrom(ctx, off, testvm.NICUpRE(mac)); err != nil {
		b, _ := os.ReadFile(k.vm.Serial)
		k.t.Fatalf("%v\nserial from %d:\n%s\nNICs: %+v", err, off, b[min(off, int64(len(b))):], k.nics())
	}
}

// reconcile runs one pass and returns its status.
func (k *kataRig) reconcile() reconcile.Status {
	k.t.Helper()
	if err := k.r.Reconcile(k.ctx, k.sandbox.ID); err != nil {
		k.t.Fatal(err)
	}
	return k.r.Status()[0]
}

// nics lists the VM's NICs through the second monitor.
func (k *kataRig) nics() []qmp.NICInfo {
	k.t.Helper()
	c, err := qmp.Dial(k.ctx, k.vm.TestQMP, qmp.Options{})
	if err != nil {
		k.t.Fatal(err)
	}
	defer c.Close()
	nics, err := c.ListNICs(k.ctx)
	if err != nil {
		k.t.Fatal(err)
	}
	return nics
}

// oneNICPerMAC fails when the VM holds a twin NIC, or lacks one.
func (k *kataRig) oneNICPerMAC(macs ...net.HardwareAddr) []qmp.NICInfo {
	k.t.Helper()
	nics := k.nics()
	for _, mac := range macs {
		if n := len(slices.DeleteFunc(slices.Clone(nics), func(n qmp.NICInfo) bool { return n.MAC.String() != mac.String() })); n != 1 {
			k.t.Errorf("%d NICs with MAC %s, want 1: %+v", n, mac, nics)
		}
	}
	return nics
}

func skippedLink(t *testing.T, st reconcile.Status, name string) reconcile.Skipped {
	t.Helper()
	i := slices.IndexFunc(st.Skipped, func(s reconcile.Skipped) bool { return s.Link.Name == name })
	if i < 0 {
		t.Fatalf("%s not among the skipped links %+v", name, st.Skipped)
	}
	return st.Skipped[i]
}

// TestKataWiring reproduces Kata's real wiring beside tapsync: a link Kata
// cold-plugged is adopted (no twin NIC, nothing of ours made for it);
// with Kata's filter deleted it is reported broken, still without a
// twin, and repaired only when RepairAdopted is set; a Kata-style hot-add
// of tap1_kata after one of ours does not collide with our tap; teardown
// unplugs ours first, leaves Kata's alone, and deletes a tap whose unplug
// the guest does not acknowledge only once QEMU has exited.
func TestKataWiring(t *testing.T) {
	k := newKataRig(t)
	eth0, net1, net2 := testvm.TestMAC(1), testvm.TestMAC(2), testvm.TestMAC(3)
	k.addLink("eth0", eth0)
	off := k.vm.SerialOffset()
	k.kataWire("eth0", 0, 1)
	k.waitUp(off, eth0)
	pingable(t, k.host, testvm.GuestIP(eth0))

	// Adopted: nothing of ours, no second NIC.
	st := k.reconcile()
	if s := skippedLink(t, st, "eth0"); !s.Adopted || s.Broken || st.Mutations != 0 {
		t.Errorf("Kata's eth0: %+v, %d mutations; want adopted, intact, nothing done", s, st.Mutations)
	}
	if taps, _ := k.n.Taps(); len(taps) != 0 {
		t.Errorf("tapsync made taps for an adopted link: %v", taps)
	}
	k.oneNICPerMAC(eth0)

	// Kata's filter on eth0 deleted: broken, reported, never a twin.
	testnet.Run(t, "tc", "-n", k.sb.Name, "filter", "del", "dev", "eth0", "ingress", "prio", "49152")
	for range 2 {
		st = k.reconcile()
		s := skippedLink(t, st, "eth0")
		if !s.Adopted || !s.Broken || !strings.Contains(s.Reason, "redirect eth0→tap0_kata") || st.Mutations != 0 {
			t.Errorf("after Kata's filter went: %+v, %d mutations; want reported broken, nothing done", s, st.Mutations)
		}
	}
	k.oneNICPerMAC(eth0)
	if taps, _ := k.n.Taps(); len(taps) != 0 {
		t.Errorf("tapsync made taps for a broken adopted link: %v", taps)
	}

	// Repaired once allowed: our redirects join eth0 and Kata's tap.
	k.sandbox.RepairAdopted = true
	k.set()
	if st = k.reconcile(); st.Mutations != 1 {
		t.Errorf("repair made %d mutations, want 1", st.Mutations)
	}
	pingable(t, k.host, testvm.GuestIP(eth0))
	st = k.reconcile()
	if s := skippedLink(t, st, "eth0"); s.Broken || st.Mutations != 0 {
		t.Errorf("after repair: %+v, %d mutations", s, st.Mutations)
	}
	k.oneNICPerMAC(eth0)

	// One of ours, then a Kata-style hot-add of tap1_kata: no collision.
	k.addLink("net1", net1)
	off = k.vm.SerialOffset()
	if st = k.reconcile(); st.Mutations == 0 || len(st.Endpoints) != 1 {
		t.Fatalf("net1 not wired: %+v", st)
	}
	k.waitUp(off, net1)
	if tp := tapOf(t, k.n, st.Endpoints[0].Index); tp.Name != datapath.TapName(st.Endpoints[0].Index) || strings.HasSuffix(tp.Name, "_kata") {
		t.Errorf("our tap is named %s", tp.Name)
	}
	k.addLink("net2", net2)
	off = k.vm.SerialOffset()
	k.kataWire("net2", 1, 2)
	k.waitUp(off, net2)
	st = k.reconcile()
	if s := skippedLink(t, st, "net2"); !s.Adopted || s.Broken || st.Mutations != 0 {
		t.Errorf("Kata's net2: %+v, %d mutations", s, st.Mutations)
	}
	k.oneNICPerMAC(eth0, net1, net2)
	for _, mac := range []net.HardwareAddr{eth0, net1, net2} {
		pingable(t, k.host, testvm.GuestIP(mac))
	}

	// Teardown while QEMU answers: our NIC unplugged, then our tap; Kata's
	// objects stay.
	if err := k.r.Teardown(k.ctx, k.sandbox.ID); err != nil {
		t.Fatal(err)
	}
	nics := k.oneNICPerMAC(eth0, net2)
	if slices.ContainsFunc(nics, func(n qmp.NICInfo) bool { return n.Owned || n.MAC.String() == net1.String() }) {
		t.Errorf("our NIC left after teardown: %+v", nics)
	}
	if taps, _ := k.n.Taps(); len(taps) != 0 {
		t.Errorf("our taps left after teardown: %v", taps)
	}
	if kata, _ := k.n.KataLinks(); len(kata) != 2 {
		t.Errorf("Kata's taps after teardown: %v, want tap0_kata and tap1_kata", kata)
	}
	pingable(t, k.host, testvm.GuestIP(net2))

	// Teardown while the guest cannot acknowledge (paused): the tap waits
	// for QEMU to exit.
	k.sandbox.RepairAdopted, k.sandbox.UnplugTimeout = false, 2*time.Second
	k.set()
	off = k.vm.SerialOffset()
	k.reconcile()
	k.waitUp(off, net1)
	rawQMP(t, k.vm.TestQMP, []rawCmd{{`{"execute":"stop"}`, nil}})
	err := k.r.Teardown(k.ctx, k.sandbox.ID)
	if !errors.Is(err, reconcile.ErrTeardownWaiting) {
		t.Fatalf("teardown under a paused guest = %v, want ErrTeardownWaiting", err)
	}
	if taps, _ := k.n.Taps(); len(taps) != 1 {
		t.Fatalf("taps %v: want ours kept while QEMU holds it", taps)
	}
	if err := k.vm.Stop(); err != nil {
		t.Logf("stopping QEMU: %v", err)
	}
	if err := k.r.Teardown(k.ctx, k.sandbox.ID); err != nil {
		t.Fatalf("teardown after QEMU exited: %v", err)
	}
	if taps, _ := k.n.Taps(); len(taps) != 0 {
		t.Errorf("our taps left after QEMU exited: %v", taps)
	}
	if st, _ := k.n.Observe(datapath.All); slices.ContainsFunc(st.Redirects, func(r datapath.Redirect) bool { return r.Owned && r.FromName == "net1" }) {
		t.Errorf("our redirects left on net1: %v", st.Redirects)
	}
}
