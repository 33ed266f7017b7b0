package reconcile

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
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
		}, "record/0 create-tap/0 add-redirects/0 plug-nic/0 record/1 create-tap/1 add-redirects/1 plug-nic/1"},
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
			w.links[0].MAC = macN(9)
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
		{"new link next to an adopted one avoids its index", func() *world {
			w := newWorld()
			w.addLink("eth0", "veth", macN(1), 1500)
			w.kataColdPlug("eth0", 0)
			w.addLink("net1", "veth", macN(2), 1500)
			return w
		}, "record/1 create-tap/1 add-redirects/1 plug-nic/1"},
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
			w.rec.Put(endpointFor(0, l, 1))
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
		{"queue count changed: endpoint re-made", func() *world {
			w := wired(false)
			w.rec.Endpoints[0].Queues = 4
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
	w := wired(true)
	before, saves := w.mutations, w.saves
	for range 3 {
		p, out, err := w.reconcile(Options{})
		if err != nil || !p.Empty() || out.Mutations != 0 {
			t.Fatalf("steady reconcile: plan %q, %d mutations, %v", ops(p), out.Mutations, err)
		}
	}
	if w.mutations != before || w.saves != saves {
		t.Errorf("steady state changed the world: %d mutations, %d saves", w.mutations-before, w.saves-saves)
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
	w.failOp, w.failNext = OpPlugNIC, true
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
		"create tap0_kata (2 queues, mtu 1500)",
		"redirect eth0 ⇄ tap0_kata",
		"hot-add NIC 0 (02:54:53:00:00:01) on tap0_kata",
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
	// The queue count changes: endpoint 0 is replaced by endpoint 1 on the
	// same link while the guest leaves 0's unplug pending. When 0's
	// removal finally completes it must not take 1's filter on eth0.
	w := wired(false)
	w.hangUnplug = true
	if err := w.converge(Options{Queues: 2}); err != nil {
		t.Fatal(err)
	}
	if e, _ := w.rec.Endpoint(0); !e.Removing || !e.UnplugRequested {
		t.Fatalf("endpoint 0 = %+v, want a recorded pending unplug", e)
	}
	if bad := w.checkConverged(2); len(bad) > 0 {
		t.Fatalf("while pending:\n%s", joinLines(bad))
	}
	w.hangUnplug = false
	p, _, err := w.reconcile(Options{Queues: 2})
	if err != nil {
		t.Fatal(err)
	}
	if got := ops(p); got != "unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0" {
		t.Errorf("completing plan = %q", got)
	}
	// No second pass: the completing pass alone must leave 1 intact.
	if bad := w.checkConverged(2); len(bad) > 0 {
		t.Fatalf("after the pending removal completed:\n%s", joinLines(bad))
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

func TestAdoptionNeedsTheRuntimesRedirect(t *testing.T) {
	// Kata wired eth0 at boot; then eth0 is re-created with the same MAC:
	// Kata's filters died with the old link, so tapsync wires the new one.
	w := newWorld()
	w.addLink("eth0", "veth", macN(1), 1500)
	w.kataColdPlug("eth0", 0)
	w.delLink("eth0")
	w.addLink("eth0", "veth", macN(1), 1500)
	if got := ops(Compute(w.observed(), w.rec, Options{})); got != "record/1 create-tap/1 add-redirects/1 plug-nic/1" {
		t.Errorf("re-created Kata link: plan %q, want it wired by tapsync", got)
	}

	// Two links share a MAC (ipvlan-style): only the one Kata wired is
	// adopted, the other is wired by tapsync.
	w = newWorld()
	w.addLink("eth0", "ipvlan", macN(1), 1500)
	w.kataColdPlug("eth0", 0)
	w.addLink("eth1", "ipvlan", macN(1), 1500)
	p := Compute(w.observed(), w.rec, Options{})
	if got := ops(p); got != "record/1 create-tap/1 add-redirects/1 plug-nic/1" || len(p.Skipped) != 1 || p.Skipped[0].Link.Name != "eth0" {
		t.Errorf("shared MAC: plan %q, skipped %v", got, p.Skipped)
	}
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
