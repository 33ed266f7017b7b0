//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestMacvtapModel: a network added by a real CNI plugin to a running VM
// pod whose sandbox uses the macvtap model. The daemon puts a macvtap on
// the container link carrying the link's MAC, moves the link's addresses
// away, plugs the NIC on the macvtap's queues, and the guest's agent gives
// the guest NIC the link's name, addresses and routes: the node pings the
// guest. When the pod ends (the reconciler's teardown, as on a task exit)
// the macvtap goes and the container link is given back exactly its MAC,
// addresses and default route.
func TestMacvtapModel(t *testing.T) {
	r := newGuestRig(t, func(vm *testvm.VM) string { return vm.Agent }, `model = "macvtap"`)
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()
	sub := testcni.Subnet4()
	n := testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), sub)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	born := bornMAC(t, r.pod.Path, "net1")
	res, err := r.cni.Add(ctx, n, "pod", r.pod.Path, "net1")
	if err != nil {
		t.Fatalf("CNI ADD: %v", err)
	}
	t.Cleanup(func() { _ = r.cni.Del(context.Background(), n, "pod", r.pod.Path, "net1") })
	mac := born(ctx) // the MAC the guest must get
	a, _ := netip.AddrFromSlice(res.IPs[0].Address.IP)
	ones, _ := res.IPs[0].Address.Mask.Size()
	addr := netip.PrefixFrom(a.Unmap(), ones)

	g := r.guestIface(mac, "is net1 with "+addr.String(), func(i agent.Interface) bool {
		return i.Name == "net1" && sameAddrs(i.Addrs, []netip.Prefix{addr})
	})
	r.waitGuestRoutes("default via " + testcni.Gateway(sub).String() + " dev net1")
	st := r.converged(time.Time{})
	eps := st["endpoints"].([]any)
	if len(eps) != 1 || eps[0].(map[string]any)["kind"] != state.KindMacvtap || eps[0].(map[string]any)["tap"] != "tsm0" {
		t.Fatalf("endpoints %v, want one macvtap endpoint on tsm0", eps)
	}
	l := r.podLink("net1")
	if !bytes.Equal(l.MAC, datapath.HostMAC(mac, 0)) || len(globalAddrs(l.Addrs)) != 0 {
		t.Errorf("pod's net1 = %s with %v while lent; want the host MAC %s and no address", l.MAC, l.Addrs, datapath.HostMAC(mac, 0))
	}
	if g.MTU != l.MTU {
		t.Errorf("guest MTU %d, link MTU %d", g.MTU, l.MTU)
	}
	r.pingFromNode(addr.Addr())

	// The pod ends: the daemon lets go, the teardown runs as on a task exit.
	r.teardown(reconcile.ModelMacvtap)
	l = r.podLink("net1")
	if !bytes.Equal(l.MAC, mac) || !slices.Contains(l.Addrs, addr) {
		t.Errorf("pod's net1 after teardown = %s with %v; want %s with %s back", l.MAC, l.Addrs, mac, addr)
	}
	ns := openNetns(t, r.pod.Path)
	defer ns.Close()
	hs, err := ns.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs.Macvtaps) != 0 {
		t.Errorf("macvtaps left: %v", hs.Macvtaps)
	}
	if !slices.ContainsFunc(hs.Routes, func(rt datapath.Route) bool {
		return !rt.Dst.IsValid() && rt.Gateway == testcni.Gateway(sub) && rt.LinkIndex == l.Ifindex
	}) {
		t.Errorf("pod's default route via %s not given back: %v", testcni.Gateway(sub), hs.Routes)
	}
	// The pod's own stack answers on its address again.
	r.pingFromNode(addr.Addr())
}

func globalAddrs(as []netip.Prefix) []netip.Prefix {
	return slices.DeleteFunc(slices.Clone(as), func(a netip.Prefix) bool { return a.Addr().IsLinkLocalUnicast() })
}

// podIP runs ip -n <pod> args.
func (r *guestRig) podIP(args ...string) {
	r.t.Helper()
	testnet.IP(r.t, append([]string{"-n", r.pod.Name}, args...)...)
}

