package reconcile

import (
	"fmt"
	"slices"
	"testing"
)

// fourNICs is a converged sandbox with four container links.
func fourNICs(t *testing.T) *world {
	t.Helper()
	w := newWorld()
	for i := range 4 {
		w.addLink(fmt.Sprintf("net%d", i), "veth", macN(i+1), 1500)
	}
	if err := w.converge(Options{Queues: 1}); err != nil {
		t.Fatal(err)
	}
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatalf("not converged:\n%s", joinLines(bad))
	}
	w.unplugBatches = nil
	return w
}

func reqsOf(b unplugBatch) []Unplug { return b.reqs }

// A plan removing four NICs from a guest that never answers asks QEMU for
// all four unplugs in one call, the only one allowed to wait: one unplug
// timeout for the pass, not four. Later passes check back without asking
// again.
func TestUnplugsBatched(t *testing.T) {
	w := fourNICs(t)
	w.hangUnplug = true
	for i := range 4 {
		w.delLink(fmt.Sprintf("net%d", i))
	}
	p, out, err := w.reconcile(Options{Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("plan:\n%s", p)
	if len(w.unplugBatches) != 1 {
		t.Fatalf("%d UnplugNICs calls %v; want one for all four NICs", len(w.unplugBatches), w.unplugBatches)
	}
	want := []Unplug{{Index: 0}, {Index: 1}, {Index: 2}, {Index: 3}}
	if b := w.unplugBatches[0]; !slices.Equal(reqsOf(b), want) || !b.wait {
		t.Errorf("batch = %+v; want %+v, waiting", b, want)
	}
	if !slices.Equal(out.Pending, []int{0, 1, 2, 3}) {
		t.Errorf("pending = %v", out.Pending)
	}
	for _, e := range w.rec.Endpoints {
		if !e.Removing || !e.UnplugRequested {
			t.Errorf("recorded %+v; want removing, unplug requested", e)
		}
	}

	// Retries: one call, every request marked as asked before (the VM
	// does not send device_del again), nothing else done.
	for round := range 3 {
		w.unplugBatches = nil
		before := w.mutations
		if _, _, err := w.reconcile(Options{Queues: 1}); err != nil {
			t.Fatal(err)
		}
		want := []Unplug{{0, true}, {1, true}, {2, true}, {3, true}}
		if len(w.unplugBatches) != 1 || !slices.Equal(reqsOf(w.unplugBatches[0]), want) {
			t.Errorf("retry %d: batches %+v; want one of %+v", round, w.unplugBatches, want)
		}
		if w.mutations != before {
			t.Errorf("retry %d made %d mutations", round, w.mutations-before)
		}
	}

	// The guest lets go: everything removed in one pass, in the safe order.
	w.hangUnplug = false
	if err := w.converge(Options{Queues: 1}); err != nil {
		t.Fatal(err)
	}
	if bad := w.checkConverged(1); len(bad) > 0 {
		t.Fatalf("not converged:\n%s", joinLines(bad))
	}
	if len(w.rec.Endpoints) != 0 || len(w.taps) != 0 || len(w.nics) != 0 {
		t.Errorf("left: record %+v, taps %d, NICs %+v", w.rec.Endpoints, len(w.taps), w.nics)
	}
}

// A removal writes the record once before device_del: its intent and the
// request in one write (a write costs about as much as QEMU's dispatch of
// the command), for one NIC and for a batch.
func TestUnplugIntentOneWrite(t *testing.T) {
	for _, gone := range []int{1, 3} {
		t.Run(fmt.Sprintf("%d removed", gone), func(t *testing.T) {
			w := fourNICs(t)
			for i := range gone {
				w.delLink(fmt.Sprintf("net%d", i))
			}
			before := w.saves
			p, _, err := w.reconcile(Options{Queues: 1})
			if err != nil {
				t.Fatal(err)
			}
			if len(w.unplugBatches) != 1 {
				t.Fatalf("%d UnplugNICs calls; want 1\nplan:\n%s", len(w.unplugBatches), p)
			}
			if n := w.unplugBatches[0].saves - before; n != 1 {
				t.Errorf("%d record writes before device_del; want 1\nplan:\n%s", n, p)
			}
			if bad := w.checkConverged(1); len(bad) > 0 {
				t.Fatalf("not converged:\n%s", joinLines(bad))
			}
		})
	}
}

// Fresh removals and new links in one pass: the removals are asked for
// together ahead of the adds; a removal left pending earlier is checked
// back after the adds, in its own call that does not wait, so a slow
// guest holds neither the new NIC nor the worker.
func TestUnplugBatchesKeepAddsFirst(t *testing.T) {
	w := fourNICs(t)
	w.hangUnplug = true
	w.delLink("net0")
	if _, _, err := w.reconcile(Options{Queues: 1}); err != nil {
		t.Fatal(err)
	}
	w.unplugBatches = nil
	w.delLink("net1")
	w.delLink("net2")
	w.addLink("net9", "veth", macN(9), 1500)
	p, _, err := w.reconcile(Options{Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("plan:\n%s", p)
	if len(w.unplugBatches) != 2 {
		t.Fatalf("batches = %+v; want the fresh removals, then the retry", w.unplugBatches)
	}
	if b := w.unplugBatches[0]; !slices.Equal(b.reqs, []Unplug{{Index: 1}, {Index: 2}}) || !b.wait {
		t.Errorf("first batch = %+v; want NICs 1 and 2, waiting", b)
	}
	if b := w.unplugBatches[1]; !slices.Equal(b.reqs, []Unplug{{Index: 0, Requested: true}}) || b.wait {
		t.Errorf("second batch = %+v; want NIC 0 checked back, not waiting", b)
	}
	// The new link's NIC was plugged although three removals are pending.
	if !slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && n.MAC.String() == macN(9).String() }) {
		t.Errorf("net9 not plugged: %+v", w.nics)
	}
	if len(w.unsafe) > 0 {
		t.Errorf("unsafe:\n%s", joinLines(w.unsafe))
	}
}
