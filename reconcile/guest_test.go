package reconcile

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var errUnimplemented = status.Error(codes.Unimplemented, "AddARPNeighbors not implemented")

var guestOn = Options{Queues: 1, Guest: true}

// podWorld is a sandbox whose eth0 has IPv4 and IPv6 addresses (and a
// link-local one), a default route and a /16 via a gateway.
func podWorld() *world {
	w := newWorld()
	w.guestOn = true
	i := w.addLink("eth0", "veth", macN(1), 1450)
	w.links[0].Addrs = []netip.Prefix{netip.MustParsePrefix("10.1.0.5/24"), netip.MustParsePrefix("fd00::5/64"), netip.MustParsePrefix("fe80::1/64")}
	w.routes = []datapath.Route{
		{Gateway: netip.MustParseAddr("10.1.0.1"), LinkIndex: i},
		{Dst: netip.MustParsePrefix("10.2.0.0/16"), Gateway: netip.MustParseAddr("10.1.0.1"), LinkIndex: i},
		{Dst: netip.MustParsePrefix("fe80::/64"), LinkIndex: i, IPv6: true}, // the guest kernel's own
	}
	return w
}

func guestOps(p Plan) string {
	var s []string
	for _, a := range p.Actions {
		if a.Op >= planner.OpResetGuest {
			s = append(s, a.Op.String())
		}
	}
	return strings.Join(s, " ")
}

func mustConvergeGuest(t *testing.T, w *world) {
	t.Helper()
	if err := w.converge(guestOn); err != nil {
		t.Fatal(err)
	}
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatalf("not converged:\n%s", joinLines(bad))
	}
}

func TestGuestConfiguredAfterPlug(t *testing.T) {
	w := podWorld()
	p, _, err := w.reconcile(guestOn)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := ops(p), "record/0 create-tap/0 add-redirects/0 plug-nic/0 configure-guest/0 update-guest-routes/-1"; got != want {
		t.Errorf("plan = %s\nwant   %s", got, want)
	}
	g := w.guest.iface(macN(1))
	if g == nil || g.Name != "eth0" || g.MTU != 1450 || len(g.Addrs) != 2 {
		t.Fatalf("guest interface = %+v", g)
	}
	if len(w.guest.routes) != 2 || w.guest.routes[0].Dest.IsValid() {
		t.Errorf("guest routes = %+v (want the default route, then the /16)", w.guest.routes)
	}
	mustConvergeGuest(t, w)
	// The action carried the device's PCI path to the agent.
	i := slices.IndexFunc(p.Actions, func(a Action) bool { return a.Op == planner.OpConfigureGuest })
	if p.Actions[i].Guest.DevicePath != "" {
		t.Error("the plan cannot know the PCI path of a NIC it has yet to plug")
	}
}

func TestGuestConvergedMakesNoAgentCalls(t *testing.T) {
	w := podWorld()
	mustConvergeGuest(t, w)
	before := maps2str(w.guest.calls)
	for range 3 {
		p, out, err := w.reconcile(guestOn)
		if err != nil || !p.Empty() || out.Mutations != 0 {
			t.Fatalf("converged pass: plan %q, %d mutations, %v", ops(p), out.Mutations, err)
		}
	}
	// Without the guest's view too: the record alone shows convergence.
	obs := w.observed()
	obs.Guest = nil
	if p := Compute(obs, w.rec, guestOn); !p.Empty() || p.NeedsGuest() {
		t.Errorf("converged, unobserved guest: plan %q", ops(p))
	}
	if after := maps2str(w.guest.calls); after != before {
		t.Errorf("agent calls went from %s to %s", before, after)
	}
}

