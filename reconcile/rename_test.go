package reconcile

import (
	"maps"
	"slices"
	"testing"
)

// renameLink renames a container link in place: same ifindex and MAC, as
// `ip link set eth0 name net1` does. Routes and filters follow the ifindex.
func (w *world) renameLink(from, to string) {
	for k := range w.links {
		if w.links[k].Name == from {
			w.links[k].Name = to
		}
	}
}

// A container link renamed in place keeps its endpoint (no re-plug); the
// record takes the new name (status and logs show it) and the guest
// interface is renamed by the guest steps; nothing else changes, and the
// sandbox is converged afterwards.
func TestRenameFollowedByRecordAndGuest(t *testing.T) {
	w := podWorld()
	mustConvergeGuest(t, w)
	e0, _ := w.rec.Endpoint(0)
	nics, taps := slices.Clone(w.nics), len(w.taps)
	calls := maps.Clone(w.guest.calls)

	w.renameLink("eth0", "net1")
	before := w.mutations
	p, _, err := w.reconcile(guestOn)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("plan:\n%s", p)
	if got, want := ops(p), "record/0 configure-guest/0 update-guest-routes/-1"; got != want {
		t.Errorf("plan = %s\nwant   %s", got, want)
	}
	e, ok := w.rec.Endpoint(0)
	if !ok || e.LinkName != "net1" || e.LinkIfindex != e0.LinkIfindex || e.LinkMAC != e0.LinkMAC || e.Removing {
		t.Errorf("recorded endpoint %+v; want endpoint 0 of %+v under the name net1", e, e0)
	}
	// Host and VM untouched: only the guest changed (its interface, and the
	// routes that name it).
	if !slices.EqualFunc(w.nics, nics, func(a, b NIC) bool { return a.ID == b.ID && a.MAC.String() == b.MAC.String() }) || len(w.taps) != taps {
		t.Errorf("NICs %+v, %d taps; want %+v, %d", w.nics, len(w.taps), nics, taps)
	}
	guestCalls := w.guest.calls["UpdateInterface"] - calls["UpdateInterface"] + w.guest.calls["UpdateRoutes"] - calls["UpdateRoutes"]
	if d := w.mutations - before; d != guestCalls || d == 0 {
		t.Errorf("%d mutations, %d of them guest calls; want only guest calls", d, guestCalls)
	}
	if g := w.guest.iface(macN(1)); g == nil || g.Name != "net1" {
		t.Errorf("guest interface = %+v; want it named net1", g)
	}
	mustConvergeGuest(t, w)
	if p := Compute(w.observed(), w.rec, guestOn); !p.Empty() {
		t.Errorf("converged sandbox still plans:\n%s", p)
	}
}

// Without the guest, a rename is a record step alone.
func TestRenameWithoutGuest(t *testing.T) {
	w := newWorld()
	w.addLink("eth0", "veth", macN(1), 1500)
	opts := Options{Queues: 1}
	if err := w.converge(opts); err != nil {
		t.Fatal(err)
	}
	w.renameLink("eth0", "eth7")
	before := w.mutations
	p, _, err := w.reconcile(opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := ops(p); got != "record/0" || w.mutations != before {
		t.Errorf("plan = %s (%d mutations); want record/0 alone", got, w.mutations-before)
	}
	if e, _ := w.rec.Endpoint(0); e.LinkName != "eth7" {
		t.Errorf("recorded name %q, want eth7", e.LinkName)
	}
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatalf("not converged:\n%s", joinLines(bad))
	}
}
