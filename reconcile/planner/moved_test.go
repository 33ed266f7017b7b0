package planner

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
	"golang.org/x/sys/unix"
)

// A later take adds to the record what it lacks and keeps what it has:
// what was recorded first is what the link had before anything was
// taken (the kernel strips a route of a preferred source it took).
func TestMergeMovedKeepsTheFirst(t *testing.T) {
	first := hostnet.Moved{
		Addrs:  []hostnet.MovedAddr{{Prefix: netip.MustParsePrefix("10.1.0.5/24"), Scope: 0}},
		Routes: []hostnet.MovedRoute{{Family: unix.AF_INET6, Table: 254, Dst: netip.MustParsePrefix("fd00::/64"), Metric: 1024, Type: 1, Dev: 3, PrefSrc: netip.MustParseAddr("fd01::2")}},
	}
	m, changed := MergeMoved(nil, first)
	if !changed || len(m.Addrs) != 1 || len(m.Routes) != 1 {
		t.Fatalf("first merge = %+v, %v", m, changed)
	}
	later := hostnet.Moved{
		Addrs: []hostnet.MovedAddr{{Prefix: netip.MustParsePrefix("10.1.0.5/24"), Scope: 253}, {Prefix: netip.MustParsePrefix("10.2.0.5/24")}},
		Routes: []hostnet.MovedRoute{{Family: unix.AF_INET6, Table: 254, Dst: netip.MustParsePrefix("fd00::/64"), Metric: 1024, Type: 1, Dev: 3},
			{Family: unix.AF_INET6, Table: 254, Dst: netip.MustParsePrefix("fd00::/64"), Metric: 100, Type: 1, Dev: 3}},
	}
	m2, changed := MergeMoved(&m, later)
	if !changed || len(m2.Addrs) != 2 || m2.Addrs[0].Scope != 0 || len(m2.Routes) != 2 || m2.Routes[0].Src != "fd01::2" {
		t.Errorf("later merge = %+v, want the first address and route kept, the new ones added", m2)
	}
	if _, changed := MergeMoved(&m2, later); changed {
		t.Error("merging what the record has changed it")
	}
	// Converted back, every attribute is there.
	got, err := movedOf(state.Endpoint{LinkMAC: "02:54:53:00:00:01", Moved: &m2})
	if err != nil || !reflect.DeepEqual(got.Routes[0], first.Routes[0]) {
		t.Errorf("movedOf = %+v, %v; want %+v first", got.Routes, err, first.Routes[0])
	}
}
