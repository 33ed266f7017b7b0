package datapath

import (
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/vishvananda/netlink/nl"
)

// Lifetimes count down while a link's addresses are lent: an address
// comes back with what is left of them, deprecated once its preferred
// lifetime is over, and not at all once its valid lifetime is, nor do the
// routes that needed it.
func TestGiveBackCountsLifetimesDown(t *testing.T) {
	ns, host := testnet.NewNS(t, "tapsync-lft"), testnet.NewNS(t, "tapsync-lfthost")
	testnet.Veth(t, ns, "eth0", net.HardwareAddr{0x02, 0, 0, 0, 0, 1}, host, "host0")
	testnet.IP(t, "-n", ns.Name, "addr", "add", "10.8.0.2/24", "dev", "eth0", "valid_lft", "100", "preferred_lft", "50")
	testnet.IP(t, "-n", ns.Name, "addr", "add", "10.8.1.2/24", "dev", "eth0", "valid_lft", "1000", "preferred_lft", "900")
	testnet.IP(t, "-n", ns.Name, "route", "add", "10.9.0.0/24", "via", "10.8.0.1")
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	eth0, err := libOf(t, n).LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	idx := eth0.Attrs().Index
	r := n.rtnl()

	take := func() Moved {
		t.Helper()
		now := monotonic()
		addrs, routes, err := r.lent(idx, "eth0", now)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.take(idx, addrs, now); err != nil {
			t.Fatal(err)
		}
		return Moved{Addrs: addrs, Routes: routes}
	}
	have := func() map[string]addrRead {
		t.Helper()
		as, err := r.addrs(idx, monotonic())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]addrRead{}
		for _, a := range as {
			out[a.Prefix.String()] = a
		}
		return out
	}

	// 60 s later: 10.8.0.2 has 40 s of its valid lifetime left and none
	// of its preferred one.
	m := take()
	if err := r.giveBack(idx, "eth0", m, monotonic()+60*time.Second); err != nil {
		t.Fatal(err)
	}
	a := have()["10.8.0.2/24"]
	if valid := a.ValidUntil - monotonic(); valid > 41*time.Second || valid < 35*time.Second || a.flags&0x20 == 0 {
		t.Errorf("10.8.0.2 given back with %s valid, flags %#x; want 40s and deprecated", valid, a.flags)
	}
	if valid := have()["10.8.1.2/24"].ValidUntil - monotonic(); valid > 941*time.Second || valid < 935*time.Second {
		t.Errorf("10.8.1.2 given back with %s valid, want 940s", valid)
	}

	// 200 s later: 10.8.0.2 is over, and its route with it.
	m = take()
	if err := r.giveBack(idx, "eth0", m, monotonic()+200*time.Second); err != nil {
		t.Fatal(err)
	}
	as := have()
	if _, ok := as["10.8.1.2/24"]; !ok || len(as) != 2 { // and the link-local address
		t.Errorf("given back %v, want 10.8.1.2 alone", as)
	}
	routes, err := r.routes(monotonic())
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(routes, func(rt routeRead) bool { return rt.Dst.String() == "10.9.0.0/24" }) {
		t.Error("the route through 10.8.0.1, reachable only through the expired address, was given back")
	}
}

// FuzzParseRtnl feeds arbitrary bytes to the route and address message
// decoders: they return an error or a value, never panic, and a route
// they decode encodes again.
func FuzzParseRtnl(f *testing.F) {
	route := MovedRoute{Family: 2, Table: 100, Dst: netip.MustParsePrefix("10.0.0.0/8"), Type: 1, Metric: 100, Dev: 2,
		Gateway: netip.MustParseAddr("10.1.0.1"), Metrics: map[string]uint32{"mtu": 1400, "lock": 4},
		Hops: []Hop{{Dev: 2, Gateway: netip.MustParseAddr("10.1.0.2"), Weight: 2}}}
	f.Add(serialize(routeMsg(route, 0)))
	addr := MovedAddr{Prefix: netip.MustParsePrefix("10.1.0.5/24"), Broadcast: netip.MustParseAddr("10.1.0.255"), Label: "eth0:1", Metric: 5, ValidUntil: time.Minute}
	f.Add(serialize(addrMsg(addr, 2, 0, false)))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := parseRoute(b, time.Hour); err == nil && r.Dst.IsValid() {
			_ = serialize(routeMsg(r.MovedRoute, time.Hour))
			_ = hostnet.ObservedMessage(b)
			_, _ = routeOf(r) // no panic on any route the parser accepts

		}
		if a, err := parseAddr(b, time.Hour); err == nil && a.Prefix.IsValid() {
			_ = serialize(addrMsg(a.MovedAddr, 1, time.Hour, false))
		}
	})
}

func serialize(data []nl.NetlinkRequestData) []byte {
	var b []byte
	for _, d := range data {
		b = append(b, d.Serialize()...)
	}
	return b
}
