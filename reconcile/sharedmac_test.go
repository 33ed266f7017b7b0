package reconcile

import (
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

// sharedMACSkip is the link that plan p skips for sharing its MAC with a
// wired link, and that link's name ("" when it skips name for no such
// reason).
func sharedMACSkip(p Plan, name string) (Skipped, string) {
	for _, s := range p.Skipped {
		if s.Link.Name != name {
			continue
		}
		prefix := fmt.Sprintf("shares MAC %s with ", s.Link.MAC)
		if rest, ok := strings.CutPrefix(s.Reason, prefix); ok && !s.Adopted {
			if owner, _, ok := strings.Cut(rest, ","); ok {
				return s, owner
			}
		}
	}
	return Skipped{}, ""
}

// checkOneNICPerMAC says what is wrong with converged world w: what
// checkConverged says (any plug that put a second NIC with one MAC into
// the VM included), and whether the VM holds one NIC per MAC besides the
// removals the guest left pending, and each link that shares its MAC with
// another is either wired or skipped naming the one that is.
// checkConverged takes links and guest interfaces to be one to one: it
// wants an endpoint for every wireable link, and the guest interface with
// a link's MAC configured as that link. A link skipped for its MAC is, by
// design, left without, and the interface with its MAC is the wired
// link's.
func checkOneNICPerMAC(w *world, queues int) []string {
	p := w.plan(w.options(Options{Queues: queues, Guest: w.guestOn}))
	var bad []string
	for _, b := range w.checkConverged(queues) {
		if !slices.ContainsFunc(p.Skipped, func(s Skipped) bool {
			_, owner := sharedMACSkip(p, s.Link.Name)
			return owner != "" && (b == "link "+s.Link.Name+" has 0 endpoints" ||
				strings.HasPrefix(b, "guest interface ") && strings.Contains(b, "want {Name:"+s.Link.Name+" "))
		}) {
			bad = append(bad, b)
		}
	}
	if w.guestOn {
		for _, e := range w.rec.Endpoints {
			if i := w.guest.iface(planner.GuestMAC(e)); !e.Removing && (i == nil || i.Name != e.LinkName) {
				bad = append(bad, fmt.Sprintf("guest interface with MAC %s is %+v, want %s's", e.LinkMAC, i, e.LinkName))
			}
		}
	}
	pending := map[int]bool{}
	for _, e := range w.rec.Endpoints {
		pending[e.Index] = e.Removing
	}
	macs := map[string]string{}
	for _, n := range w.nics {
		if n.Owned && pending[n.Index] {
			continue
		}
		if other, ok := macs[n.MAC.String()]; ok {
			bad = append(bad, fmt.Sprintf("NICs %s and %s share MAC %s", other, n.ID, n.MAC))
		}
		macs[n.MAC.String()] = n.ID
	}
	for _, l := range w.links {
		if r, _ := planner.Unwireable(w.observed(), l); r != "" {
			continue
		}
		live := slices.ContainsFunc(w.rec.Endpoints, func(e state.Endpoint) bool { return !e.Removing && planner.SameLink(e, l) })
		s, owner := sharedMACSkip(p, l.Name)
		switch {
		case live && owner != "":
			bad = append(bad, fmt.Sprintf("%s is wired and skipped: %s", l.Name, s.Reason))
		case owner != "" && !slices.ContainsFunc(w.rec.Endpoints, func(e state.Endpoint) bool {
			return !e.Removing && e.LinkName == owner && strings.EqualFold(e.LinkMAC, l.MAC.String())
		}):
			bad = append(bad, fmt.Sprintf("%s skipped for %s, which is not wired with its MAC: %s", l.Name, owner, s.Reason))
		}
	}
	return bad
}

// addLinkAt is addLink with ifindex i: a link moved into the netns (as
// the ipvlan CNI does) keeps the ifindex it had where it was made, lower
// than the links there before it.
func (w *world) addLinkAt(i int, name, kind string, mac []byte) {
	next := w.nextIfindex
	w.nextIfindex = i - 1
	w.addLink(name, kind, mac, 1500)
	w.nextIfindex = next
}

// Two container links with one MAC (ipvlan slaves carry their parent's)
// get one NIC: the agent finds a guest link by MAC, and a guest with two
// such NICs cannot tell them apart. The link already wired keeps the NIC,
// else the lowest ifindex takes it; the others are skipped naming it, and
// take the MAC over only once it is gone, after its NIC has left.
func TestSharedMACOneNIC(t *testing.T) {
	ipvlans := func(names ...string) *world {
		w := newWorld()
		for _, n := range names {
			w.addLink(n, "ipvlan", macN(1), 1500)
		}
		return w
	}
	for _, tc := range []struct {
		name    string
		setup   func() *world
		want    string   // the first plan
		skipped []string // "link→owner" the first plan skips for a shared MAC
		await   []int    // the first plan's plug waits for these unplugs
	}{
		{"two ipvlans, nothing wired: the lowest ifindex is wired", func() *world { return ipvlans("eth0", "eth1") },
			"record/0 create-tap/0 add-redirects/0 plug-nic/0", []string{"eth1→eth0"}, nil},
		{"three ipvlans and a veth", func() *world {
			w := ipvlans("eth0", "eth1", "eth2")
			w.addLink("net1", "veth", macN(2), 1500)
			return w
		}, "record/0 record/1 create-tap/0 add-redirects/0 plug-nic/0 create-tap/1 add-redirects/1 plug-nic/1",
			[]string{"eth1→eth0", "eth2→eth0"}, nil},
		{"converged plans nothing, still skips", func() *world {
			w := ipvlans("eth0", "eth1")
			w.converge(Options{})
			return w
		}, "", []string{"eth1→eth0"}, nil},
		{"a link with a wired link's MAC and a lower ifindex: the wired one keeps its NIC", func() *world {
			w := ipvlans("eth1")
			w.converge(Options{})
			w.addLinkAt(2, "eth0", "ipvlan", macN(1))
			return w
		}, "", []string{"eth0→eth1"}, nil},
		{"the wired link goes: the other takes the MAC once the old NIC has left", func() *world {
			w := ipvlans("eth0", "eth1")
			w.converge(Options{})
			w.delLink("eth0")
			return w
		}, "mark-removing/0 unplug-nic/0 remove-redirects/0 delete-tap/0 forget/0 record/1 create-tap/1 add-redirects/1 plug-nic/1",
			nil, []int{0}},
		{"a wired link's MAC changed to another's: re-made, then skipped", func() *world {
			w := ipvlans("eth0")
			w.addLink("eth1", "ipvlan", macN(2), 1500)
			w.converge(Options{})
			w.setMAC("eth1", macN(1))
			return w
		}, "mark-removing/1 unplug-nic/1 remove-redirects/1 delete-tap/1 forget/1", []string{"eth1→eth0"}, nil},
		{"two endpoints recorded with one MAC (wired before this rule): the later one goes", func() *world {
			w := ipvlans("eth0")
			w.addLink("eth1", "ipvlan", macN(2), 1500)
			w.converge(Options{})
			// What the planner used to make of two ipvlans: two NICs.
			i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == "eth1" })
			w.links[i].MAC = macN(1)
			w.orig[w.links[i].Ifindex] = origLink{mac: macN(1)}
			e, _ := w.rec.Endpoint(1)
			e.LinkMAC = macN(1).String()
			w.rec.Put(e)
			w.nics[slices.IndexFunc(w.nics, func(n NIC) bool { return n.Index == 1 })].MAC = macN(1)
			return w
		}, "mark-removing/1 unplug-nic/1 remove-redirects/1 delete-tap/1 forget/1", []string{"eth1→eth0"}, nil},
		{"macvtap model: two macvlans with one MAC, one macvtap", func() *world {
			w := newWorld()
			w.model = ModelMacvtap
			w.addLink("eth0", "macvlan", macN(1), 1500)
			w.addLink("eth1", "macvlan", macN(1), 1500)
			return w
		}, "record/0 ensure-macvtap/0 plug-nic/0", []string{"eth1→eth0"}, nil},
		{"macvtap model: a link with the MAC a wired link lent its macvtap", func() *world {
			w := newWorld()
			w.model = ModelMacvtap
			w.addLink("eth0", "macvlan", macN(1), 1500)
			w.converge(Options{})
			w.addLink("eth1", "ipvlan", macN(1), 1500)
			return w
		}, "", []string{"eth1→eth0"}, nil},
		{"a tap link and an ipvlan with its MAC: one NIC", func() *world {
			w := newWorld()
			w.addLink("tap0", "tap", macN(1), 1500)
			w.addLink("eth1", "ipvlan", macN(1), 1500)
			return w
		}, "record/0 plug-nic/0", []string{"eth1→tap0"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := tc.setup()
			p := w.plan(w.options(Options{}))
			if got := ops(p); got != tc.want {
				t.Errorf("plan:\n got %s\nwant %s\n%s", got, tc.want, p)
			}
			var skipped []string
			for _, s := range p.Skipped {
				if _, owner := sharedMACSkip(p, s.Link.Name); owner != "" {
					skipped = append(skipped, s.Link.Name+"→"+owner)
					if !strings.Contains(s.Reason, "the agent finds guest links by MAC") {
						t.Errorf("reason %q does not say why", s.Reason)
					}
				}
			}
			if !slices.Equal(skipped, tc.skipped) {
				t.Errorf("skipped for a shared MAC: %v, want %v\n%s", skipped, tc.skipped, p)
			}
			for _, a := range p.Actions {
				if a.Op == planner.OpPlugNIC && !slices.Equal(a.AwaitUnplug, tc.await) {
					t.Errorf("%s awaits %v, want %v", a, a.AwaitUnplug, tc.await)
				}
			}
			if err := w.converge(Options{}); err != nil {
				t.Fatal(err)
			}
			if bad := checkOneNICPerMAC(w, 1); len(bad) > 0 {
				t.Fatalf("not converged:\n%s", joinLines(bad))
			}
			checkSteady(t, w)
		})
	}
}

