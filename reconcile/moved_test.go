package reconcile

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/datapath"
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
	if len(w.link("eth0").Addrs) != 0 || !slices.Equal(movedAddrs(e), []netip.Prefix{netip.MustParsePrefix("10.1.0.5/24")}) || len(e.Moved.Routes) != 1 {
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

// A later take adds to the record what it lacks and keeps what it has:
// what was recorded first is what the link had before anything was
// taken (the kernel strips a route of a preferred source it took).
func TestMergeMovedKeepsTheFirst(t *testing.T) {
	first := datapath.Moved{
		Addrs:  []datapath.MovedAddr{{Prefix: netip.MustParsePrefix("10.1.0.5/24"), Scope: 0}},
		Routes: []datapath.MovedRoute{{Family: unix.AF_INET6, Table: 254, Dst: netip.MustParsePrefix("fd00::/64"), Metric: 1024, Type: 1, Dev: 3, PrefSrc: netip.MustParseAddr("fd01::2")}},
	}
	m, changed := mergeMoved(nil, first)
	if !changed || len(m.Addrs) != 1 || len(m.Routes) != 1 {
		t.Fatalf("first merge = %+v, %v", m, changed)
	}
	later := datapath.Moved{
		Addrs: []datapath.MovedAddr{{Prefix: netip.MustParsePrefix("10.1.0.5/24"), Scope: 253}, {Prefix: netip.MustParsePrefix("10.2.0.5/24")}},
		Routes: []datapath.MovedRoute{{Family: unix.AF_INET6, Table: 254, Dst: netip.MustParsePrefix("fd00::/64"), Metric: 1024, Type: 1, Dev: 3},
			{Family: unix.AF_INET6, Table: 254, Dst: netip.MustParsePrefix("fd00::/64"), Metric: 100, Type: 1, Dev: 3}},
	}
	m2, changed := mergeMoved(&m, later)
	if !changed || len(m2.Addrs) != 2 || m2.Addrs[0].Scope != 0 || len(m2.Routes) != 2 || m2.Routes[0].Src != "fd01::2" {
		t.Errorf("later merge = %+v, want the first address and route kept, the new ones added", m2)
	}
	if _, changed := mergeMoved(&m2, later); changed {
		t.Error("merging what the record has changed it")
	}
	// Converted back, every attribute is there.
	got, err := movedOf(state.Endpoint{LinkMAC: macN(1).String(), Moved: &m2})
	if err != nil || !reflect.DeepEqual(got.Routes[0], first.Routes[0]) {
		t.Errorf("movedOf = %+v, %v; want %+v first", got.Routes, err, first.Routes[0])
	}
}
