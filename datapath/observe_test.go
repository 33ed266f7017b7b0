package datapath_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

// TestObserveAddrsRoutesNeighbors gives eth0 what a CNI plugin gives a pod
// NIC (addresses of both families, routes, static neighbours) plus NOARP,
// and checks that Observe reports exactly that and nothing the kernel
// derived by itself.
func TestObserveAddrsRoutesNeighbors(t *testing.T) {
	s := newSandbox(t)
	ns := s.ns.Name
	testnet.IP(t, "-n", ns, "link", "set", "eth0", "arp", "off")
	testnet.IP(t, "-n", ns, "address", "add", "10.20.0.5/24", "dev", "eth0")
	testnet.IP(t, "-n", ns, "address", "add", "fd00:20::5/64", "dev", "eth0", "nodad")
	testnet.IP(t, "-n", ns, "route", "add", "default", "via", "10.20.0.1", "dev", "eth0")
	testnet.IP(t, "-n", ns, "route", "add", "10.30.0.0/16", "dev", "eth0", "src", "10.20.0.5", "mtu", "1400", "proto", "static")
	testnet.IP(t, "-n", ns, "-6", "route", "add", "default", "via", "fd00:20::1", "dev", "eth0")
	testnet.IP(t, "-n", ns, "neigh", "add", "10.20.0.1", "lladdr", "02:00:00:00:00:01", "dev", "eth0", "nud", "permanent")
	testnet.IP(t, "-n", ns, "-6", "neigh", "add", "fd00:20::1", "lladdr", "02:00:00:00:00:06", "dev", "eth0", "nud", "permanent")
	testnet.IP(t, "-n", ns, "neigh", "add", "10.20.0.2", "lladdr", "02:00:00:00:00:02", "dev", "eth0", "nud", "stale")
	// A second container link, down, with ARP and no address.
	testnet.IP(t, "-n", ns, "link", "add", "net1", "type", "veth", "peer", "name", "net1p")

	// The kernel adds eth0's link-local address (EUI-64 of containerMAC)
	// once it sees the carrier, which it notices asynchronously.
	linkLocal := netip.MustParsePrefix("fe80::54:53ff:fe00:102/64")
	var st datapath.State
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if st, err = s.n.Observe(datapath.All); err != nil {
			t.Fatal(err)
		}
		if slices.Contains(linkOf(t, st, "eth0").Addrs, linkLocal) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("eth0 never got its link-local address %s; last seen %v", linkLocal, linkOf(t, st, "eth0").Addrs)
		}
		time.Sleep(10 * time.Millisecond)
	}

	eth0 := linkOf(t, st, "eth0")
	wantAddrs := []netip.Prefix{
		netip.MustParsePrefix("10.20.0.5/24"),
		netip.MustParsePrefix("fd00:20::5/64"),
		linkLocal,
	}
	if !sameElements(eth0.Addrs, wantAddrs) {
		t.Errorf("eth0 addresses = %v, want %v", eth0.Addrs, wantAddrs)
	}
	if eth0.Addrs[0] != wantAddrs[0] {
		t.Errorf("eth0 addresses = %v, want the IPv4 address first", eth0.Addrs)
	}
	if !eth0.NoARP {
		t.Errorf("eth0 = %+v, want NoARP", eth0)
	}
	if net1 := linkOf(t, st, "net1"); net1.NoARP || len(net1.Addrs) != 0 {
		t.Errorf("net1 = %+v, want ARP on and no addresses", net1)
	}

	idx := eth0.Ifindex
	wantRoutes := []datapath.Route{
		{Gateway: netip.MustParseAddr("10.20.0.1"), LinkIndex: idx, Scope: unix.RT_SCOPE_UNIVERSE, Protocol: unix.RTPROT_BOOT},
		{Dst: netip.MustParsePrefix("10.30.0.0/16"), LinkIndex: idx, Src: netip.MustParseAddr("10.20.0.5"),
			Scope: unix.RT_SCOPE_LINK, Protocol: unix.RTPROT_STATIC, MTU: 1400},
		{Gateway: netip.MustParseAddr("fd00:20::1"), LinkIndex: idx, Scope: unix.RT_SCOPE_UNIVERSE, IPv6: true, Protocol: unix.RTPROT_BOOT, Metric: 1024},
	}
	// Absent: 10.20.0.0/24, fd00:20::/64, fe80::/64 (proto kernel, from
	// the addresses) and the local table.
	if !sameElements(st.Routes, wantRoutes) {
		t.Errorf("routes:\n got %s\nwant %s\nkernel:\n%s%s", formatList(st.Routes), formatList(wantRoutes),
			testnet.IP(t, "-n", ns, "route", "show", "table", "all"), testnet.IP(t, "-n", ns, "-6", "route", "show", "table", "all"))
	}

	wantNeigh := []datapath.Neighbor{
		{IP: netip.MustParseAddr("10.20.0.1"), MAC: mac(t, "02:00:00:00:00:01"), LinkIndex: idx, State: unix.NUD_PERMANENT},
		{IP: netip.MustParseAddr("fd00:20::1"), MAC: mac(t, "02:00:00:00:00:06"), LinkIndex: idx, State: unix.NUD_PERMANENT},
	}
	if !sameElements(st.Neighbors, wantNeigh) {
		t.Errorf("neighbours:\n got %s\nwant %s\nkernel:\n%s", formatList(st.Neighbors), formatList(wantNeigh),
			testnet.IP(t, "-n", ns, "neigh", "show", "nud", "all"))
	}

	// The parts left out are not read; the rest is the same.
	if none, err := s.n.Observe(datapath.Parts{}); err != nil {
		t.Fatal(err)
	} else if len(none.Routes) != 0 || len(none.Neighbors) != 0 || len(linkOf(t, none, "eth0").Addrs) != 0 ||
		linkOf(t, none, "eth0").Ifindex != eth0.Ifindex {
		t.Errorf("Observe without addresses, routes and neighbours = %+v", none)
	}
	if part, err := s.n.Observe(datapath.Parts{Addrs: true, Routes: true}); err != nil {
		t.Fatal(err)
	} else if !sameElements(part.Routes, wantRoutes) || len(part.Neighbors) != 0 || !sameElements(linkOf(t, part, "eth0").Addrs, wantAddrs) {
		t.Errorf("Observe with addresses and routes: %+v", part)
	}
}