// strictARP makes the pod's own stack answer ARP only for addresses on
// the interface a request came in on. The guest's address is also on the
// pod's tap or macvtap link (the CNI put it there, the agent copied it):
// with the kernel's default (arp_ignore=0) the bridge or the macvtap's
// lower device would answer for it with its own MAC, and traffic meant
// for the guest would end in the pod's stack.
func (r *guestRig) strictARP() {
	r.t.Helper()
	testnet.Run(r.t, "ip", "netns", "exec", r.pod.Name, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
}

// nodeLeg makes a veth pair from the pod (podName, up, created with
// extra `ip link add` arguments such as "master br0") to the node netns,
// whose end gets addr; it returns the node end's name.
func (r *guestRig) nodeLeg(podName string, addr netip.Prefix, extra ...string) string {
	r.t.Helper()
	node := testcni.UniqueName("leg")
	args := append([]string{"-n", r.pod.Name, "link", "add", "name", podName}, extra...)
	testnet.IP(r.t, append(args, "type", "veth", "peer", "name", node, "netns", r.cni.Node.Name)...)
	testnet.IP(r.t, "-n", r.cni.Node.Name, "addr", "add", addr.String(), "dev", node)
	testnet.IP(r.t, "-n", r.cni.Node.Name, "link", "set", node, "up")
	r.podIP("link", "set", podName, "up")
	return node
}

// nodeNeighbor is the MAC the node resolved addr to, "" if none.
func (r *guestRig) nodeNeighbor(addr netip.Addr) string {
	r.t.Helper()
	// Equivalent to: ip -n <node> -j neigh show <addr>
	out := testnet.IP(r.t, "-n", r.cni.Node.Name, "-j", "neigh", "show", addr.String())
	var ns []struct {
		Lladdr string `json:"lladdr"`
	}
	if err := json.Unmarshal([]byte(out), &ns); err != nil {
		r.t.Fatalf("ip neigh output %q: %v", out, err)
	}
	if len(ns) == 0 {
		return ""
	}
	return ns[0].Lladdr
}

// guestPing makes the guest ping addr with size bytes of payload and DF
// set, and says whether a reply came within a few seconds.
func (r *guestRig) guestPing(addr netip.Addr, size int) error {
	r.t.Helper()
	var err error
	r.withoutProbe(func() {
		ctx, cancel := context.WithTimeout(r.t.Context(), 5*time.Second)
		defer cancel()
		err = r.vm.GuestPing(ctx, addr, size, true)
	})
	return err
}

// qmpNICs lists the VM's NICs through the test's own QMP monitor.
func (r *guestRig) qmpNICs() []qmp.NICInfo {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(r.t.Context(), 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, r.vm.TestQMP, qmp.Options{})
	if err != nil {
		r.t.Fatal(err)
	}
	defer c.Close()
	nics, err := c.ListNICs(ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	return nics
}

// nicsWithMAC are the VM's NICs carrying mac.
func nicsWithMAC(nics []qmp.NICInfo, mac net.HardwareAddr) []qmp.NICInfo {
	return slices.DeleteFunc(slices.Clone(nics), func(n qmp.NICInfo) bool { return !bytes.Equal(n.MAC, mac) })
}

// teardown stops the daemon and runs the reconciler's teardown of the
// sandbox, as on a task exit.
func (r *guestRig) teardown(model string) {
	r.t.Helper()
	r.d.stop(syscall.SIGTERM)
	store, err := state.Open(r.stateDir)
	if err != nil {
		r.t.Fatal(err)
	}
	rec := reconcile.New(store)
	defer rec.Close()
	if _, err := rec.Register(reconcile.Sandbox{ID: "pod", Netns: r.pod.Path, QMP: r.vm.QMP, Model: model}, reconcile.SourceConfig); err != nil {
		r.t.Fatal(err)
	}
	ctx := zerolog.New(zerolog.NewTestWriter(r.t)).WithContext(r.t.Context())
	eventually(r.t, "teardown done", func() string {
		if err := rec.Teardown(ctx, "pod"); err != nil {
			return err.Error()
		}
		return ""
	})
}

// endpointOf is the one endpoint in status st, failing unless there is
// exactly one of kind on device dev.
func endpointOf(t *testing.T, st map[string]any, kind, dev string) map[string]any {
	t.Helper()
	eps := st["endpoints"].([]any)
	if len(eps) != 1 || eps[0].(map[string]any)["kind"] != kind || eps[0].(map[string]any)["tap"] != dev {
		t.Fatalf("endpoints %v, want one %s endpoint on %s", eps, kind, dev)
	}
	return eps[0].(map[string]any)
}

// TestTapLink: a tap a CNI made in the pod (as the reference tap plugin
// does with its bridge option: a port of a bridge in the pod, the
// address on the tap) is handed to QEMU as it is. The node reaches the
// pod's bridge through a veth. The guest NIC carries the tap's MAC, so
// the bridge must not keep that MAC as its own: a bridge makes each
// port's MAC a local fdb entry and would take every frame for the guest
// to its own stack; the test deletes the entry (what such a CNI must do,
// or give the tap another MAC than the guest's). The guest's address
// comes from the tap through the agent, the node pings the guest and
// resolves its address to the guest's MAC, the bridge's veth port is not
// wired, and the tap is never deleted: not when its MAC changes (the NIC
// is re-plugged), not at teardown.
func TestTapLink(t *testing.T) {
	r := newGuestRig(t, func(vm *testvm.VM) string { return vm.Agent }, "")
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()
	sub := testcni.Subnet4()
	gw := netip.PrefixFrom(testcni.Gateway(sub), sub.Bits())
	addr := netip.PrefixFrom(gw.Addr().Next(), sub.Bits())
	mac := testvm.TestMAC(21)
	r.strictARP()
	r.podIP("link", "add", "name", "br0", "address", testvm.TestMAC(22).String(), "type", "bridge")
	r.podIP("link", "set", "br0", "up")
	r.nodeLeg("up0", gw, "master", "br0")
	// Equivalent to what the tap plugin does: ip tuntap add dev tap0 mode
	// tap; ip link set tap0 address <mac> master br0; ip addr add … dev tap0.
	r.podIP("tuntap", "add", "dev", "tap0", "mode", "tap")
	ifindex := r.podLink("tap0").Ifindex
	r.podIP("link", "set", "tap0", "address", mac.String(), "master", "br0")
	testnet.Run(t, "ip", "netns", "exec", r.pod.Name, "bridge", "fdb", "del", mac.String(), "dev", "tap0", "master")
	r.podIP("addr", "add", addr.String(), "dev", "tap0")
	r.podIP("link", "set", "tap0", "up")

	r.guestIface(mac, "has "+addr.String(), func(i agent.Interface) bool {
		return i.Name == "tap0" && sameAddrs(i.Addrs, []netip.Prefix{addr})
	})
	st := r.converged(time.Time{})
	endpointOf(t, st, state.KindTapLink, "tap0")
	r.pingFromNode(addr.Addr())
	if n := r.nodeNeighbor(addr.Addr()); n != mac.String() {
		t.Errorf("the node resolved %s to %q, want the guest's %s: not the guest answering", addr.Addr(), n, mac)
	}
	if err := r.guestPing(gw.Addr(), 56); err != nil {
		t.Errorf("guest → node: %v", err)
	}
	if nics := nicsWithMAC(r.qmpNICs(), mac); len(nics) != 1 {
		t.Errorf("NICs with the tap's MAC: %+v, want one", nics)
	}

	// The CNI changes the tap's MAC: the NIC is re-plugged with it, the tap stays.
	mac2 := testvm.TestMAC(23)
	r.podIP("link", "set", "tap0", "address", mac2.String())
	testnet.Run(t, "ip", "netns", "exec", r.pod.Name, "bridge", "fdb", "del", mac2.String(), "dev", "tap0", "master")
	r.guestIface(mac2, "is tap0 with "+addr.String(), func(i agent.Interface) bool {
		return i.Name == "tap0" && sameAddrs(i.Addrs, []netip.Prefix{addr})
	})
	r.waitNoGuestIface(mac)
	r.converged(time.Time{})
	testnet.IP(t, "-n", r.cni.Node.Name, "neigh", "flush", "to", addr.Addr().String())
	r.pingFromNode(addr.Addr())
	if l := r.podLink("tap0"); l.Ifindex != ifindex {
		t.Errorf("tap0 is ifindex %d, was %d: the CNI's tap was re-created", l.Ifindex, ifindex)
	}

	r.teardown(reconcile.ModelTCFilter)
	if nics := r.qmpNICs(); len(nics) != 0 {
		t.Errorf("NICs left after teardown: %+v", nics)
	}
	if l := r.podLink("tap0"); l.Ifindex != ifindex || !bytes.Equal(l.MAC, mac2) || !slices.Contains(l.Addrs, addr) {
		t.Errorf("tap0 after teardown = %v with %v; want the CNI's tap (ifindex %d, %s, %s) as it was", l, l.Addrs, ifindex, mac2, addr)
	}
}

// TestMacvtapLink: a macvtap a CNI made in the pod on a veth to the node
// (not ours, not Kata's) is handed to QEMU through its /dev/tap<ifindex>
// queues; its lower veth is not wired. The guest gets the macvtap's
// address through the agent and the node pings it.
func TestMacvtapLink(t *testing.T) {
	r := newGuestRig(t, func(vm *testvm.VM) string { return vm.Agent }, "")
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()
	sub := testcni.Subnet4()
	gw := netip.PrefixFrom(testcni.Gateway(sub), sub.Bits())
	addr := netip.PrefixFrom(gw.Addr().Next(), sub.Bits())
	mac := testvm.TestMAC(24)
	r.strictARP()
	r.nodeLeg("vp0", gw)
	// Equivalent to: ip link add link vp0 name mvt0 address <mac> type macvtap mode bridge
	r.podIP("link", "add", "link", "vp0", "name", "mvt0", "address", mac.String(), "type", "macvtap", "mode", "bridge")
	r.podIP("addr", "add", addr.String(), "dev", "mvt0")
	r.podIP("link", "set", "mvt0", "up")
	ifindex := r.podLink("mvt0").Ifindex

	r.guestIface(mac, "is mvt0 with "+addr.String(), func(i agent.Interface) bool {
		return i.Name == "mvt0" && sameAddrs(i.Addrs, []netip.Prefix{addr})
	})
	st := r.converged(time.Time{})
	endpointOf(t, st, state.KindMacvtapLink, "mvt0")
	r.pingFromNode(addr.Addr())
	if n := r.nodeNeighbor(addr.Addr()); n != mac.String() {
		t.Errorf("the node resolved %s to %q, want the guest's %s: not the guest answering", addr.Addr(), n, mac)
	}
	if err := r.guestPing(gw.Addr(), 56); err != nil {
		t.Errorf("guest → node: %v", err)
	}
	if nics := r.qmpNICs(); len(nics) != 1 || !bytes.Equal(nics[0].MAC, mac) {
		t.Errorf("NICs %+v, want one with the macvtap's MAC %s", nics, mac)
	}

	r.teardown(reconcile.ModelTCFilter)
	if nics := r.qmpNICs(); len(nics) != 0 {
		t.Errorf("NICs left after teardown: %+v", nics)
	}
	if l := r.podLink("mvt0"); l.Ifindex != ifindex || !bytes.Equal(l.MAC, mac) || !slices.Contains(l.Addrs, addr) {
		t.Errorf("mvt0 after teardown = %v with %v; want the CNI's macvtap (ifindex %d, %s, %s) as it was", l, l.Addrs, ifindex, mac, addr)
	}
}

// nodePeer is the name of the node end of the pod's veth ifname.
func (r *guestRig) nodePeer(ifname string) string {
	r.t.Helper()
	var pod []struct {
		LinkIndex int `json:"link_index"`
	}
	out := testnet.IP(r.t, "-n", r.pod.Name, "-j", "link", "show", ifname)
	if err := json.Unmarshal([]byte(out), &pod); err != nil || len(pod) != 1 || pod[0].LinkIndex == 0 {
		r.t.Fatalf("pod's %s: no veth peer in %q (%v)", ifname, out, err)
	}
	var node []struct {
		Ifindex int    `json:"ifindex"`
		Ifname  string `json:"ifname"`
	}
	out = testnet.IP(r.t, "-n", r.cni.Node.Name, "-j", "link", "show")
	if err := json.Unmarshal([]byte(out), &node); err != nil {
		r.t.Fatal(err)
	}
	for _, l := range node {
		if l.Ifindex == pod[0].LinkIndex {
			return l.Ifname
		}
	}
	r.t.Fatalf("no link %d in the node netns for the pod's %s", pod[0].LinkIndex, ifname)
	return ""
}

// setMTU sets mtu on the pod's ifname, its node peer and the node's bridge.
func (r *guestRig) setMTU(ifname, bridge string, mtu int) {
	r.t.Helper()
	m := fmt.Sprint(mtu)
	peer := r.nodePeer(ifname)
	r.podIP("link", "set", ifname, "mtu", m)
	testnet.IP(r.t, "-n", r.cni.Node.Name, "link", "set", peer, "mtu", m)
	testnet.IP(r.t, "-n", r.cni.Node.Name, "link", "set", bridge, "mtu", m)
}

// TestLinkChanges: a CNI bridge network's link in a running VM pod
// changes its MTU and its MAC. A lower MTU reaches the guest interface
// through the agent on the same NIC: DF echoes of the new size pass both
// ways, one of the old size fails. An MTU above the one the NIC was
// plugged with re-plugs it (the guest driver's maximum is host_mtu): the
// large size passes. A new MAC re-plugs the NIC with it, with never two
// NICs of one MAC in the VM, and traffic flows again.
func TestLinkChanges(t *testing.T) {
	r := newGuestRig(t, func(vm *testvm.VM) string { return vm.Agent }, "")
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()
	sub := testcni.Subnet4()
	gw := testcni.Gateway(sub)
	bridge := testcni.UniqueName("br")
	addrs := r.add(testcni.Bridge(testcni.UniqueName("net"), bridge, sub), "net1")
	addr := addrs[0].Addr()
	mac := r.podLink("net1").MAC
	r.guestIface(mac, "is net1 at MTU 1500", func(i agent.Interface) bool {
		return i.Name == "net1" && i.MTU == 1500 && sameAddrs(i.Addrs, addrs)
	})
	r.converged(time.Time{})
	r.pingFromNode(addr)
	nic := nicsWithMAC(r.qmpNICs(), mac)
	if len(nic) != 1 {
		t.Fatalf("NICs with %s: %+v", mac, nic)
	}

	t.Run("MTU lowered", func(t *testing.T) {
		r.setMTU("net1", bridge, 1400)
		r.guestIface(mac, "is at MTU 1400", func(i agent.Interface) bool { return i.MTU == 1400 })
		r.converged(time.Time{})
		// 1372 bytes of payload + 8 ICMP + 20 IP = 1400.
		r.pingFromNode(addr, "-M", "do", "-s", "1372")
		if err := r.guestPing(gw, 1372); err != nil {
			t.Errorf("guest → node, DF at 1400: %v", err)
		}
		if err := r.guestPing(gw, 1472); err == nil {
			t.Error("guest → node, DF at 1500 passed at MTU 1400")
		}
		if now := nicsWithMAC(r.qmpNICs(), mac); len(now) != 1 || now[0].ID != nic[0].ID {
			t.Errorf("NICs with %s: %+v, want the same device %s: a lower MTU re-plugged", mac, now, nic[0].ID)
		}
	})
	t.Run("MTU raised above the plugged one", func(t *testing.T) {
		r.setMTU("net1", bridge, 9000)
		r.guestIface(mac, "is at MTU 9000", func(i agent.Interface) bool { return i.MTU == 9000 && sameAddrs(i.Addrs, addrs) })
		r.converged(time.Time{})
		now := nicsWithMAC(r.qmpNICs(), mac)
		if len(now) != 1 || now[0].ID == nic[0].ID {
			t.Errorf("NICs with %s: %+v, want one new device (was %s)", mac, now, nic[0].ID)
		}
		r.pingFromNode(addr, "-M", "do", "-s", "8972")
		if err := r.guestPing(gw, 8972); err != nil {
			t.Errorf("guest → node, DF at 9000: %v", err)
		}
	})
	t.Run("MAC changed", func(t *testing.T) {
		mac2 := testvm.TestMAC(25)
		r.podIP("link", "set", "net1", "address", mac2.String())
		eventually(t, "the guest's net1 carries "+mac2.String(), func() string {
			nics := r.qmpNICs()
			for _, n := range nics {
				if d := nicsWithMAC(nics, n.MAC); len(d) > 1 {
					t.Fatalf("two NICs with MAC %s: %+v", n.MAC, d)
				}
			}
			ifs, err := r.probe.ListInterfaces(t.Context())
			if err != nil {
				return err.Error()
			}
			var have []string
			ok := false
			for _, i := range ifs {
				have = append(have, fmt.Sprintf("%s %s %v", i.Name, i.MAC, i.Addrs))
				if bytes.Equal(i.MAC, mac) {
					return "the old MAC is still there: " + strings.Join(have, ", ")
				}
				ok = ok || (bytes.Equal(i.MAC, mac2) && i.Name == "net1" && sameAddrs(i.Addrs, addrs))
			}
			if !ok {
				return "guest has " + strings.Join(have, ", ")
			}
			return ""
		})
		r.converged(time.Time{})
		// The guest's kernel announces nothing when its address appears
		// on a new NIC: the node forgets the old MAC, as a gratuitous ARP
		// from a migrating VM would make it.
		testnet.IP(t, "-n", r.cni.Node.Name, "neigh", "flush", "to", addr.String())
		r.pingFromNode(addr)
		if n := r.nodeNeighbor(addr); n != mac2.String() {
			t.Errorf("the node resolved %s to %q, want %s", addr, n, mac2)
		}
		if err := r.guestPing(gw, 56); err != nil {
			t.Errorf("guest → node: %v", err)
		}
	})
}

// inNetns runs f on a thread in the netns at path: sockets f makes stay
// there. f must not start goroutines.
func inNetns(path string, f func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer target.Close()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		// The thread stays in the wrong netns: it dies with the goroutine.
		return errors.Join(ferr, fmt.Errorf("leave netns %s: %w", path, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// streams measures one TCP stream out of the guest (from guest to the
// node's gw) and one into it, each for dur.
func (r *guestRig) streams(guest, gw netip.Addr, dur time.Duration) (out, in testvm.TCPResult) {
	r.t.Helper()
	var ln net.Listener
	if err := inNetns(r.cni.Node.Path, func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(gw, 0).String())
		return err
	}); err != nil {
		r.t.Fatal(err)
	}
	defer ln.Close()
	dial := func(ctx context.Context, to netip.AddrPort) (c net.Conn, err error) {
		err = inNetns(r.cni.Node.Path, func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, "tcp", to.String())
			return err
		})
		return c, err
	}
	r.withoutProbe(func() {
		out = r.measure("out of the guest", dur, func(ctx context.Context) (testvm.TCPResult, error) {
			return r.vm.GuestTCPSend(ctx, guest, ln, dur)
		})
		in = r.measure("into the guest", dur, func(ctx context.Context) (testvm.TCPResult, error) {
			return r.vm.GuestTCPReceive(ctx, netip.AddrPortFrom(guest, 0), dur, dial)
		})
	})
	return out, in
}

// measure runs one stream of dur with its own time budget; a failure
// fails the test.
func (r *guestRig) measure(what string, dur time.Duration, stream func(context.Context) (testvm.TCPResult, error)) testvm.TCPResult {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(r.t.Context(), dur+time.Minute)
	defer cancel()
	res, err := stream(ctx)
	if err != nil {
		r.t.Fatalf("%s: %v", what, err)
	}
	return res
}

// TestRateLimits: rx_rate and tx_rate on a [[sandbox]] (tcfilter model)
// limit TCP streams through the real guest in both directions to within
// ±15 % of the limit (TCPResult counts payload, HTB frames: about 4.5 %
// apart at MTU 1500); a new limit by config reload (SIGHUP) is measured
// too and changes only the limit (same QEMU device, no plug in the
// daemon's log); without limits the streams are at least 5× faster.
func TestRateLimits(t *testing.T) {
	const first, second = 20e6, 10e6
	r := newGuestRig(t, func(vm *testvm.VM) string { return vm.Agent }, "rx_rate = 20000000\ntx_rate = 20000000\n")
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()
	sub := testcni.Subnet4()
	gw := testcni.Gateway(sub)
	addrs := r.add(testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), sub), "net1")
	guest := addrs[0].Addr()
	mac := r.podLink("net1").MAC
	r.guestIface(mac, "is net1 with "+fmt.Sprint(addrs), func(i agent.Interface) bool {
		return i.Name == "net1" && sameAddrs(i.Addrs, addrs)
	})
	r.converged(time.Time{})
	r.pingFromNode(guest)
	measureRates(t, r, guest, gw, mac, first, second)
}

