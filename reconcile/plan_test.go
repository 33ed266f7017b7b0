package reconcile

// This file holds the table of plans and the tests that run plans in the
// fake world (random state order, a crash after every step, teardown):
// long, as one table of cases and their replays.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// ops renders a plan compactly: "create-tap/0 add-redirects/0 …".
func ops(p Plan) string {
	var s []string
	for _, a := range p.Actions {
		s = append(s, fmt.Sprintf("%s/%d", a.Op, a.Endpoint.Index))
	}
	return strings.Join(s, " ")
}

func mustConverge(t *testing.T, w *world, queues int) {
	t.Helper()
	if err := w.converge(Options{Queues: queues}); err != nil {
		t.Fatal(err)
	}
	if bad := w.checkConverged(queues); len(bad) > 0 {
		t.Fatalf("not converged:\n%s", joinLines(bad))
	}
}

// wired returns a world with eth0 (and net1 if two) fully wired.
func wired(two bool) *world {
	w := newWorld()
	w.addLink("eth0", "veth", macN(1), 1500)
	if two {
		w.addLink("net1", "macvlan", macN(2), 9000)
	}
	if err := w.converge(Options{}); err != nil {
		panic(err)
	}
	return w
}

func TestPlanTable(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func() *world
		want  string // the first plan
	}{
		{"empty sandbox plans nothing", newWorld, ""},
		{"empty to two endpoints", func() *world {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.addLink("net1", "macvlan", macN(2), 9000)
			return w
		}, "record/0 record/1 create-tap/0 add-redirects/0 plug-nic/0 create-tap/1 add-redirects/1 plug-nic/1"},
		{"converged plans nothing", func() *world { return wired(true) }, ""},
		{"endpoint removed", func() *world {
			w := wired(true)
			w.delLink("eth0")
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0"},
		{"link re-created with a new ifindex", func() *world {
			w := wired(false)
			w.delLink("eth0")
			w.addLink("eth0", "veth", macN(1), 1500)
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1"},
		{"link MAC changed in place", func() *world {
			w := wired(false)
			w.setMAC("eth0", macN(9))
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1"},
		{"MTU change updates the tap only", func() *world {
			w := wired(false)
			w.links[0].MTU = 1400
			return w
		}, "fix-tap/0"},
		{"tap set down by hand: brought up, NIC untouched", func() *world {
			w := wired(false)
			w.taps[0].Up = false
			return w
		}, "fix-tap/0"},
		{"Kata cold-plugged endpoint is adopted", func() *world {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.kataColdPlug("eth0", 0)
			return w
		}, ""},
		{"new link next to an adopted one: Kata's tap0_kata is not our tsn0", func() *world {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.kataColdPlug("eth0", 0)
			w.addLink("net1", "veth", macN(2), 1500)
			return w
		}, "record/0 create-tap/0 add-redirects/0 plug-nic/0"},
		{"Kata's macvtap model: its lower link is adopted, its macvtap is no link", func() *world {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.kataMacvtap("eth0", 0)
			return w
		}, ""},
		{"Kata's filter deleted: reported, no twin NIC", func() *world {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.kataColdPlug("eth0", 0)
			w.kataFilterDel("eth0")
			return w
		}, ""},
		{"Kata-wired link re-created with the same MAC: reported, no twin NIC", func() *world {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.kataColdPlug("eth0", 0)
			w.delLink("eth0")
			w.addLink("eth0", "veth", macN(1), 1500)
			return w
		}, ""},
		{"unsupported and tunnel kinds are skipped", func() *world {
			w := newWorld()
			w.addLink("tun0", "tun", nil, 1500)
			w.addLink("vx0", "vxlan", macN(5), 1450)
			w.addLink("ipip0", "ipip", nil, 1480)
			w.addLink("eth0", "veth", macN(1), 1500)
			return w
		}, "record/0 create-tap/0 add-redirects/0 plug-nic/0"},
		{"half-made: record only", func() *world {
			w := newWorld()
			l := w.link(w.linkName(w.addLink("eth0", "veth", macN(1), 1500)))
			w.rec.Put(state.Endpoint{Index: 0, LinkName: l.Name, LinkIfindex: l.Ifindex, LinkMAC: l.MAC.String(), Queues: 1})
			return w
		}, "create-tap/0 add-redirects/0 plug-nic/0"},
		{"half-made: tap without redirects", func() *world {
			w := wired(false)
			w.redirs = nil
			w.UnplugNIC(context.Background(), 0, true)
			return w
		}, "add-redirects/0 plug-nic/0"},
		{"half-made: redirects without NIC", func() *world {
			w := wired(false)
			w.UnplugNIC(context.Background(), 0, true)
			return w
		}, "plug-nic/0"},
		{"half-made: NIC without tap", func() *world {
			w := wired(false)
			w.RemoveTap(0)
			w.unsafe = nil // the damage done here, not by the plan
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1"},
		{"half-made: netdev without device (still holding the tap)", func() *world {
			w := wired(false)
			w.nics = nil
			return w
		}, "unplug-nic/0 plug-nic/0"},
		{"half-made: tap re-created under a plugged NIC", func() *world {
			w := wired(false)
			w.taps[0].Attached = 0
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1"},
		{"half-made removal: NIC gone, tap and redirects left", func() *world {
			w := wired(false)
			w.delLink("eth0")
			w.rec.Endpoints[0].Removing = true
			w.UnplugNIC(context.Background(), 0, true)
			return w
		}, "remove-redirects/0 delete-tap/0 forget/0"},
		{"half-made removal: only the record left", func() *world {
			w := wired(false)
			w.delLink("eth0")
			w.rec.Endpoints[0].Removing = true
			w.UnplugNIC(context.Background(), 0, true)
			w.RemoveRedirects(0, w.taps[0].Ifindex)
			w.RemoveTap(0)
			return w
		}, "forget/0"},
		{"record lost: recovered from owned objects, nothing re-plugged", func() *world {
			w := wired(true)
			w.rec = state.Record{Version: state.Version, Sandbox: "sb"}
			return w
		}, "record/0 record/1"},
		{"record lost and link gone: owned objects removed", func() *world {
			w := wired(false)
			w.rec = state.Record{Version: state.Version, Sandbox: "sb"}
			w.delLink("eth0")
			return w
		}, "record/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0"},
		{"half-made: tap re-created under a plugged NIC, replacement waits for the old NIC", func() *world {
			w := wired(false)
			w.taps[0].Attached = 0
			w.hangUnplug = true
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := tc.setup()
			p := Compute(w.observed(), w.rec, Options{})
			if got := ops(p); got != tc.want {
				t.Errorf("plan:\n got %s\nwant %s\n%s", got, tc.want, p)
			}
			mustConverge(t, w, 1)
		})
	}
}

func (w *world) linkName(ifindex int) string {
	i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Ifindex == ifindex })
	return w.links[i].Name
}

func TestSkippedLinksAreReported(t *testing.T) {
	w := newWorld()
	w.addLink("tun0", "tun", nil, 1500)
	w.addLink("br0", "bridge", macN(7), 1500)
	w.addLink("ipip0", "ipip", nil, 1480)
	w.addLink("eth0", "veth", macN(1), 1500)
	w.kataColdPlug("eth0", 0)
	p := Compute(w.observed(), w.rec, Options{})
	var got []string
	for _, s := range p.Skipped {
		got = append(got, fmt.Sprintf("%s adopted=%v", s.Link.Name, s.Adopted))
	}
	if want := []string{"tun0 adopted=false", "br0 adopted=false", "eth0 adopted=true"}; !slices.Equal(got, want) {
		t.Errorf("skipped = %v, want %v (tunnels silent)", got, want)
	}
}

func TestSteadyStateMakesNoMutations(t *testing.T) {
	checkSteady(t, wired(true))
}

// checkSteady reconciles a converged world three more times: each pass
// must plan nothing and mutate nothing, and the world must not change.
func checkSteady(t *testing.T, w *world) {
	t.Helper()
	mutations, saves := w.mutations, w.saves
	for range 3 {
		p, out, err := w.reconcile(Options{})
		if err != nil || !p.Empty() || out.Mutations != 0 {
			t.Fatalf("steady reconcile: plan %q, %d mutations, %v", ops(p), out.Mutations, err)
		}
	}
	if w.mutations != mutations || w.saves != saves {
		t.Errorf("steady state changed the world: %d mutations, %d saves", w.mutations-mutations, w.saves-saves)
	}
}

func TestPendingRemovalKeepsIndexAndBlocksNothing(t *testing.T) {
	w := wired(true)
	w.hangUnplug = true
	w.delLink("eth0")
	w.addLink("net2", "veth", macN(3), 1500)
	_, out, err := w.reconcile(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(out.Pending, []int{0}) {
		t.Errorf("pending = %v, want [0]", out.Pending)
	}
	e, ok := w.rec.Endpoint(0)
	if !ok || !e.Removing {
		t.Fatalf("endpoint 0 record = %+v, %v; want kept as removing", e, ok)
	}
	// The new link was wired despite the pending removal, and not on index 0.
	mustConverge(t, w, 1)
	for _, e := range w.rec.Endpoints {
		if e.LinkName == "net2" && e.Index == 0 {
			t.Errorf("net2 took index 0 while its removal is pending")
		}
	}
	// Still pending: the removal's retry is the only thing planned.
	if p := Compute(w.observed(), w.rec, Options{}); ops(p) != "unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0" {
		t.Errorf("plan while pending = %q, want only the unplug retry", ops(p))
	}
	// The guest acknowledges: the removal completes and the index frees up.
	w.hangUnplug = false
	mustConverge(t, w, 1)
	if _, ok := w.rec.Endpoint(0); ok {
		t.Errorf("endpoint 0 still recorded after the unplug completed")
	}
}

func TestFailureIsolatedToItsEndpoint(t *testing.T) {
	w := newWorld()
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addLink("net1", "veth", macN(2), 1500)
	w.failOp, w.failNext = planner.OpPlugNIC, true
	_, _, err := w.reconcile(Options{})
	if err == nil || !strings.Contains(err.Error(), "endpoint 0") {
		t.Fatalf("reconcile = %v, want the injected failure naming endpoint 0", err)
	}
	if !slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Index == 1 }) {
		t.Errorf("endpoint 1 was not plugged after endpoint 0 failed")
	}
	mustConverge(t, w, 1)
}

// scenario moves a world from one link set to another.
type scenario struct {
	name  string
	setup func() *world
	move  func(*world)
}

var scenarios = []scenario{
	{"add two", newWorld, func(w *world) {
		w.addLink("eth0", "veth", macN(1), 1500)
		w.addLink("net1", "macvlan", macN(2), 1500)
	}},
	{"remove one of two", func() *world { return wired(true) }, func(w *world) { w.delLink("eth0") }},
	{"re-create one of two", func() *world { return wired(true) }, func(w *world) {
		w.delLink("net1")
		w.addLink("net1", "macvlan", macN(2), 1500)
	}},
	{"replace and add", func() *world { return wired(true) }, func(w *world) {
		w.delLink("eth0")
		w.addLink("eth0", "veth", macN(4), 1500)
		w.addLink("net3", "veth", macN(5), 1500)
	}},
}

// TestCrashAfterEveryStep stops applying after each step of each plan (a
// crash: the record holds what was saved, the world what was done), then
// lets a fresh reconcile converge. Endpoints not being changed are never
// re-plugged.
func TestCrashAfterEveryStep(t *testing.T) {
	for _, sc := range scenarios {
		base := sc.setup()
		sc.move(base)
		p := Compute(base.observed(), base.rec, Options{})
		for k := 0; k <= len(p.Actions); k++ {
			t.Run(fmt.Sprintf("%s/after %d of %d", sc.name, k, len(p.Actions)), func(t *testing.T) {
				w := base.clone()
				untouched := untouchedNICs(w, p)
				partial := Plan{Actions: p.Actions[:k]}
				if _, _, err := Apply(context.Background(), partial, w.rec, w.observed(), w.env()); err != nil {
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
}

// untouchedNICs are the owned NICs that plan p does not act on.
func untouchedNICs(w *world, p Plan) map[string]string {
	out := map[string]string{}
	for _, n := range w.nics {
		if n.Owned && !slices.ContainsFunc(p.Actions, func(a Action) bool { return a.Endpoint.Index == n.Index }) {
			out[n.ID] = n.MAC.String()
		}
	}
	return out
}

// TestRandomStateOrder replays link sets in random order: any state must
// reach any other cleanly, and each converged state plans nothing.
func TestRandomStateOrder(t *testing.T) {
	type linkSpec struct {
		name string
		mac  int
		mtu  int
	}
	states := [][]linkSpec{
		nil,
		{{"eth0", 1, 1500}},
		{{"eth0", 1, 1500}, {"net1", 2, 9000}},
		{{"eth0", 1, 1400}, {"net1", 2, 9000}, {"net2", 3, 1500}},
		{{"net1", 2, 9000}},
		{{"eth0", 6, 1500}, {"net2", 3, 1500}}, // eth0 with another MAC: a new link
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 0))
	w := newWorld()
	for i := range 60 {
		next := states[r.IntN(len(states))]
		for _, l := range slices.Clone(w.links) {
			if !slices.ContainsFunc(next, func(s linkSpec) bool { return s.name == l.Name && macN(s.mac).String() == l.MAC.String() }) {
				w.delLink(l.Name)
			}
		}
		for _, s := range next {
			i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == s.name })
			if i < 0 {
				w.addLink(s.name, "veth", macN(s.mac), s.mtu)
			} else {
				w.links[i].MTU = s.mtu
			}
		}
		w.hangUnplug = r.IntN(5) == 0
		if err := w.converge(Options{}); err != nil {
			t.Fatalf("step %d (seed %d): %v", i, seed, err)
		}
		if bad := w.checkConverged(1); len(bad) > 0 {
			t.Fatalf("step %d (seed %d) to %v:\n%s", i, seed, next, joinLines(bad))
		}
	}
}

func TestActionStrings(t *testing.T) {
	w := newWorld()
	w.addLink("eth0", "veth", macN(1), 1500)
	p := Compute(w.observed(), w.rec, Options{Queues: 2})
	want := []string{
		"record endpoint 0 for eth0 (ifindex 3, 02:54:53:00:00:01, 2 queues): new container link eth0",
		"create tsn0 (2 queues, mtu 1500)",
		"redirect eth0 ⇄ tsn0",
		"hot-add NIC 0 (02:54:53:00:00:01) on tsn0",
	}
	if len(p.Actions) != len(want) {
		t.Fatalf("plan has %d actions, want %d:\n%s", len(p.Actions), len(want), p)
	}
	for i, a := range p.Actions {
		if a.String() != want[i] {
			t.Errorf("action %d = %q, want %q", i, a, want[i])
		}
	}
}

func TestReplaceOnSameLinkWhilePending(t *testing.T) {
	// The tap is re-created under the plugged NIC: endpoint 0 is replaced
	// by endpoint 1 on the same link, with the same MAC, while the guest
	// leaves 0's unplug pending. 1's NIC waits for 0's to leave (never two
	// NICs with one MAC in the guest); when 0's removal completes, 1 is
	// plugged in the same pass and 0's removal must not take 1's filter.
	w := wired(false)
	w.hangUnplug = true
	w.taps[0].Attached = 0
	_, out, err := w.reconcile(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(out.Held, []int{1}) || !slices.Equal(out.Pending, []int{0}) {
		t.Errorf("outcome pending %v held %v, want 0 pending and 1 held", out.Pending, out.Held)
	}
	if err := w.converge(Options{}); err != nil {
		t.Fatal(err)
	}
	if e, _ := w.rec.Endpoint(0); !e.Removing || !e.UnplugRequested {
		t.Fatalf("endpoint 0 = %+v, want a recorded pending unplug", e)
	}
	if slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Index == 1 }) {
		t.Fatalf("NIC 1 plugged while NIC 0 with the same MAC is still in the VM: %+v", w.nics)
	}
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatalf("while pending:\n%s", joinLines(bad))
	}
	w.hangUnplug = false
	p, _, err := w.reconcile(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := ops(p); got != "unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 plug-nic/1" {
		t.Errorf("completing plan = %q", got)
	}
	// No second pass: the completing pass alone must leave 1 wired.
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatalf("after the pending removal completed:\n%s", joinLines(bad))
	}
}

func TestQueueDefaultNeverReplugs(t *testing.T) {
	// queues = 0 follows the vCPUs, which Kata hot-adds: an endpoint keeps
	// the count it was made with; only a new endpoint gets the new count.
	w := wired(false)
	before := w.mutations
	for _, q := range []int{4, 2, 1} {
		if p, _, err := w.reconcile(Options{Queues: q}); err != nil || !p.Empty() {
			t.Fatalf("queues %d: plan %q, %v; want nothing", q, ops(p), err)
		}
	}
	if w.mutations != before {
		t.Errorf("a changed queue default made %d mutations", w.mutations-before)
	}
	w.addLink("net1", "veth", macN(2), 1500)
	p := Compute(w.observed(), w.rec, Options{Queues: 4})
	if got := ops(p); got != "record/1 create-tap/1 add-redirects/1 plug-nic/1" || p.Actions[0].Endpoint.Queues != 4 {
		t.Errorf("new link with queues 4: %s", p)
	}
}

func TestPendingRetryComesAfterAdds(t *testing.T) {
	w := wired(false)
	w.hangUnplug = true
	w.delLink("eth0")
	w.reconcile(Options{}) // unplug asked, pending
	w.addLink("net1", "veth", macN(2), 1500)
	p := Compute(w.observed(), w.rec, Options{})
	if got, want := ops(p), "record/1 create-tap/1 add-redirects/1 plug-nic/1 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0"; got != want {
		t.Errorf("plan = %q, want %q", got, want)
	}
	if !strings.Contains(p.Actions[4].String(), "checking back") {
		t.Errorf("retry = %q, want it to only check back", p.Actions[4])
	}
}

func TestNeverATwinNIC(t *testing.T) {
	skipped := func(p Plan, name string) Skipped {
		t.Helper()
		i := slices.IndexFunc(p.Skipped, func(s Skipped) bool { return s.Link.Name == name })
		if i < 0 {
			t.Fatalf("%s not skipped: %s", name, p)
		}
		return p.Skipped[i]
	}
	for _, tc := range []struct {
		name, missing string
		repairable    bool
		damage        func(w *world)
	}{
		{"Kata's filter deleted", "redirect eth0→tap0_kata", true, func(w *world) { w.kataFilterDel("eth0") }},
		{"link re-created with the same MAC", "redirect eth0→tap0_kata, redirect tap0_kata→eth0", true, func(w *world) {
			w.delLink("eth0")
			w.addLink("eth0", "veth", macN(1), 1500)
		}},
		{"Kata's tap gone", "a tap<N>_kata of the runtime's joined to eth0", false, func(w *world) {
			w.redirs = nil
			w.kata = nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.kataColdPlug("eth0", 0)
			if p := Compute(w.observed(), w.rec, Options{}); skipped(p, "eth0").Broken {
				t.Fatalf("intact Kata wiring reported broken: %s", p)
			}
			tc.damage(w)
			// Reported, never re-wired, whatever the number of passes.
			for range 2 {
				p, _, err := w.reconcile(Options{})
				if err != nil || !p.Empty() {
					t.Fatalf("broken adopted link: plan %q, %v; want nothing done", ops(p), err)
				}
				if s := skipped(p, "eth0"); !s.Adopted || !s.Broken || !strings.Contains(s.Reason, "missing "+tc.missing) {
					t.Errorf("skipped = %+v, want adopted, broken, missing %s", s, tc.missing)
				}
			}
			if len(w.nics) != 1 || len(w.taps) != 0 {
				t.Errorf("tapsync wired the adopted link: NICs %+v, taps %v", w.nics, w.taps)
			}
			// Repaired only when allowed, with our redirects to Kata's tap.
			opts := Options{RepairAdopted: true}
			p, _, err := w.reconcile(opts)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.repairable {
				if !p.Empty() || !strings.Contains(skipped(p, "eth0").Reason, "cannot repair") {
					t.Errorf("unrepairable: plan %q, skipped %+v", ops(p), skipped(p, "eth0"))
				}
				return
			}
			if got := ops(p); got != "repair-adopted/-1" {
				t.Errorf("repair plan = %q", got)
			}
			l := w.link("eth0")
			tap := w.kata[0].Ifindex
			if !slices.ContainsFunc(w.redirs, func(r datapath.Redirect) bool { return r.Owned && r.From == l.Ifindex && r.To == tap }) ||
				!slices.ContainsFunc(w.redirs, func(r datapath.Redirect) bool { return r.Owned && r.From == tap && r.To == l.Ifindex }) {
				t.Errorf("repair left redirects %+v", w.redirs)
			}
			p, _, err = w.reconcile(opts)
			if s := skipped(p, "eth0"); err != nil || !p.Empty() || s.Broken || !s.Adopted || !strings.Contains(s.Reason, "repaired by tapsync") {
				t.Errorf("after repair: plan %q, %v, skipped %+v", ops(p), err, s)
			}
			if len(w.nics) != 1 || len(w.twins) > 0 {
				t.Errorf("NICs %+v, twins %v", w.nics, w.twins)
			}
		})
	}

	t.Run("Kata's macvtap model", func(t *testing.T) {
		w := newWorld()
		w.addLink("eth0", "veth", macN(1), 1500)
		w.kataMacvtap("eth0", 0)
		p := Compute(w.observed(), w.rec, Options{})
		if s := skipped(p, "eth0"); !p.Empty() || !s.Adopted || s.Broken {
			t.Errorf("macvtap model: plan %q, skipped %+v", ops(p), s)
		}
		w.nics = nil // Kata's NIC gone (unplugged by hand)
		if s := skipped(Compute(w.observed(), w.rec, Options{}), "eth0"); !s.Broken || !strings.Contains(s.Reason, "tap0_kata") {
			t.Errorf("macvtap without its NIC: skipped %+v, want broken naming tap0_kata", s)
		}
	})

	t.Run("two links share the MAC of Kata's NIC", func(t *testing.T) {
		// ipvlan-style: the one Kata wired is adopted (whatever the order),
		// the other is not given a second NIC with that MAC.
		w := newWorld()
		w.addLink("eth1", "ipvlan", macN(1), 1500)
		w.addLink("eth0", "ipvlan", macN(1), 1500)
		w.kataColdPlug("eth0", 0)
		p, _, err := w.reconcile(Options{})
		if err != nil || !p.Empty() {
			t.Fatalf("shared MAC: plan %q, %v", ops(p), err)
		}
		if s := skipped(p, "eth0"); !s.Adopted || s.Broken {
			t.Errorf("eth0 = %+v, want adopted and intact", s)
		}
		if s := skipped(p, "eth1"); s.Adopted || !strings.Contains(s.Reason, "not plugging a second") {
			t.Errorf("eth1 = %+v, want skipped without a twin", s)
		}
	})
}

func TestBurnedIndexMovesTheEndpoint(t *testing.T) {
	// QEMU lost the NIC and holds a netdev it cannot delete: the link is
	// re-wired under a new index and index 0 stays reserved.
	w := wired(false)
	w.nics = nil
	w.orphaned[0] = true
	if _, _, err := w.reconcile(Options{}); err == nil || !strings.Contains(err.Error(), "unusable") {
		t.Fatalf("first pass = %v, want the burned index reported", err)
	}
	mustConverge(t, w, 1)
	if e, ok := w.rec.Endpoint(0); !ok || !e.Burned {
		t.Errorf("endpoint 0 = %+v, %v; want kept as burned", e, ok)
	}
	if !slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Index == 1 && n.MAC.String() == macN(1).String() }) {
		t.Errorf("eth0 not re-wired under index 1: %+v", w.nics)
	}
	if _, ok := w.taps[0]; !ok {
		t.Error("burned endpoint's tap deleted while QEMU's leftover netdev may hold it")
	}

	// The record is lost (set aside): the leftover is recognised as burned
	// again, once, and then nothing more is planned.
	w.rec = state.Record{Version: state.Version, Sandbox: "sb"}
	w.reconcile(Options{})
	mustConverge(t, w, 1)
	if e, ok := w.rec.Endpoint(0); !ok || !e.Burned {
		t.Errorf("after a lost record endpoint 0 = %+v, %v; want burned again", e, ok)
	}
	before := w.mutations
	if p, _, err := w.reconcile(Options{}); err != nil || !p.Empty() || w.mutations != before {
		t.Errorf("steady state with a burned index: plan %q, err %v, %d mutations", ops(p), err, w.mutations-before)
	}
}

// TestTeardown: a sandbox going away is emptied through the planner. While
// QEMU runs, NICs are unplugged before taps and redirects go; a guest
// that never lets go keeps the taps until QEMU has exited. Kata's objects
// are never touched.
func TestTeardown(t *testing.T) {
	setup := func() *world {
		w := wired(true)
		w.addLink("kata0", "veth", macN(9), 1500)
		w.kataColdPlug("kata0", 0)
		if err := w.converge(Options{}); err != nil {
			t.Fatal(err)
		}
		return w
	}
	kataIntact := func(t *testing.T, w *world, vmGone bool) {
		t.Helper()
		if len(w.kata) != 1 || (!vmGone && !slices.ContainsFunc(w.nics, func(n NIC) bool { return !n.Owned })) ||
			slices.ContainsFunc(w.redirs, func(r datapath.Redirect) bool { return r.Owned }) ||
			len(slices.DeleteFunc(slices.Clone(w.redirs), func(r datapath.Redirect) bool { return r.Owned })) != 2 {
			t.Errorf("Kata's wiring touched, or ours left: kata %v, NICs %+v, redirects %+v", w.kata, w.nics, w.redirs)
		}
	}
	nothingOurs := func(t *testing.T, w *world) {
		t.Helper()
		if len(w.taps) != 0 || len(w.netdevs) != 0 || slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned }) || len(w.rec.Endpoints) != 0 {
			t.Errorf("left: taps %v, netdevs %v, NICs %+v, record %+v", w.taps, w.netdevs, w.nics, w.rec.Endpoints)
		}
		if len(w.unsafe) > 0 {
			t.Error(joinLines(w.unsafe))
		}
	}

	t.Run("QEMU answers: unplug first", func(t *testing.T) {
		w := setup()
		p, out, err := w.teardown(false)
		if err != nil || len(out.Pending) > 0 {
			t.Fatal(err, out.Pending)
		}
		want := "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 mark-removing/1 unplug-nic/1 remove-redirects/1 delete-tap/1 forget/1"
		if got := ops(p); got != want {
			t.Errorf("plan %q, want %q", got, want)
		}
		nothingOurs(t, w)
		kataIntact(t, w, false)
		if p := ComputeTeardown(w.observed(), w.rec, false); !p.Empty() {
			t.Errorf("a second teardown plans %q", ops(p))
		}
	})

	t.Run("guest never lets go: taps wait for QEMU to exit", func(t *testing.T) {
		w := setup()
		w.hangUnplug = true
		_, out, err := w.teardown(false)
		if err != nil || !slices.Equal(out.Pending, []int{0, 1}) {
			t.Fatalf("pending %v, %v; want both unplugs pending", out.Pending, err)
		}
		if len(w.taps) != 2 || len(w.unsafe) > 0 {
			t.Fatalf("taps %v deleted under a plugged NIC: %v", w.taps, w.unsafe)
		}
		p, _, err := w.teardown(true)
		if err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(p.Actions, func(a Action) bool { return a.Op == planner.OpUnplugNIC }) {
			t.Errorf("plan for an exited QEMU asks it something: %q", ops(p))
		}
		nothingOurs(t, w)
		kataIntact(t, w, true)
	})

	t.Run("record lost, QEMU gone: owned taps found and removed", func(t *testing.T) {
		w := setup()
		w.rec = state.Record{Version: state.Version, Sandbox: "sb"}
		if _, _, err := w.teardown(true); err != nil {
			t.Fatal(err)
		}
		nothingOurs(t, w)
		kataIntact(t, w, true)
	})

	t.Run("crash after every step", func(t *testing.T) {
		base := setup()
		p := ComputeTeardown(base.observed(), base.rec, false)
		for k := 0; k <= len(p.Actions); k++ {
			w := base.clone()
			if _, _, err := Apply(context.Background(), Plan{Actions: p.Actions[:k]}, w.rec, w.observed(), w.env()); err != nil {
				t.Fatal(err)
			}
			if _, _, err := w.teardown(k%2 == 0); err != nil {
				t.Fatal(err)
			}
			nothingOurs(t, w)
			kataIntact(t, w, true)
		}
	})
}

// A pod may name its links as we name our devices (a Multus interface
// tsn1, a macvlan tsm2, an altname): a new endpoint never takes an index
// whose tap, macvtap or ifb name a link of the netns has, in either model,
// and an endpoint keeps its index when such a link appears after it.
func TestIndexStepsAroundPodLinkNames(t *testing.T) {
	for _, model := range []string{ModelTCFilter, ModelMacvtap} {
		t.Run(model, func(t *testing.T) {
			w := newWorld()
			w.model = model
			w.addLink("eth0", "veth", macN(1), 1500)
			mustConverge(t, w, 1)
			w.addLink("tsn1", "veth", macN(2), 1500)
			w.addLink("tsm2", "macvlan", macN(3), 1500)
			w.addLink("tsi3", "veth", macN(4), 1500)
			w.addLink("tsm0", "veth", macN(5), 1500)
			w.addLink("net5", "veth", macN(6), 1500)
			w.links[len(w.links)-1].AltNames = []string{"tsn8"}
			mustConverge(t, w, 1)
			got := map[string]int{}
			for _, e := range w.rec.Endpoints {
				got[e.LinkName] = e.Index
				for _, dev := range []string{datapath.TapName(e.Index), datapath.MacvtapName(e.Index), datapath.IfbName(e.Index)} {
					if e.LinkName != "eth0" && slices.ContainsFunc(w.links, func(l datapath.Link) bool {
						return l.Name == dev || slices.Contains(l.AltNames, dev)
					}) {
						t.Errorf("endpoint %d of %s: its device name %s is a pod link's", e.Index, e.LinkName, dev)
					}
				}
			}
			want := map[string]int{"eth0": 0, "tsn1": 4, "tsm2": 5, "tsi3": 6, "tsm0": 7, "net5": 9}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("endpoint indexes %v, want %v", got, want)
			}
		})
	}
}