func TestObserveEmptyNetns(t *testing.T) {
	ns := testnet.NewNS(t, "tapsync-dpempty") // loopback up: its routes are the kernel's
	n, err := datapath.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	st, err := n.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Links) != 0 || len(st.Taps) != 0 || len(st.Redirects) != 0 || len(st.Routes) != 0 || len(st.Neighbors) != 0 {
		t.Errorf("Observe(empty netns) = %+v, want nothing", st)
	}
}

func linkOf(t *testing.T, st datapath.State, name string) datapath.Link {
	t.Helper()
	for _, l := range st.Links {
		if l.Name == name {
			return l
		}
	}
	t.Fatalf("no container link %s in %v", name, st.Links)
	return datapath.Link{}
}

func mac(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// sameElements says whether got and want hold the same values, in any
// order.
func sameElements[T any](got, want []T) bool {
	if len(got) != len(want) {
		return false
	}
	used := make([]bool, len(got))
next:
	for _, w := range want {
		for i, g := range got {
			if !used[i] && reflect.DeepEqual(g, w) {
				used[i] = true
				continue next
			}
		}
		return false
	}
	return true
}

func formatList[T any](l []T) string {
	var b strings.Builder
	for _, v := range l {
		fmt.Fprintf(&b, "\n  %+v", v)
	}
	if b.Len() == 0 {
		return "(none)"
	}
	return b.String()
}

// An observation makes no qdisc dump while every link's root qdisc, which
// the link dump names, is a plain one: the redirects on an ingress hook
// and on a clsact hook are found by filter dumps alone. An HTB at a
// link's root (what a limit of ours is) brings the dump back, and one
// that holds handle ffff: with a class ffff:fff2 is not taken for an
// ingress hook, though the filter of that class is one of ours in all
// but its place.
func TestObserveQdiscDumpOnlyWhenNeeded(t *testing.T) {
	s := newSandbox(t)
	ns := s.ns.Name
	tp, err := s.n.EnsureTap(context.Background(), datapath.TapSpec{Index: 0, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	prio := strconv.Itoa(int(datapath.FilterPriority))
	testnet.Veth(t, s.ns, "net1", nil, s.host, "host1")
	testnet.Run(t, "tc", "-n", ns, "qdisc", "add", "dev", "net1", "clsact")
	testnet.Run(t, "tc", "-n", ns, "filter", "add", "dev", "net1", "ingress", "prio", prio, "protocol", "all",
		"u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", tp.Name)
	want := []string{"eth0→" + tp.Name, "net1→" + tp.Name, tp.Name + "→eth0"}
	observe := func(wantQdiscDumps int) {
		t.Helper()
		counts := s.n.CountRequests(t)
		st, err := s.n.Observe(datapath.Parts{})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, r := range ownedRedirects(st.Redirects) {
			got = append(got, r.FromName+"→"+r.ToName)
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("owned redirects = %v, want %v", got, want)
		}
		if n := counts[unix.RTM_GETQDISC]; n != wantQdiscDumps {
			t.Errorf("qdisc dumps in the observation = %d, want %d", n, wantQdiscDumps)
		}
	}
	observe(0)

	testnet.Veth(t, s.ns, "net2", nil, s.host, "host2")
	testnet.Run(t, "tc", "-n", ns, "qdisc", "add", "dev", "net2", "root", "handle", "ffff:", "htb")
	testnet.Run(t, "tc", "-n", ns, "class", "add", "dev", "net2", "parent", "ffff:", "classid", "ffff:fff2", "htb", "rate", "1mbit")
	testnet.Run(t, "tc", "-n", ns, "filter", "add", "dev", "net2", "parent", "ffff:fff2", "prio", prio, "protocol", "all",
		"u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", tp.Name)
	observe(1)
}