// A NIC the pass plugs is new to the guest, and so are the routes through
// it: the plan goes ahead without first asking the agent what the guest
// has (two calls before the plug, each a round trip to the VM). A record
// that lost its digests still asks (TestGuestAlreadyConfiguredIsConfirmed).
func TestGuestNotAskedBeforeAPlug(t *testing.T) {
	w := podWorld()
	if p := Compute(w.observed(), w.rec, guestOn); p.NeedsGuest() {
		t.Errorf("first plug of eth0: plan %q asks the guest first", ops(p))
	}
	mustConvergeGuest(t, w)
	j := w.addLink("net1", "veth", macN(2), 1500)
	w.links[len(w.links)-1].Addrs = []netip.Prefix{netip.MustParsePrefix("10.9.0.5/24")}
	w.routes = append(w.routes, datapath.Route{Dst: netip.MustParsePrefix("10.9.0.0/24"), LinkIndex: j})
	p := Compute(w.observed(), w.rec, guestOn)
	if !strings.Contains(ops(p), "plug-nic/1 configure-guest/1 update-guest-routes/-1") || p.NeedsGuest() {
		t.Errorf("net1 added: plan %q, asks the guest first: %v", ops(p), p.NeedsGuest())
	}
	// An address added to a wired link can be in the guest already.
	w = podWorld()
	mustConvergeGuest(t, w)
	w.links[0].Addrs = append(w.links[0].Addrs, netip.MustParsePrefix("10.1.0.6/24"))
	if p := Compute(w.observed(), w.rec, guestOn); !p.NeedsGuest() {
		t.Errorf("address added to eth0: plan %q does not ask the guest", ops(p))
	}
}

// CNI gives a new link its address and routes a moment after making it.
// When they come while the NIC is being plugged, the same pass sends them
// to the guest with one configuration of the interface. When CNI is
// slower than the guest and sets them after the interface was configured,
// the pass configures it again before the routes (a route via net1's
// gateway is unreachable while the guest's net1 has no address). Either
// way the next pass has nothing to do.
func TestGuestGetsWhatCNISetDuringThePass(t *testing.T) {
	for _, tc := range []struct {
		name       string
		cniSetsNow func(a Action, link int) bool // after which step CNI sets the address
		configures int
		mutations  int
	}{
		{"during the plug", func(a Action, link int) bool { return a.Op == planner.OpPlugNIC && a.Endpoint.LinkIfindex == link }, 1, 5},
		{"after the configure", func(a Action, link int) bool {
			return a.Op == planner.OpConfigureGuest && a.Endpoint.LinkIfindex == link && len(a.Guest.Addrs) == 0
		}, 2, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := podWorld()
			mustConvergeGuest(t, w)
			j := w.addLink("net1", "veth", macN(2), 1500) // no address yet
			p := w.plan(guestOn)
			env := w.env()
			env.AfterAction = func(a Action) {
				if tc.cniSetsNow(a, j) {
					w.links[len(w.links)-1].Addrs = []netip.Prefix{netip.MustParsePrefix("10.9.0.5/24")}
					w.routes = append(w.routes, datapath.Route{Dst: netip.MustParsePrefix("10.8.0.0/16"), Gateway: netip.MustParseAddr("10.9.0.1"), LinkIndex: j})
				}
			}
			configs := w.guest.calls["UpdateInterface"]
			_, out, err := Apply(context.Background(), p, w.rec, w.observed(), env)
			if err != nil {
				t.Fatalf("plan %q: %v", ops(p), err)
			}
			if n := w.guest.calls["UpdateInterface"] - configs; n != tc.configures {
				t.Errorf("net1 configured %d times in the pass, want %d", n, tc.configures)
			}
			if out.Mutations != tc.mutations {
				t.Errorf("%d mutations, want %d (tap, redirects, plug, configures, routes)", out.Mutations, tc.mutations)
			}
			if g := w.guest.iface(macN(2)); g == nil || !slices.Contains(g.Addrs, netip.MustParsePrefix("10.9.0.5/24")) {
				t.Errorf("guest net1 = %+v, want the address CNI set", g)
			}
			if !slices.ContainsFunc(w.guest.routes, func(r agent.Route) bool { return r.Dest == netip.MustParsePrefix("10.8.0.0/16") }) {
				t.Errorf("guest routes = %+v, want 10.8.0.0/16 via net1", w.guest.routes)
			}
			if p := w.plan(guestOn); !p.Empty() {
				t.Errorf("the next pass: plan %q, want nothing", ops(p))
			}
			mustConvergeGuest(t, w)
		})
	}
}

func maps2str(m map[string]int) string {
	var s []string
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}) {
		s = append(s, k+"="+string(rune('0'+m[k])))
	}
	return strings.Join(s, ",")
}

