package datapath_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestMacvtapGivesBackExactly: a link furnished as a CNI chain with sbr
// and an administrator leave it (two default routes, a policy-routing
// table with its rules, addresses with scopes, flags, labels, metrics
// and finite lifetimes, IPv6 routes with preferences and expiries, a
// route on another link with the link's address as source) is wired in
// the macvtap model and unwired: its addresses, every table's routes and
// the rules come back as they were, twice over.
func TestMacvtapGivesBackExactly(t *testing.T) {
	s := newSandbox(t)
	testnet.Furnish(t, s.ns, "eth0", 1)
	before := testnet.Facts(t, s.ns, "eth0")
	ctx := context.Background()
	spec := datapath.MacvtapSpec{Index: 0, Container: s.eth0.Ifindex, MAC: s.eth0.MAC, Queues: 1}
	_, moved, err := s.n.EnsureMacvtap(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	// While lent: no address, and the kernel took the IPv4 routes of
	// every table with them, and the one on lo from one of them.
	lent := testnet.Facts(t, s.ns, "eth0")
	for _, gone := range []string{"addr 10.71.0.2/24", "addr fd71::2/64",
		"route family 2 table 100 type 1 dst 0.0.0.0/0", "route family 2 table 254 type 1 dst 0.0.0.0/0 tos 0 proto 3 scope 0 metric 100",
		"route family 2 table 254 type 1 dst 10.71.96.0/24"} {
		if !strings.Contains(before, gone) || strings.Contains(lent, gone) {
			t.Errorf("%q: want it before, not while lent:\n%s", gone, lent)
		}
	}
	if err := s.n.RemoveMacvtap(0); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := s.n.RestoreContainerLink(s.eth0.Ifindex, moved); err != nil {
			t.Fatalf("RestoreContainerLink #%d: %v", i+1, err)
		}
		testnet.WaitDAD(t, s.ns, "eth0")
		if after := testnet.Facts(t, s.ns, "eth0"); after != before {
			t.Fatalf("after RestoreContainerLink #%d:\n%s", i+1, testnet.Diff(before, after))
		}
	}
	// Finite lifetimes come back counted down, not renewed.
	for _, a := range addrsOf(t, s.ns, "eth0") {
		switch a.IPNet.String() {
		case "10.71.1.2/24":
			if a.ValidLft <= 0 || a.ValidLft > 6000 || a.PreferedLft <= 0 || a.PreferedLft > 3000 {
				t.Errorf("%s: valid %d preferred %d, want at most 6000 and 3000 left", a.IPNet, a.ValidLft, a.PreferedLft)
			}
		case "fd71:1::5/64":
			if a.ValidLft <= 0 || a.ValidLft > 9000 || a.PreferedLft <= 0 || a.PreferedLft > 4000 {
				t.Errorf("%s: valid %d preferred %d, want at most 9000 and 4000 left", a.IPNet, a.ValidLft, a.PreferedLft)
			}
		}
	}
}

func addrsOf(t *testing.T, ns testnet.NS, dev string) []netlink.Addr {
	t.Helper()
	h := testnet.Handle(t, ns)
	l, err := h.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	as, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	return as
}

// EnsureMacvtap hands what it is about to take to spec.Keep while the
// link still has it, and takes nothing when Keep fails: the caller's
// record is written first.
func TestEnsureMacvtapKeepsBeforeTaking(t *testing.T) {
	s := macvtapSandbox(t)
	before := s.eth0
	spec := datapath.MacvtapSpec{Index: 0, Container: before.Ifindex, MAC: before.MAC, Queues: 1}
	refused := errors.New("state dir full")
	spec.Keep = func(m datapath.Moved) error {
		if l := s.link(t, "eth0"); !sameSet(l.Addrs, before.Addrs) || !sameSet(prefixes(m.Addrs), before.Addrs) || len(m.Routes) != 3 {
			t.Errorf("Keep given %+v while eth0 has %v; want every address, still there, and the 3 routes", m, l.Addrs)
		}
		return refused
	}
	if _, _, err := s.n.EnsureMacvtap(context.Background(), spec); !errors.Is(err, refused) {
		t.Fatalf("EnsureMacvtap with a failing Keep = %v, want its error", err)
	}
	if l := s.link(t, "eth0"); !sameSet(l.Addrs, before.Addrs) {
		t.Errorf("eth0 has %v after Keep failed, want %v", l.Addrs, before.Addrs)
	}
	var kept datapath.Moved
	spec.Keep = func(m datapath.Moved) error { kept = m; return nil }
	_, moved, err := s.n.EnsureMacvtap(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	if len(kept.Addrs) != len(moved.Addrs) || len(kept.Routes) != len(moved.Routes) || len(s.link(t, "eth0").Addrs) != 0 {
		t.Errorf("kept %+v, took %+v", kept, moved)
	}
}

// A link with a route the macvtap model could not give back as it was
// (here one through a nexthop object) keeps its addresses.
func TestMacvtapRefusesWhatItCannotGiveBack(t *testing.T) {
	s := macvtapSandbox(t)
	testnet.IP(t, "-n", s.ns.Name, "nexthop", "add", "id", "7", "via", "10.77.0.1", "dev", "eth0")
	testnet.IP(t, "-n", s.ns.Name, "route", "add", "10.98.0.0/16", "nhid", "7")
	_, _, err := s.n.EnsureMacvtap(context.Background(), datapath.MacvtapSpec{Index: 0, Container: s.eth0.Ifindex, MAC: s.eth0.MAC, Queues: 1})
	if !errors.Is(err, datapath.ErrCannotGiveBack) || !strings.Contains(err.Error(), "10.98.0.0/16") {
		t.Errorf("EnsureMacvtap = %v, want ErrCannotGiveBack naming 10.98.0.0/16", err)
	}
	if l := s.link(t, "eth0"); !sameSet(l.Addrs, s.eth0.Addrs) {
		t.Errorf("eth0 has %v, want %v kept", l.Addrs, s.eth0.Addrs)
	}
}

// A route someone put in a taken route's place meanwhile, through
// another link, is not theirs to replace: the give-back names it, gives
// back everything else, and completes once it is gone.
func TestRestoreLeavesAnotherRouteInItsPlace(t *testing.T) {
	s := macvtapSandbox(t)
	_, moved, err := s.n.EnsureMacvtap(context.Background(), datapath.MacvtapSpec{Index: 0, Container: s.eth0.Ifindex, MAC: s.eth0.MAC, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "-n", s.ns.Name, "route", "add", "10.99.0.0/16", "dev", "lo")
	if err := s.n.RemoveMacvtap(0); err != nil {
		t.Fatal(err)
	}
	err = s.n.RestoreContainerLink(s.eth0.Ifindex, moved)
	if !errors.Is(err, unix.EEXIST) || !strings.Contains(err.Error(), "10.99.0.0/16") {
		t.Errorf("RestoreContainerLink = %v, want EEXIST naming 10.99.0.0/16", err)
	}
	if got := testnet.IP(t, "-n", s.ns.Name, "route", "show", "default"); !strings.Contains(got, "via 10.77.0.1") {
		t.Errorf("default route not given back: %q", got)
	}
	testnet.IP(t, "-n", s.ns.Name, "route", "del", "10.99.0.0/16", "dev", "lo")
	if err := s.n.RestoreContainerLink(s.eth0.Ifindex, moved); err != nil {
		t.Errorf("RestoreContainerLink once the place is free: %v", err)
	}
}
