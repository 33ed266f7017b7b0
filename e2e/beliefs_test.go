//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
)

// offLink is an address of the node netns outside every pod subnet: the
// guest reaches it only through its default route, via the gateway.
var offLink = netip.MustParseAddr("192.0.2.1")

// offLinkRig is a guest rig with one bridge network, net1, whose gateway
// is the node; the node also answers on offLink. It returns the link's
// gateway.
func offLinkRig(t *testing.T, top string) (*guestRig, netip.Addr) {
	r := newGuestRigTop(t, func(vm *testvm.VM) string { return vm.Agent }, top, "")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	})
	// Equivalent to: ip -n <node> addr add 192.0.2.1/32 dev lo
	testnet.IP(t, "-n", r.cni.Node.Name, "addr", "add", offLink.String()+"/32", "dev", "lo")
	sub := testcni.Subnet4()
	addrs := r.add(testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), sub), "net1")
	r.guestIface(r.podLink("net1").MAC, "is net1 with "+fmt.Sprint(addrs), func(i agent.Interface) bool {
		return i.Name == "net1" && sameAddrs(i.Addrs, addrs)
	})
	gw := testcni.Gateway(sub)
	r.waitGuestRoutes("default via " + gw.String() + " dev net1")
	r.converged(time.Time{})
	r.guestPingOffLink()
	return r, gw
}

// guestPingOffLink has the guest ping offLink until it answers or a
// minute passes.
func (r *guestRig) guestPingOffLink() {
	r.t.Helper()
	r.withoutProbe(func() {
		var err error
		deadline := time.Now().Add(time.Minute)
		for time.Now().Before(deadline) {
			ctx, cancel := context.WithTimeout(r.t.Context(), 5*time.Second)
			err = r.vm.GuestPing(ctx, offLink, 56, false)
			cancel()
			if err == nil {
				return
			}
		}
		r.t.Fatalf("the guest cannot reach %s through its default route: %v", offLink, err)
	})
}

// endpointGuest is the guest state of sandbox "pod"'s endpoints, by link.
func (r *guestRig) endpointGuest() map[string]string {
	r.t.Helper()
	out := map[string]string{}
	st := r.status("pod")
	if st == nil {
		return out
	}
	eps, _ := st["endpoints"].([]any)
	for _, e := range eps {
		m := e.(map[string]any)
		g, _ := m["guest"].(string)
		out[fmt.Sprint(m["link"])] = g
	}
	return out
}

// A link whose MAC changes gets a new NIC (a new endpoint): the guest's
// old device goes with its routes, and the new one must get them again
// although their text (device net1) is the same. Measured by a ping from
// the guest to an address off its link, through the gateway.
func TestGuestDefaultRouteSurvivesMACChange(t *testing.T) {
	r, gw := offLinkRig(t, "")
	old := r.podLink("net1").MAC
	mac := net.HardwareAddr{0x02, 0x54, 0x53, 0x77, 0x00, 0x02}
	before := time.Now()
	// Equivalent to: ip -n <pod> link set net1 address 02:54:53:77:00:02
	testnet.IP(t, "-n", r.pod.Name, "link", "set", "net1", "address", mac.String())
	r.waitNoGuestIface(old)
	r.guestIface(mac, "is net1", func(i agent.Interface) bool { return i.Name == "net1" })
	r.converged(before)
	r.waitGuestRoutes("default via " + gw.String() + " dev net1")
	r.guestPingOffLink()
}

// A guest that reboots (QMP system_reset) comes back with its NICs and
// nothing configured on them; the RESET makes tapsync drop what it knew
// of the guest, status says so while the guest boots, and the guest is
// configured again. A workload flushing the guest interface's addresses
// is found by the periodic verify pass, which asks the agent and repairs.
func TestGuestRepairedAfterResetAndFlush(t *testing.T) {
	r, gw := offLinkRig(t, `resync_interval = "2s"`)
	ctx := t.Context()
	mac := r.podLink("net1").MAC
	addrs := r.guestIface(mac, "is net1", func(i agent.Interface) bool { return i.Name == "net1" }).Addrs

	// The guest reboots.
	{
		c, err := qmp.Dial(ctx, r.vm.TestQMP, qmp.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		mark := r.d.mark()
		off := r.vm.SerialOffset()
		r.withoutProbe(func() {
			// testvm runs QEMU with -no-reboot, which turns a reset into
			// an exit; a guest reboot needs the reset action back.
			for _, cmd := range []string{
				`{"execute": "set-action", "arguments": {"reboot": "reset"}}`,
				`{"execute": "system_reset"}`,
			} {
				if _, err := c.Run([]byte(cmd)); err != nil {
					t.Fatalf("%s: %v", cmd, err)
				}
			}
			seen := ""
			eventually(t, "status says the guest is unverified after the reset", func() string {
				g := r.endpointGuest()["net1"]
				if strings.HasPrefix(g, "unverified") && strings.Contains(g, "guest reset") {
					seen = g
					return ""
				}
				return "net1 guest " + g
			})
			t.Logf("status while the guest rebooted: %s", seen)
			// The probe dials again once the guest is up: a request
			// written while it boots waits for its agent, longer than a
			// call's timeout on a loaded machine (failed once so).
			rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			if _, err := r.vm.WaitSerialFrom(rctx, off, testvm.ReadyRE()); err != nil {
				t.Fatalf("guest after the reset: %v", err)
			}
		})
		r.d.waitLogAfter(mark, "what tapsync knew of the guest is unverified", nil)
		r.guestIface(mac, "is net1 again", func(i agent.Interface) bool { return i.Name == "net1" && len(i.Addrs) > 0 })
		r.waitGuestRoutes("default via " + gw.String() + " dev net1")
		r.converged(time.Time{})
		r.guestPingOffLink()
	}

	// A workload flushes the guest interface's addresses.
	{
		l := r.podLink("net1")
		mark := r.d.mark()
		// A workload with CAP_NET_ADMIN in the guest: ip addr flush dev net1.
		if _, err := r.probe.UpdateInterface(ctx, agent.Interface{Name: "net1", MAC: l.MAC, MTU: l.MTU}); err != nil {
			t.Fatal(err)
		}
		r.d.waitLogAfter(mark, "configure guest interface net1", nil)
		r.guestIface(mac, "has its addresses again", func(i agent.Interface) bool { return sameAddrs(i.Addrs, globalAddrs(addrs)) })
		r.waitGuestRoutes("default via " + gw.String() + " dev net1")
		r.guestPingOffLink()
		if g := r.endpointGuest()["net1"]; g != "configured" {
			t.Errorf("net1 guest %q after the repair", g)
		}
	}
}