// measureRates streams through the guest at the rig's limits (first),
// after a reload to second, and after a reload without limits.
func measureRates(t *testing.T, r *guestRig, guest, gw netip.Addr, mac net.HardwareAddr, first, second float64) {
	const dur = 4 * time.Second
	nic := nicsWithMAC(r.qmpNICs(), mac)
	if len(nic) != 1 {
		t.Fatalf("NICs with %s: %+v", mac, nic)
	}
	within := func(what string, res testvm.TCPResult, rate float64) {
		t.Helper()
		dev := res.BitsPerSec()/rate - 1
		t.Logf("%s, limit %.0f Mbit/s: %v (%+.1f %%)", what, rate/1e6, res, dev*100)
		if math.Abs(dev) > 0.15 {
			t.Errorf("%s: %v, %+.1f %% off the limit %.0f Mbit/s", what, res, dev*100, rate/1e6)
		}
	}
	reload := func(body string, rx, tx float64) {
		t.Helper()
		b, err := os.ReadFile(r.config)
		if err != nil {
			t.Fatal(err)
		}
		i := strings.Index(string(b), "rx_rate")
		if i < 0 {
			i = len(b)
		}
		if err := os.WriteFile(r.config, append(b[:i:i], body...), 0o600); err != nil {
			t.Fatal(err)
		}
		before := time.Now()
		mark := r.d.mark()
		r.d.cmd.Process.Signal(syscall.SIGHUP)
		eventually(t, "status shows the new limits", func() string {
			st := r.status("pod")
			if have, _ := st["rx_rate"].(float64); have != rx {
				return fmt.Sprintf("rx_rate %v", st["rx_rate"])
			}
			if have, _ := st["tx_rate"].(float64); have != tx {
				return fmt.Sprintf("tx_rate %v", st["tx_rate"])
			}
			return ""
		})
		r.converged(before)
		r.d.mu.Lock()
		for _, m := range r.d.log[mark:] {
			if m["action"] == "plug-nic" || m["action"] == "unplug-nic" {
				t.Errorf("a rate change re-plugged: %v", m)
			}
		}
		r.d.mu.Unlock()
		if now := nicsWithMAC(r.qmpNICs(), mac); len(now) != 1 || now[0].ID != nic[0].ID {
			t.Errorf("NICs with %s: %+v, want the same device %s", mac, now, nic[0].ID)
		}
	}

	out, in := r.streams(guest, gw, dur)
	within("out of the guest (tx)", out, first)
	within("into the guest (rx)", in, first)

	reload("rx_rate = 10000000\ntx_rate = 10000000\n", second, second)
	out, in = r.streams(guest, gw, dur)
	within("out of the guest (tx)", out, second)
	within("into the guest (rx)", in, second)

	reload("", 0, 0)
	out, in = r.streams(guest, gw, dur)
	t.Logf("unlimited: out of the guest %v, into it %v", out, in)
	for what, res := range map[string]testvm.TCPResult{"out of the guest": out, "into the guest": in} {
		if res.BitsPerSec() < 5*first {
			t.Errorf("%s without limits: %v, want at least %.0f Mbit/s", what, res, 5*first/1e6)
		}
	}
}

