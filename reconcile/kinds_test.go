package reconcile

// This file runs every endpoint kind through its plans, the replay and
// crash tests and its teardown in the fake world: one block of cases per
// kind.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// macvtapWorld is a sandbox in the macvtap model with eth0 (an address
// and a default route from its CNI), fully wired.
func macvtapWorld() *world {
	w := newWorld()
	w.model = ModelMacvtap
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addAddr("eth0", "10.1.0.5/24", "10.1.0.1")
	w.addAddr("eth0", "fe80::54:53ff:fe00:1/64", "")
	if err := w.converge(Options{}); err != nil {
		panic(err)
	}
	return w
}

func TestPlanKinds(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func() *world
		want  string // the first plan
		check func(t *testing.T, w *world)
	}{
		{"macvtap model: record, macvtap, plug", func() *world {
			w := newWorld()
			w.model = ModelMacvtap
			w.addLink("eth0", "veth", macN(1), 1500)
			w.addAddr("eth0", "10.1.0.5/24", "10.1.0.1")
			return w
		}, "record/0 ensure-macvtap/0 plug-nic/0", func(t *testing.T, w *world) {
			e, _ := w.rec.Endpoint(0)
			if e.Kind != state.KindMacvtap || !slices.Equal(planner.MovedAddrs(e), []netip.Prefix{netip.MustParsePrefix("10.1.0.5/24")}) || len(e.Moved.Routes) != 1 {
				t.Errorf("record %+v (moved %+v), want the address and route moved", e, e.Moved)
			}
			if n := w.nics[0]; n.MAC.String() != macN(1).String() {
				t.Errorf("NIC MAC %s, want the link's own %s", n.MAC, macN(1))
			}
		}},
		{"macvtap model converged plans nothing", macvtapWorld, "", nil},
		{"macvtap model: link gone, its macvtap with it", func() *world {
			w := macvtapWorld()
			w.delLink("eth0")
			return w
		}, "mark-removing/0 unplug-nic/0 forget/0", nil},
		{"macvtap model: MTU change fixes the macvtap only", func() *world {
			w := macvtapWorld()
			w.links[0].MTU = 1400
			return w
		}, "ensure-macvtap/0", nil},
		{"macvtap model: an address added to the lent link is recorded, then moved", func() *world {
			w := macvtapWorld()
			w.addAddr("eth0", "10.2.0.5/24", "")
			return w
		}, "ensure-macvtap/0", func(t *testing.T, w *world) {
			if e, _ := w.rec.Endpoint(0); !slices.Contains(planner.MovedAddrs(e), netip.MustParsePrefix("10.2.0.5/24")) {
				t.Errorf("moved %v lacks the new address", e.Moved.Addrs)
			}
		}},
		{"macvtap model: the link's MAC changed by hand: new NIC with it, link keeps the new MAC", func() *world {
			w := macvtapWorld()
			w.setMAC("eth0", macN(9))
			return w
		}, "mark-removing/0 unplug-nic/0 remove-macvtap/0 restore-link/0 forget/0", func(t *testing.T, w *world) {
			if len(w.rec.Endpoints) != 1 || w.rec.Endpoints[0].LinkMAC != macN(9).String() {
				t.Errorf("endpoints %+v, want one for eth0 with its new MAC", w.rec.Endpoints)
			}
		}},
		{"macvtap model: macvtap deleted under the NIC: re-made under a new index", func() *world {
			w := macvtapWorld()
			delete(w.macvtaps, 0)
			return w
		}, "mark-removing/0 unplug-nic/0 restore-link/0 forget/0", nil},
		{"macvtap model: ipvlan shares its parent's MAC, wired by tcfilter", func() *world {
			w := newWorld()
			w.model = ModelMacvtap
			w.addLink("eth0", "ipvlan", macN(1), 1500)
			return w
		}, "record/0 create-tap/0 add-redirects/0 plug-nic/0", nil},
		{"ipvlan is wired by tcfilter", func() *world {
			w := newWorld()
			w.addLink("eth0", "ipvlan", macN(1), 1500)
			return w
		}, "record/0 create-tap/0 add-redirects/0 plug-nic/0", nil},
		{"model changed under a live endpoint: nothing re-plugged", func() *world {
			w := wired(false)
			w.model = ModelMacvtap
			return w
		}, "", nil},
		{"tap link: handed to QEMU, no tap of ours, no redirect", func() *world {
			w := newWorld()
			w.addLink("tap0", "tap", macN(1), 1500)
			return w
		}, "record/0 plug-nic/0", func(t *testing.T, w *world) {
			if len(w.taps) != 0 || len(w.redirs) != 0 {
				t.Errorf("taps %v, redirects %v: want none", w.taps, w.redirs)
			}
		}},
		{"tap link removed from the record's view: unplugged, never deleted", func() *world {
			w := newWorld()
			w.addLink("tap0", "tap", macN(1), 1500)
			w.converge(Options{})
			w.setMAC("tap0", macN(2))
			return w
		}, "mark-removing/0 unplug-nic/0 forget/0 record/1 plug-nic/1", func(t *testing.T, w *world) {
			if !slices.ContainsFunc(w.links, func(l datapath.Link) bool { return l.Name == "tap0" }) {
				t.Error("the CNI's tap was deleted")
			}
		}},
		{"a bridge's veth port is the pod's plumbing; a tap port of it is the VM's device", func() *world {
			w := newWorld()
			br := w.addLink("br0", "bridge", macN(8), 1500)
			w.addLink("up0", "veth", macN(9), 1500)
			w.addLink("tap0", "tap", macN(1), 1500)
			w.links[1].Master, w.links[2].Master = br, br
			return w
		}, "record/0 plug-nic/0", func(t *testing.T, w *world) {
			if e, _ := w.rec.Endpoint(0); e.LinkName != "tap0" {
				t.Errorf("endpoint for %s, want tap0", e.LinkName)
			}
			p := Compute(w.observed(), w.rec, w.options(Options{}))
			if i := slices.IndexFunc(p.Skipped, func(s Skipped) bool { return s.Link.Name == "up0" }); i < 0 || !strings.Contains(p.Skipped[i].Reason, "port of bridge br0") {
				t.Errorf("skipped %+v, want up0 reported as a port of bridge br0", p.Skipped)
			}
		}},
		{"a wired link made a bridge port: its endpoint goes", func() *world {
			w := wired(false)
			br := w.addLink("br0", "bridge", macN(8), 1500)
			w.links[0].Master = br
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0", nil},
		{"the lower device of a macvtap link is not wired; the macvtap is", func() *world {
			w := newWorld()
			lower := w.addLink("vp0", "veth", macN(9), 1500)
			w.addLink("mvt0", "macvtap", macN(1), 1500)
			w.links[1].Parent = lower
			return w
		}, "record/0 plug-nic/0", func(t *testing.T, w *world) {
			if e, _ := w.rec.Endpoint(0); e.LinkName != "mvt0" {
				t.Errorf("endpoint for %s, want mvt0", e.LinkName)
			}
		}},
		{"macvtap link: its queues handed to QEMU", func() *world {
			w := newWorld()
			w.addLink("mvt0", "macvtap", macN(1), 1500)
			return w
		}, "record/0 plug-nic/0", nil},
		{"rate limits: rx on the tap, tx on the link, before the plug", func() *world {
			w := newWorld()
			w.rxRate, w.txRate = 8_000_000, 4_000_000
			w.addLink("eth0", "veth", macN(1), 1500)
			return w
		}, "record/0 create-tap/0 add-redirects/0 set-rate-limit/0 set-rate-limit/0 plug-nic/0", nil},
		{"rate changed: only the limits change", func() *world {
			w := newWorld()
			w.rxRate, w.txRate = 8_000_000, 4_000_000
			w.addLink("eth0", "veth", macN(1), 1500)
			w.converge(Options{})
			w.rxRate = 16_000_000
			return w
		}, "set-rate-limit/0", nil},
		{"rate removed: limits removed, NIC untouched", func() *world {
			w := newWorld()
			w.rxRate, w.txRate = 8_000_000, 4_000_000
			w.addLink("eth0", "veth", macN(1), 1500)
			w.converge(Options{})
			w.rxRate, w.txRate = 0, 0
			return w
		}, "set-rate-limit/0 set-rate-limit/0", nil},
		{"endpoint re-made on a limited link: the link's limit stays", func() *world {
			w := newWorld()
			w.txRate = 4_000_000
			w.addLink("eth0", "veth", macN(1), 1500)
			w.converge(Options{})
			w.rec.Endpoints[0].LinkMAC = macN(7).String() // as if re-created
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1", nil},
		{"macvtap model: rx through an ifb from the link's ingress, tx on the link's egress, before the plug", func() *world {
			w := newWorld()
			w.model, w.rxRate, w.txRate = ModelMacvtap, 8_000_000, 4_000_000
			w.addLink("eth0", "veth", macN(1), 1500)
			return w
		}, "record/0 ensure-macvtap/0 set-rate-limit/0 set-rate-limit/0 plug-nic/0", func(t *testing.T, w *world) {
			eth0 := w.link("eth0").Ifindex
			if w.limits[eth0] != 4_000_000 || w.ifbs[0] != (fakeIfb{from: eth0, bps: 8_000_000}) {
				t.Errorf("limits %v, ifbs %v; want tx 4M on eth0, rx 8M from eth0 through tsi0", w.limits, w.ifbs)
			}
		}},
		{"macvtap model: limits removed, ifb goes, NIC untouched", func() *world {
			w := newWorld()
			w.model, w.rxRate, w.txRate = ModelMacvtap, 8_000_000, 4_000_000
			w.addLink("eth0", "veth", macN(1), 1500)
			w.converge(Options{})
			w.rxRate, w.txRate = 0, 0
			return w
		}, "set-rate-limit/0 set-rate-limit/0", func(t *testing.T, w *world) {
			if len(w.limits) != 0 || len(w.ifbs) != 0 {
				t.Errorf("limits %v, ifbs %v left", w.limits, w.ifbs)
			}
		}},
		{"macvtap link: rx through an ifb from its ingress, tx on its egress", func() *world {
			w := newWorld()
			w.rxRate, w.txRate = 8_000_000, 4_000_000
			w.addLink("mvt0", "macvtap", macN(1), 1500)
			return w
		}, "record/0 set-rate-limit/0 set-rate-limit/0 plug-nic/0", nil},
		{"tap link: tx through an ifb from its ingress", func() *world {
			w := newWorld()
			w.txRate = 4_000_000
			w.addLink("tap0", "tap", macN(1), 1500)
			return w
		}, "record/0 set-rate-limit/0 plug-nic/0", func(t *testing.T, w *world) {
			if tap0 := w.link("tap0").Ifindex; w.ifbs[0] != (fakeIfb{from: tap0, bps: 4_000_000}) || len(w.limits) != 0 {
				t.Errorf("limits %v, ifbs %v; want tx 4M from tap0 through tsi0", w.limits, w.ifbs)
			}
		}},
		{"an ifb nothing feeds (a crash before the filter) is completed", func() *world {
			w := newWorld()
			w.model, w.rxRate = ModelMacvtap, 8_000_000
			w.addLink("eth0", "veth", macN(1), 1500)
			w.converge(Options{})
			w.ifbs[0] = fakeIfb{bps: 8_000_000}
			return w
		}, "set-rate-limit/0", nil},
		{"an ifb of no endpoint goes", func() *world {
			w := wired(false)
			w.ifbs[5] = fakeIfb{bps: 8_000_000}
			return w
		}, "set-rate-limit/5", nil},
		{"tap link: rx on the link itself", func() *world {
			w := newWorld()
			w.rxRate = 8_000_000
			w.addLink("tap0", "tap", macN(1), 1500)
			return w
		}, "record/0 set-rate-limit/0 plug-nic/0", nil},
		{"MTU raised above the NIC's host_mtu: a new NIC", func() *world {
			w := wired(false)
			w.links[0].MTU = 9000
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1", nil},
		{"MTU lowered: the tap only (the guest follows through its agent)", func() *world {
			w := wired(false)
			w.links[0].MTU = 1400
			return w
		}, "fix-tap/0", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := tc.setup()
			p := Compute(w.observed(), w.rec, w.options(Options{}))
			if got := ops(p); got != tc.want {
				t.Errorf("plan:\n got %s\nwant %s\n%s", got, tc.want, p)
			}
			mustConverge(t, w, 1)
			if tc.check != nil {
				tc.check(t, w)
			}
		})
	}
}

func TestMacvtapTeardownRestoresTheLink(t *testing.T) {
	w := macvtapWorld()
	if l := w.link("eth0"); len(l.Addrs) != 0 || l.MAC.String() == macN(1).String() {
		t.Fatalf("wired eth0 = %+v, want no addresses and the host MAC", l)
	}
	p, _, err := w.teardown(false)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := ops(p), "mark-removing/0 unplug-nic/0 remove-macvtap/0 restore-link/0 forget/0"; got != want {
		t.Errorf("teardown plan %s, want %s", got, want)
	}
	l := w.link("eth0")
	if l.MAC.String() != macN(1).String() || len(l.Addrs) != 2 || len(w.routes) != 1 || len(w.macvtaps) != 0 || len(w.rec.Endpoints) != 0 {
		t.Errorf("after teardown eth0 = %+v, routes %v, macvtaps %v, record %+v", l, w.routes, w.macvtaps, w.rec.Endpoints)
	}
	if len(w.unsafe) > 0 {
		t.Error(joinLines(w.unsafe))
	}
}

func TestTeardownRemovesLimits(t *testing.T) {
	w := newWorld()
	w.rxRate, w.txRate = 8_000_000, 4_000_000
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addLink("tap0", "tap", macN(2), 1500)
	mustConverge(t, w, 1)
	if len(w.limits) != 3 || len(w.ifbs) != 1 {
		t.Fatalf("limits %v, ifbs %v; want rx on tsn0 and tap0, tx on eth0 and from tap0 through an ifb", w.limits, w.ifbs)
	}
	if _, _, err := w.teardown(false); err != nil {
		t.Fatal(err)
	}
	if len(w.limits) != 0 || len(w.ifbs) != 0 || len(w.rec.Endpoints) != 0 {
		t.Errorf("after teardown: limits %v, ifbs %v, record %+v", w.limits, w.ifbs, w.rec.Endpoints)
	}
}

// TestRateNotes: every kind tapsync wires carries both limits now, so
// none is named as not applied.
func TestRateNotes(t *testing.T) {
	w := macvtapWorld()
	w.addLink("tap0", "tap", macN(2), 1500)
	w.addLink("mvt0", "macvtap", macN(3), 1500)
	w.rxRate, w.txRate = 8_000_000, 8_000_000
	p := Compute(w.observed(), w.rec, w.options(Options{}))
	if len(p.Notes) != 0 {
		t.Errorf("notes %q, want none", p.Notes)
	}
	mustConverge(t, w, 1)
	if len(w.limits) != 3 || len(w.ifbs) != 3 {
		t.Errorf("limits %v, ifbs %v; want one of each per endpoint", w.limits, w.ifbs)
	}
}

var kindScenarios = []scenario{
	{"macvtap: add two", func() *world {
		w := newWorld()
		w.model = ModelMacvtap
		return w
	}, func(w *world) {
		w.addLink("eth0", "veth", macN(1), 1500)
		w.addAddr("eth0", "10.1.0.5/24", "10.1.0.1")
		w.addLink("net1", "macvlan", macN(2), 9000)
		w.addAddr("net1", "10.2.0.5/24", "")
	}},
	{"macvtap: MAC changed by hand", macvtapWorld, func(w *world) { w.setMAC("eth0", macN(9)) }},
	{"macvtap: address added", macvtapWorld, func(w *world) { w.addAddr("eth0", "10.3.0.5/24", "") }},
	{"macvtap: link gone", macvtapWorld, func(w *world) { w.delLink("eth0") }},
	{"tap and macvtap links with limits", func() *world {
		w := newWorld()
		w.rxRate, w.txRate = 8_000_000, 4_000_000
		return w
	}, func(w *world) {
		w.addLink("tap0", "tap", macN(1), 1500)
		w.addLink("mvt0", "macvtap", macN(2), 1500)
		w.addLink("eth0", "veth", macN(3), 1500)
	}},
	{"macvtap model with limits: add two, one link gone", func() *world {
		w := newWorld()
		w.model, w.rxRate, w.txRate = ModelMacvtap, 8_000_000, 4_000_000
		w.addLink("net1", "veth", macN(2), 1500)
		w.converge(Options{})
		return w
	}, func(w *world) {
		w.addLink("eth0", "veth", macN(1), 1500)
		w.addAddr("eth0", "10.1.0.5/24", "10.1.0.1")
		w.addLink("net2", "macvlan", macN(3), 1500)
		w.delLink("net1")
		w.rxRate = 16_000_000
	}},
	{"limits changed and a link replaced", func() *world {
		w := newWorld()
		w.rxRate, w.txRate = 8_000_000, 4_000_000
		w.addLink("eth0", "veth", macN(1), 1500)
		w.addLink("net1", "veth", macN(2), 1500)
		w.converge(Options{})
		return w
	}, func(w *world) {
		w.rxRate, w.txRate = 0, 16_000_000
		w.delLink("net1")
		w.addLink("net1", "veth", macN(4), 1500)
	}},
}

// TestCrashAfterEveryStepKinds is TestCrashAfterEveryStep for the macvtap
// model, the links that are a VM's device already, and rate limits; and
// for the macvtap model's teardown.
func TestCrashAfterEveryStepKinds(t *testing.T) {
	for _, sc := range kindScenarios {
		base := sc.setup()
		sc.move(base)
		p := Compute(base.observed(), base.rec, base.options(Options{}))
		for k := 0; k <= len(p.Actions); k++ {
			t.Run(fmt.Sprintf("%s/after %d of %d", sc.name, k, len(p.Actions)), func(t *testing.T) {
				w := base.clone()
				untouched := untouchedNICs(w, p)
				if _, _, err := Apply(context.Background(), Plan{Actions: p.Actions[:k]}, w.rec, w.observed(), w.env()); err != nil {
					t.Fatal(err)
				}
				mustConverge(t, w, 1)
				for id, mac := range untouched {
					if !slices.ContainsFunc(w.nics, func(n NIC) bool { return n.ID == id && n.MAC.String() == mac }) {
						t.Errorf("untouched NIC %s was re-plugged or lost", id)
					}
				}
			})
		}
	}
	base := macvtapWorld()
	p := ComputeTeardown(base.observed(), base.rec, false)
	for k := 0; k <= len(p.Actions); k++ {
		t.Run(fmt.Sprintf("macvtap teardown/after %d of %d", k, len(p.Actions)), func(t *testing.T) {
			w := base.clone()
			if _, _, err := Apply(context.Background(), Plan{Actions: p.Actions[:k]}, w.rec, w.observed(), w.env()); err != nil {
				t.Fatal(err)
			}
			if _, _, err := w.teardown(false); err != nil {
				t.Fatal(err)
			}
			l := w.link("eth0")
			if l.MAC.String() != macN(1).String() || len(l.Addrs) != 2 || len(w.routes) != 1 || len(w.macvtaps) != 0 || len(w.rec.Endpoints) != 0 {
				t.Errorf("after teardown eth0 = %+v, routes %v, macvtaps %v, record %+v", l, w.routes, w.macvtaps, w.rec.Endpoints)
			}
			if len(w.unsafe) > 0 {
				t.Error(joinLines(w.unsafe))
			}
		})
	}
}

// TestRandomStateOrderKinds replays link sets of every kind, in both
// models, with changing limits, in random order: any state reaches any
// other cleanly, links are given back exactly, nothing is left behind.
func TestRandomStateOrderKinds(t *testing.T) {
	type linkSpec struct {
		name, kind string
		mac, mtu   int
		addr       string
	}
	states := [][]linkSpec{
		nil,
		{{"eth0", "veth", 1, 1500, "10.1.0.5/24"}},
		{{"eth0", "veth", 1, 1500, "10.1.0.5/24"}, {"net1", "macvlan", 2, 9000, ""}},
		{{"eth0", "veth", 1, 1400, "10.1.0.5/24"}, {"tap0", "tap", 3, 1500, ""}, {"mvt0", "macvtap", 4, 1500, ""}},
		{{"eth0", "veth", 6, 1500, "10.1.0.5/24"}, {"net2", "ipvlan", 5, 1500, ""}},
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 1))
	w := newWorld()
	for i := range 80 {
		if r.IntN(4) == 0 {
			w.model = []string{ModelTCFilter, ModelMacvtap}[r.IntN(2)]
		}
		w.rxRate = []uint64{0, 8_000_000}[r.IntN(2)]
		w.txRate = []uint64{0, 4_000_000}[r.IntN(2)]
		next := states[r.IntN(len(states))]
		for _, l := range slices.Clone(w.links) {
			if !slices.ContainsFunc(next, func(s linkSpec) bool {
				return s.name == l.Name && macN(s.mac).String() == w.orig[l.Ifindex].mac.String()
			}) {
				w.delLink(l.Name)
			}
		}
		for _, s := range next {
			i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == s.name })
			if i < 0 {
				w.addLink(s.name, s.kind, macN(s.mac), s.mtu)
				if s.addr != "" {
					w.addAddr(s.name, s.addr, "")
				}
			} else {
				w.links[i].MTU = s.mtu
			}
		}
		w.hangUnplug = r.IntN(5) == 0
		if err := w.converge(Options{}); err != nil {
			t.Fatalf("step %d (seed %d): %v", i, seed, err)
		}
		if bad := w.checkConverged(1); len(bad) > 0 {
			t.Fatalf("step %d (seed %d) to %v (model %q):\n%s", i, seed, next, w.model, joinLines(bad))
		}
	}
}

func TestKindActionStrings(t *testing.T) {
	w := newWorld()
	w.model, w.rxRate = ModelMacvtap, 8_000_000
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addAddr("eth0", "10.1.0.5/24", "10.1.0.1")
	w.addLink("tap0", "tap", macN(2), 1500)
	p := Compute(w.observed(), w.rec, w.options(Options{}))
	host := datapath.HostMAC(net.HardwareAddr(macN(1)), 0)
	want := []string{
		"record endpoint 0 for eth0 (ifindex 3, 02:54:53:00:00:01, 1 queue, macvtap): new container link eth0",
		"record endpoint 1 for tap0 (ifindex 4, 02:54:53:00:00:02, 1 queue, tap-link): new container link tap0",
		"macvtap tsm0 on eth0 with 02:54:53:00:00:01 (mtu 1500), eth0 takes " + host.String() + " and gives up its addresses",
		"limit rx of endpoint 0 to 8000000 bit/s on eth0's ingress via tsi0: limit is 0 bit/s",
		"hot-add NIC 0 (02:54:53:00:00:01) on tsm0",
		"limit rx of endpoint 1 to 8000000 bit/s on tap0: limit is 0 bit/s",
		"hot-add NIC 1 (02:54:53:00:00:02) on tap0",
	}
	var got []string
	for _, a := range p.Actions {
		got = append(got, a.String())
	}
	if !slices.Equal(got, want) {
		t.Errorf("actions:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestMacvtapGuestGetsWhatTheLinkLent: the guest interface of a macvtap
// endpoint has the link's own MAC, its addresses and its routes, which
// the link no longer shows.
func TestMacvtapGuestGetsWhatTheLinkLent(t *testing.T) {
	w := newWorld()
	w.model, w.guestOn = ModelMacvtap, true
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addAddr("eth0", "10.1.0.5/24", "10.1.0.1")
	if err := w.converge(Options{Guest: true}); err != nil {
		t.Fatal(err)
	}
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatal(joinLines(bad))
	}
	i := w.guest.iface(macN(1))
	if i == nil || i.Name != "eth0" || len(i.Addrs) != 1 || i.Addrs[0].String() != "10.1.0.5/24" {
		t.Fatalf("guest interface %+v, want eth0 with 10.1.0.5/24", i)
	}
	if len(w.guest.routes) != 1 || !w.guest.routes[0].Gateway.IsValid() {
		t.Errorf("guest routes %v, want the default route via 10.1.0.1", w.guest.routes)
	}
	// Steady: nothing more for the agent.
	calls := w.guest.calls["UpdateInterface"] + w.guest.calls["UpdateRoutes"]
	if p, _, _ := w.reconcile(Options{Guest: true}); !p.Empty() || w.guest.calls["UpdateInterface"]+w.guest.calls["UpdateRoutes"] != calls {
		t.Errorf("steady pass planned %s", ops(p))
	}
}

// TestQueueOpeners: every endpoint kind has its queueOpeners entry, and
// every entry is a kind.
func TestQueueOpeners(t *testing.T) {
	names := map[string]bool{}
	for _, kind := range planner.Kinds() {
		names[kind] = true
		if queueOpeners[kind] == nil {
			t.Errorf("kind %q has no entry in queueOpeners", kind)
		}
	}
	for kind := range queueOpeners {
		if !names[kind] {
			t.Errorf("queueOpeners has an entry for %q, which is no kind", kind)
		}
	}
}