// A changed interface is configured again, and the routes and neighbours
// through it sent again (the agent takes it down to configure it, and the
// kernel drops them); a changed route set is sent alone.
func TestGuestChangesPushOnlyWhatChanged(t *testing.T) {
	w := neighWorld()
	j := w.addLink("net1", "macvlan", macN(2), 1500)
	w.routes = append(w.routes, datapath.Route{Dst: netip.MustParsePrefix("10.9.0.0/16"), LinkIndex: j})
	mustConvergeGuest(t, w)
	w.links[0].Addrs = append(w.links[0].Addrs, netip.MustParsePrefix("10.1.0.6/24"))
	if p, _, err := w.reconcile(guestOn); err != nil || guestOps(p) != "configure-guest update-guest-routes add-guest-neighbors" {
		t.Errorf("address added: plan %q, %v", guestOps(p), err)
	}
	w.routes = append(w.routes, datapath.Route{Dst: netip.MustParsePrefix("10.3.0.0/16"), Gateway: netip.MustParseAddr("10.1.0.1"), LinkIndex: w.links[0].Ifindex})
	if p, _, err := w.reconcile(guestOn); err != nil || guestOps(p) != "update-guest-routes" {
		t.Errorf("route added: plan %q, %v", guestOps(p), err)
	}
	w.links[1].MTU = 1400
	if p, _, err := w.reconcile(guestOn); err != nil || ops(p) != "fix-tap/1 configure-guest/1 update-guest-routes/-1" {
		t.Errorf("MTU of net1 changed: plan %q, %v (its route sent again, not eth0's neighbour)", ops(p), err)
	}
	mustConvergeGuest(t, w)
}

func TestGuestAlreadyConfiguredIsConfirmed(t *testing.T) {
	w := podWorld()
	mustConvergeGuest(t, w)
	// The record lost what it knew of the guest (set aside, rebuilt).
	for i := range w.rec.Endpoints {
		w.rec.Endpoints[i].Guest = ""
	}
	w.rec.GuestRoutes = ""
	calls := w.guest.calls["UpdateInterface"] + w.guest.calls["UpdateRoutes"]
	p, _, err := w.reconcile(guestOn)
	if err != nil || guestOps(p) != "confirm-guest confirm-guest-routes" {
		t.Errorf("plan %q, %v", ops(p), err)
	}
	if got := w.guest.calls["UpdateInterface"] + w.guest.calls["UpdateRoutes"]; got != calls {
		t.Errorf("%d guest-changing calls for a guest that already matched", got-calls)
	}
	mustConvergeGuest(t, w)
}

func TestReplugReconfiguresTheGuest(t *testing.T) {
	w := podWorld()
	mustConvergeGuest(t, w)
	// Unplugged behind our back: the guest loses the NIC and its routes.
	if err := w.UnplugNIC(context.Background(), 0, true); err != nil {
		t.Fatal(err)
	}
	w.guest.sync()
	p, _, err := w.reconcile(guestOn)
	if err != nil || !strings.HasPrefix(ops(p), "reset-guest/0 plug-nic/0 configure-guest/0 update-guest-routes/-1") {
		t.Errorf("plan %q, %v", ops(p), err)
	}
	mustConvergeGuest(t, w)
}

func TestCrashAfterEveryGuestStep(t *testing.T) {
	base := podWorld()
	mustConvergeGuest(t, base)
	base.UnplugNIC(context.Background(), 0, true)
	base.guest.sync()
	base.links[0].Addrs = base.links[0].Addrs[:1]
	p := Compute(base.observed(), base.rec, guestOn)
	for k := 0; k <= len(p.Actions); k++ {
		w := base.clone()
		if _, _, err := Apply(context.Background(), Plan{Actions: p.Actions[:k]}, w.rec, w.observed(), w.env()); err != nil {
			t.Fatal(err)
		}
		mustConvergeGuest(t, w)
	}
}

