//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
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
	res, err := r.cni.Add(ctx, n, "pod", r.pod.Path, "net1")
	if err != nil {
		t.Fatalf("CNI ADD: %v", err)
	}
	t.Cleanup(func() { _ = r.cni.Del(context.Background(), n, "pod", r.pod.Path, "net1") })
	var mac net.HardwareAddr
	for _, i := range res.Interfaces {
		if i.Name == "net1" && i.Sandbox != "" {
			mac, _ = net.ParseMAC(i.Mac)
		}
	}
	if mac == nil {
		t.Fatalf("CNI result names no net1 in the pod: %+v", res.Interfaces)
	}
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
	r.d.stop(syscall.SIGTERM)
	store, err := state.Open(r.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	rec := reconcile.New(store)
	defer rec.Close()
	if _, err := rec.Register(reconcile.Sandbox{ID: "pod", Netns: r.pod.Path, QMP: r.vm.QMP, Model: reconcile.ModelMacvtap}, reconcile.SourceConfig); err != nil {
		t.Fatal(err)
	}
	tctx := zerolog.New(zerolog.NewTestWriter(t)).WithContext(t.Context())
	eventually(t, "teardown done", func() string {
		if err := rec.Teardown(tctx, "pod"); err != nil {
			return err.Error()
		}
		return ""
	})
	l = r.podLink("net1")
	if !bytes.Equal(l.MAC, mac) || !slices.Contains(l.Addrs, addr) {
		t.Errorf("pod's net1 after teardown = %s with %v; want %s with %s back", l.MAC, l.Addrs, mac, addr)
	}
	ns := openNetns(t, r.pod.Path)
	defer ns.Close()
	hs, err := ns.Observe()
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
