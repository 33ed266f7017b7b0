package reconcile

import (
	"context"
	"slices"
	"testing"

	"github.com/tapsync/tapsync/reconcile/planner"
)

// A new endpoint is recorded with its plug counted in one write; a NIC
// plugged again for a recorded endpoint counts its plug in a write of its
// own before the plug. Either way the plug is counted before it is made.
func TestNewEndpointOneRecordWrite(t *testing.T) {
	w := podWorld()
	w.guestOn = false
	var plugsAtPlug []int
	env := w.env()
	env.AfterAction = func(a Action) {
		if a.Op == planner.OpCreateTap {
			e, _ := w.rec.Endpoint(a.Endpoint.Index)
			plugsAtPlug = append(plugsAtPlug, e.Plugs)
		}
	}
	p := w.plan(Options{Queues: 1})
	rec, _, err := Apply(context.Background(), p, w.rec, w.observed(), env)
	if err != nil {
		t.Fatal(err)
	}
	w.rec = rec
	e, _ := rec.Endpoint(0)
	if w.saves != 1 || e.Plugs != 1 || e.PlugMTU != 1450 || !slices.Equal(plugsAtPlug, []int{1}) {
		t.Errorf("new endpoint: %d writes, plugs %d, plug MTU %d, plugs recorded before the tap %v; want 1, 1, 1450, [1]",
			w.saves, e.Plugs, e.PlugMTU, plugsAtPlug)
	}
	// The NIC goes behind tapsync's back: the replug counts itself.
	w.nics = nil
	delete(w.netdevs, 0)
	w.taps[0].Attached = 0
	saves := w.saves
	if _, _, err := w.reconcile(Options{Queues: 1}); err != nil {
		t.Fatal(err)
	}
	if e, _ := w.rec.Endpoint(0); e.Plugs != 2 || w.saves-saves != 1 {
		t.Errorf("replug: plugs %d in %d writes; want 2 in 1", e.Plugs, w.saves-saves)
	}
}

// A pass that finds several new links records them all in one write,
// before anything is made for any of them; each new endpoint is recorded
// before its own steps either way.
func TestNewEndpointsOneRecordWrite(t *testing.T) {
	w := newWorld()
	w.guestOn = false
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addLink("net1", "veth", macN(2), 1500)
	w.addLink("net2", "veth", macN(3), 1500)
	var recordedAtFirstMutation []int
	env := w.env()
	env.AfterAction = func(a Action) {
		if a.Op.Mutates() && recordedAtFirstMutation == nil {
			for _, e := range w.rec.Endpoints {
				recordedAtFirstMutation = append(recordedAtFirstMutation, e.Index)
			}
		}
	}
	p := w.plan(Options{Queues: 1})
	rec, _, err := Apply(context.Background(), p, w.rec, w.observed(), env)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.Endpoints) != 3 || w.saves != 1 || !slices.Equal(recordedAtFirstMutation, []int{0, 1, 2}) {
		t.Errorf("three new links: %d endpoints in %d writes, recorded at the first mutation %v; want 3 in 1, [0 1 2]",
			len(rec.Endpoints), w.saves, recordedAtFirstMutation)
	}
}

// A record step is reported done (AfterAction, where the crash tests
// kill the daemon) only once the record holding it is written: a crash
// "after" it finds it on disk.
func TestRecordStepReportedOnceSaved(t *testing.T) {
	w := newWorld()
	w.guestOn = false
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addLink("net1", "veth", macN(2), 1500)
	var reported, unsaved []int
	env := w.env()
	env.AfterAction = func(a Action) {
		if a.Op != planner.OpRecord {
			return
		}
		reported = append(reported, a.Endpoint.Index)
		if _, ok := w.rec.Endpoint(a.Endpoint.Index); !ok {
			unsaved = append(unsaved, a.Endpoint.Index)
		}
	}
	if _, _, err := Apply(context.Background(), w.plan(Options{Queues: 1}), w.rec, w.observed(), env); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(reported, []int{0, 1}) || len(unsaved) != 0 {
		t.Errorf("record steps reported %v, of them not yet written %v; want [0 1], none", reported, unsaved)
	}
}
