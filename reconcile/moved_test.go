package reconcile

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
	"golang.org/x/sys/unix"
)

// movedRouteOf is route r of the fake world's main table as
// datapath.EnsureMacvtap reports it taken.
func movedRouteOf(r datapath.Route) datapath.MovedRoute {
	m := datapath.MovedRoute{Family: unix.AF_INET, Table: unix.RT_TABLE_MAIN, Dst: r.Dst, Protocol: uint8(r.Protocol),
		Scope: r.Scope, Type: unix.RTN_UNICAST, Metric: uint32(r.Metric), Dev: r.LinkIndex, Gateway: r.Gateway, PrefSrc: r.Src}
	if r.IPv6 {
		m.Family = unix.AF_INET6
	}
	if !r.Dst.IsValid() {
		m.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if r.IPv6 {
			m.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
	}
	if r.MTU != 0 {
		m.Metrics = map[string]uint32{"mtu": uint32(r.MTU)}
	}
	return m
}

// recorderFunc is a Recorder that calls a function.
type recorderFunc func(state.Record) error

func (f recorderFunc) Save(r state.Record) error { return f(r) }

// What the macvtap model takes is recorded before it is taken: when that
// record cannot be written, the link keeps its addresses.
func TestMacvtapRecordsBeforeTaking(t *testing.T) {
	w := newWorld()
	w.model = ModelMacvtap
	w.addLink("eth0", "veth", macN(1), 1500)
	w.addAddr("eth0", "10.1.0.5/24", "10.1.0.1")
	env := w.env()
	full := errors.New("no space left on device")
	env.Recorder = recorderFunc(func(r state.Record) error {
		if e, ok := r.Endpoint(0); ok && e.Moved != nil {
			return full
		}
		return w.Save(r)
	})
	p := w.plan(w.options(Options{}))
	if _, _, err := Apply(context.Background(), p, w.rec, w.observed(), env); !errors.Is(err, full) {
		t.Fatalf("apply = %v, want the record's error", err)
	}
	if l := w.link("eth0"); len(l.Addrs) != 1 || len(w.routes) != 1 {
		t.Errorf("eth0 = %+v, routes %v: taken though not recorded", l, w.routes)
	}
	mustConverge(t, w, 1)
	e, _ := w.rec.Endpoint(0)
	if len(w.link("eth0").Addrs) != 0 || !slices.Equal(planner.MovedAddrs(e), []netip.Prefix{netip.MustParsePrefix("10.1.0.5/24")}) || len(e.Moved.Routes) != 1 {
		t.Errorf("converged: eth0 %+v, record %+v", w.link("eth0"), e.Moved)
	}
}

// A removal whose give-back a crash interrupted is given back again when
// the record holds what an observation cannot show (a route of another
// table); when it holds nothing of the kind, the observation tells.
func TestMacvtapRemovalGivesBackWhatObserveCannotSee(t *testing.T) {
	for _, other := range []bool{false, true} {
		w := macvtapWorld()
		e, _ := w.rec.Endpoint(0)
		if other {
			e.Moved.Routes = append(e.Moved.Routes, state.Route{Table: 100, Type: unix.RTN_UNICAST, Gateway: "10.1.0.1", Dev: e.LinkIfindex})
			w.rec.Put(e)
		}
		if _, _, err := w.teardown(false); err != nil {
			t.Fatal(err)
		}
		// The crash came before the record was dropped.
		e.Removing = true
		w.rec.Put(e)
		p := ComputeTeardown(w.observed(), w.rec, false)
		if got, want := strings.Contains(ops(p), "restore-link/0"), other; got != want {
			t.Errorf("another table's route recorded: %v; plan %s, want a give-back: %v", other, ops(p), want)
		}
	}
}