// TestMacvtapRateLimits is TestRateLimits for the macvtap model: rx
// through the ifb tsi0 that the container link's ingress is redirected
// to (what arrives for the macvtap passes no egress qdisc of the pod),
// tx on the container link's egress (what the guest writes, the macvtap
// sends through its lower device). Status carries no "not applied"
// note; after the limits are removed no ifb, filter or HTB is left.
func TestMacvtapRateLimits(t *testing.T) {
	const first, second = 20e6, 10e6
	r := newGuestRig(t, func(vm *testvm.VM) string { return vm.Agent }, "model = \"macvtap\"\nrx_rate = 20000000\ntx_rate = 20000000\n")
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()
	sub := testcni.Subnet4()
	gw := testcni.Gateway(sub)
	n := testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), sub)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	born := bornMAC(t, r.pod.Path, "net1")
	res, err := r.cni.Add(ctx, n, "pod", r.pod.Path, "net1")
	if err != nil {
		t.Fatalf("CNI ADD: %v", err)
	}
	t.Cleanup(func() { _ = r.cni.Del(context.Background(), n, "pod", r.pod.Path, "net1") })
	mac := born(ctx) // the MAC the guest must get
	a, _ := netip.AddrFromSlice(res.IPs[0].Address.IP)
	ones, _ := res.IPs[0].Address.Mask.Size()
	addr := netip.PrefixFrom(a.Unmap(), ones)
	r.guestIface(mac, "is net1 with "+addr.String(), func(i agent.Interface) bool {
		return i.Name == "net1" && sameAddrs(i.Addrs, []netip.Prefix{addr})
	})
	st := r.converged(time.Time{})
	endpointOf(t, st, state.KindMacvtap, "tsm0")
	if notes, _ := st["notes"].([]any); len(notes) != 0 {
		t.Errorf("status notes %v, want none", notes)
	}
	limits := func() []datapath.RateLimitOn {
		ns := openNetns(t, r.pod.Path)
		defer ns.Close()
		ls, err := ns.RateLimits()
		if err != nil {
			t.Fatal(err)
		}
		return ls
	}
	net1 := r.podLink("net1").Ifindex
	want := []datapath.RateLimitOn{{Ifindex: net1, Name: "net1", BPS: first}, {Ifindex: net1, Name: "net1", BPS: first, Ingress: true, Ifb: 0}}
	if got := limits(); !slices.Equal(got, want) {
		t.Errorf("limits in the pod %+v, want %+v", got, want)
	}
	r.pingFromNode(addr.Addr())
	measureRates(t, r, addr.Addr(), gw, mac, first, second)
	if got := limits(); len(got) != 0 {
		t.Errorf("limits left after removal: %+v", got)
	}
	if out := testnet.Run(t, "ip", "-n", r.pod.Name, "-br", "link"); strings.Contains(out, "tsi") {
		t.Errorf("ifb left in the pod:\n%s", out)
	}
}

// bornMAC starts watching the links of the netns at path and returns a
// function that waits, until ctx ends, for the first message about ifname
// and gives the MAC it carries: the MAC the link was made (or moved in)
// with. The plugin may read the link's MAC back after the daemon has lent
// it away (the macvtap model), so a CNI result's MAC is not that one.
func bornMAC(t *testing.T, path, ifname string) func(context.Context) net.HardwareAddr {
	t.Helper()
	h, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	done := make(chan struct{})
	updates := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{Namespace: &h}); err != nil {
		t.Fatalf("watch links in %s: %v", path, err)
	}
	t.Cleanup(func() {
		close(done)
		for range updates { // a watch blocked on a full channel ends too
		}
	})
	return func(ctx context.Context) net.HardwareAddr {
		t.Helper()
		for {
			select {
			case u, ok := <-updates:
				if !ok {
					t.Fatalf("link watch in %s ended before %s appeared", path, ifname)
				}
				if a := u.Link.Attrs(); u.Header.Type == unix.RTM_NEWLINK && a.Name == ifname {
					return a.HardwareAddr
				}
			case <-ctx.Done():
				t.Fatalf("no link %s appeared in %s: %v", ifname, path, ctx.Err())
			}
		}
	}
}