// TestSharedMACRandomOrder replays sets of links sharing MACs (ipvlans
// of one parent, in both models, the guest side on) in random order,
// the guest sometimes leaving unplugs pending: whatever the order, the
// VM never gets a second NIC with a MAC, and each MAC is wired once.
func TestSharedMACRandomOrder(t *testing.T) {
	type linkSpec struct {
		name, kind string
		mac        int
		at         int // ifindex to move the link in with; 0: the next
	}
	states := [][]linkSpec{
		nil,
		{{"eth0", "ipvlan", 1, 0}},
		{{"eth0", "ipvlan", 1, 0}, {"eth1", "ipvlan", 1, 0}},
		{{"eth1", "ipvlan", 1, 0}, {"eth2", "ipvlan", 1, 2}},
		{{"eth0", "ipvlan", 1, 0}, {"eth1", "ipvlan", 1, 0}, {"net1", "veth", 2, 0}},
		{{"net1", "veth", 2, 0}, {"net2", "ipvlan", 2, 0}, {"eth2", "ipvlan", 1, 0}},
		{{"eth0", "macvlan", 3, 0}, {"eth1", "macvlan", 3, 0}},
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 13))
	w := newWorld()
	for i := range 80 {
		if r.IntN(4) == 0 {
			w.model = []string{ModelTCFilter, ModelMacvtap}[r.IntN(2)]
		}
		next := states[r.IntN(len(states))]
		for _, l := range slices.Clone(w.links) {
			if !slices.ContainsFunc(next, func(s linkSpec) bool {
				return s.name == l.Name && s.kind == l.Kind && macN(s.mac).String() == w.orig[l.Ifindex].mac.String()
			}) {
				w.delLink(l.Name)
			}
		}
		for _, s := range next {
			if slices.ContainsFunc(w.links, func(l datapath.Link) bool { return l.Name == s.name }) {
				continue
			}
			if s.at > 0 && !w.ifindexExists(s.at) {
				w.addLinkAt(s.at, s.name, s.kind, macN(s.mac))
			} else {
				w.addLink(s.name, s.kind, macN(s.mac), 1500)
			}
		}
		w.hangUnplug = r.IntN(5) == 0
		// The guest side, checked when no plug is held behind an unplug
		// the guest leaves pending (the world's converge would take that
		// NIC's guest steps for work left undone).
		w.guestOn = !w.hangUnplug
		if err := w.converge(Options{Guest: w.guestOn}); err != nil {
			t.Fatalf("step %d (seed %d): %v", i, seed, err)
		}
		if bad := checkOneNICPerMAC(w, 1); len(bad) > 0 {
			t.Fatalf("step %d (seed %d) to %v (model %q):\n%s", i, seed, next, w.model, joinLines(bad))
		}
	}
}