func TestGuestSlowToFindItsLink(t *testing.T) {
	w := podWorld()
	w.guest.slow = 2 // found on the third try, within the wait
	if _, _, err := w.reconcile(guestOn); err != nil {
		t.Fatal(err)
	}
	mustConvergeGuest(t, w)

	// A link the guest never finds: that endpoint waits, with a clear
	// error; the other endpoint and its routes go ahead.
	w = podWorld()
	j := w.addLink("net1", "macvlan", macN(2), 1500)
	w.routes = append(w.routes, datapath.Route{Dst: netip.MustParsePrefix("10.9.0.0/16"), LinkIndex: j})
	w.guest.slow = 1000
	_, out, err := w.reconcile(guestOn)
	if !errors.Is(err, ErrGuestLinkMissing) || !errors.Is(out.Failed[0], ErrGuestLinkMissing) {
		t.Fatalf("err = %v, failed = %v; want ErrGuestLinkMissing", err, out.Failed)
	}
	if out.GuestFailed {
		t.Error("a guest still looking for its NIC was taken for a broken connection")
	}
	if len(w.guest.routes) != 0 {
		t.Errorf("routes sent through interfaces the guest could not configure: %+v", w.guest.routes)
	}
	w.guest.slow = 0
	mustConvergeGuest(t, w)
}

func TestGuestOffPlansNoGuestSteps(t *testing.T) {
	w := podWorld()
	w.guestOn = false
	if err := w.converge(Options{Queues: 1}); err != nil {
		t.Fatal(err)
	}
	if n := len(w.guest.calls); n != 0 {
		t.Errorf("guest off, yet %d agent methods were called", n)
	}
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatal(joinLines(bad))
	}
}

func TestAdoptedLinksRoutesAndNeighbours(t *testing.T) {
	w := podWorld()
	w.kataColdPlug("eth0", 0)
	g := w.guest.dev(macN(1))
	g.iface, g.up = planner.DesiredInterface(w.links[0]), true // Kata configured its own NIC at boot, and its routes
	for _, r := range w.routes {
		if r.LinkIndex == w.links[0].Ifindex {
			w.guest.routes = append(w.guest.routes, guestRoute(r, "eth0"))
		}
	}
	w.neighbors = []datapath.Neighbor{{IP: netip.MustParseAddr("10.1.0.1"), MAC: macN(9), LinkIndex: w.links[0].Ifindex, State: 0x80}}
	w.guest.noNeigh = true
	p, _, err := w.reconcile(guestOn)
	if err != nil || guestOps(p) != "confirm-guest-routes add-guest-neighbors" {
		// The routes are Kata's already: confirmed, not pushed.
		t.Errorf("plan %q, %v", ops(p), err)
	}
	if w.guest.calls["UpdateInterface"] != 0 {
		t.Error("tapsync configured Kata's own guest interface")
	}
	// An agent without AddARPNeighbors is told once.
	if p, _, err := w.reconcile(guestOn); err != nil || !p.Empty() {
		t.Errorf("second pass: plan %q, %v", ops(p), err)
	}
	// Routes on the adopted link reach the guest when they change.
	w.routes = append(w.routes, datapath.Route{Dst: netip.MustParsePrefix("10.7.0.0/16"), Gateway: netip.MustParseAddr("10.1.0.1"), LinkIndex: w.links[0].Ifindex})
	if p, _, err := w.reconcile(guestOn); err != nil || guestOps(p) != "update-guest-routes" {
		t.Errorf("route added on adopted link: plan %q, %v", ops(p), err)
	}
	if !slices.ContainsFunc(w.guest.routes, func(r agent.Route) bool { return r.Device == "eth0" && r.Dest.String() == "10.7.0.0/16" }) {
		t.Errorf("guest routes %+v lack 10.7.0.0/16 dev eth0", w.guest.routes)
	}
}

func TestGuestActionStrings(t *testing.T) {
	w := podWorld()
	p := Compute(w.observed(), w.rec, guestOn)
	s := p.String()
	for _, want := range []string{"configure guest interface eth0 (02:54:53:00:00:01): 10.1.0.5/24 fd00::5/64, mtu 1450",
		"set the guest's routes (2): 0.0.0.0/0 via 10.1.0.1 dev eth0; 10.2.0.0/16 via 10.1.0.1 dev eth0"} {
		if !strings.Contains(s, want) {
			t.Errorf("plan\n%s\nlacks %q", s, want)
		}
	}
}
