package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// linkView is what this package reads of a link: parseLink must agree
// with the netlink library's own decoding on all of it.
type linkView struct {
	Link           Link
	Type           string
	Tap            *Tap
	MacvtapMode    string
	TxQLen, TxQs   int
	NetNsID, Owner int
}

func viewOf(l netlink.Link) linkView {
	v := linkView{Link: toLink(l), Type: l.Type(), TxQLen: l.Attrs().TxQLen, TxQs: l.Attrs().NumTxQueues, NetNsID: l.Attrs().NetNsID}
	if t, ok := l.(*netlink.Tuntap); ok {
		tp := toTap(t, 0)
		v.Tap, v.Owner = &tp, int(t.Owner)
	}
	if m, ok := l.(*netlink.Macvtap); ok {
		v.MacvtapMode = macvlanModes[m.Mode]
	}
	return v
}

// richNetns is a netns with every kind of link a sandbox netns may hold
// here, and qdiscs of every kind this package reads.
func richNetns(t testing.TB) *Netns {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	ns, host := testnet.NewNS(t, "tapsync-lmsg"), testnet.NewNS(t, "tapsync-lmsghost")
	testnet.Veth(t, ns, "eth0", net.HardwareAddr{0x02, 0, 0, 0, 0, 1}, host, "host0")
	testnet.Veth(t, ns, "eth1", net.HardwareAddr{0x02, 0, 0, 0, 0, 2}, ns, "peer1")
	testnet.Veth(t, ns, "eth2", net.HardwareAddr{0x02, 0, 0, 0, 0, 3}, host, "host2")
	for _, args := range [][]string{
		{"link", "set", "eth0", "up", "mtu", "1400"},
		{"link", "property", "add", "dev", "eth0", "altname", "ctr-primary"},
		{"tuntap", "add", "tap0_ts", "mode", "tap", "multi_queue", "vnet_hdr", "user", "1000"},
		{"tuntap", "add", "tun3", "mode", "tun", "one_queue"},
		{"link", "set", "tap0_ts", "up", "txqueuelen", "500"},
		{"link", "add", "link", "eth2", "name", "mvt0", "type", "macvtap", "mode", "passthru"},
		{"link", "add", "link", "peer1", "name", "mvt1", "type", "macvtap", "mode", "bridge"},
		{"link", "add", "link", "eth1", "name", "mvl0", "type", "macvlan", "mode", "private"},
		{"link", "add", "tsi0", "type", "ifb"},
		{"link", "add", "br0", "type", "bridge"},
		{"link", "set", "eth0", "master", "br0"},
	} {
		testnet.IP(t, append([]string{"-n", ns.Name}, args...)...)
	}
	for _, args := range [][]string{
		{"qdisc", "add", "dev", "eth1", "ingress"},
		{"qdisc", "add", "dev", "peer1", "clsact"},
		{"qdisc", "add", "dev", "tap0_ts", "root", "handle", "7453:", "htb"},
		{"qdisc", "add", "dev", "tsi0", "root", "handle", "1:", "pfifo_fast"},
		{"filter", "add", "dev", "eth1", "parent", "ffff:", "prio", "29779", "protocol", "all", "u32", "match", "u32", "0", "0",
			"action", "mirred", "egress", "redirect", "dev", "tap0_ts"},
		{"filter", "add", "dev", "eth1", "parent", "ffff:", "prio", "100", "protocol", "ip", "u32", "match", "u32", "0", "0",
			"classid", "1:1"},
		{"filter", "add", "dev", "eth1", "parent", "ffff:", "prio", "200", "protocol", "all", "u32", "match", "u32", "0", "0",
			"action", "mirred", "egress", "mirror", "dev", "tsi0", "pipe", "action", "mirred", "egress", "redirect", "dev", "tap0_ts"},
		{"filter", "add", "dev", "peer1", "ingress", "prio", "7", "protocol", "all", "u32", "match", "u32", "0", "0",
			"action", "mirred", "ingress", "redirect", "dev", "eth1"},
	} {
		testnet.Run(t, "tc", append([]string{"-n", ns.Name}, args...)...)
	}
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// Every kind of link a sandbox netns may hold reads the same through
// parseLink as through the library.
func TestParseLinkAgreesWithLibrary(t *testing.T) {
	n := richNetns(t)
	lib, err := libOf(t, n).LinkList()
	if err != nil {
		t.Fatal(err)
	}
	ours, err := n.dumpLinks()
	if err != nil {
		t.Fatal(err)
	}
	if len(ours) != len(lib) || len(lib) < 12 {
		t.Fatalf("dump: %d links, library: %d; want the same, at least 12", len(ours), len(lib))
	}
	byIndex := map[int]netlink.Link{}
	for _, l := range lib {
		byIndex[l.Attrs().Index] = l
	}
	kinds := map[string]bool{}
	for _, l := range ours {
		want, ok := byIndex[l.Attrs().Index]
		if !ok {
			t.Errorf("%s (ifindex %d): not in the library's dump", l.Attrs().Name, l.Attrs().Index)
			continue
		}
		if got, want := viewOf(l), viewOf(want); !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n parseLink %+v\n library   %+v", want.Link.Name, got, want)
		}
		kinds[viewOf(l).Link.Kind] = true
	}
	for _, k := range []string{"device", "veth", "tap", "tun", "macvtap", "macvlan", "ifb", "bridge"} {
		if !kinds[k] {
			t.Errorf("no %s among the links read: the test covers less than it says", k)
		}
	}
}

// Every qdisc reads the same through parseQdisc as through the library:
// link, handle, parent and kind.
func TestParseQdiscAgreesWithLibrary(t *testing.T) {
	n := richNetns(t)
	lib, err := libOf(t, n).QdiscList(nil)
	if err != nil {
		t.Fatal(err)
	}
	ours, err := n.dumpQdiscs()
	if err != nil {
		t.Fatal(err)
	}
	type view struct {
		Link           int
		Handle, Parent uint32
		Type           string
	}
	views := func(qs []netlink.Qdisc) []view {
		var out []view
		for _, q := range qs {
			a := q.Attrs()
			out = append(out, view{a.LinkIndex, a.Handle, a.Parent, q.Type()})
		}
		return out
	}
	got, want := views(ours), views(lib)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("parseQdisc:\n %+v\nlibrary:\n %+v", got, want)
	}
	kinds := map[string]bool{}
	for _, v := range got {
		kinds[v.Type] = true
	}
	for _, k := range []string{"ingress", "clsact", "htb", "pfifo_fast", "noqueue"} {
		if !kinds[k] {
			t.Errorf("no %s qdisc read: the test covers less than it says", k)
		}
	}
}

// Every filter at an ingress hook reads the same through parseFilter as
// through the library, for all this package reads: kind, attributes, and
// a u32's mirred actions.
func TestParseFilterAgreesWithLibrary(t *testing.T) {
	n := richNetns(t)
	type view struct {
		Type    string
		Attrs   netlink.FilterAttrs
		Mirreds []netlink.MirredAction
	}
	views := func(fs []netlink.Filter) []view {
		var out []view
		for _, f := range fs {
			v := view{Type: f.Type(), Attrs: *f.Attrs()}
			if u, ok := f.(*netlink.U32); ok {
				for _, a := range u.Actions {
					if m, ok := a.(*netlink.MirredAction); ok {
						m := *m
						m.Statistics, m.Timestamp = nil, nil
						v.Mirreds = append(v.Mirreds, m)
					}
				}
			}
			out = append(out, v)
		}
		return out
	}
	mirreds := 0
	for _, c := range []struct {
		link   string
		parent uint32
	}{{"eth1", netlink.MakeHandle(0xffff, 0)}, {"peer1", netlink.HANDLE_MIN_INGRESS}} {
		link, err := libOf(t, n).LinkByName(c.link)
		if err != nil {
			t.Fatal(err)
		}
		lib, err := libOf(t, n).FilterList(link, c.parent)
		if err != nil {
			t.Fatal(err)
		}
		ours, err := n.dumpFilters(link, c.parent)
		if err != nil {
			t.Fatal(err)
		}
		got, want := views(ours), views(lib)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: parseFilter:\n %#v\nlibrary:\n %#v", c.link, got, want) // %#v: Chain is a pointer
		}
		for _, v := range got {
			mirreds += len(v.Mirreds)
		}
	}
	if mirreds != 4 {
		t.Errorf("%d mirred actions read; want 4", mirreds)
	}
}

// FuzzParseLink feeds arbitrary bytes to the link, qdisc, filter, class
// and neighbour message decoders: they return a value or an error, never
// panic.
func FuzzParseLink(f *testing.F) {
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = 3
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_KIND, nl.ZeroTerminated("tun"))
	data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
	data.AddRtAttr(nl.IFLA_TUN_TYPE, []byte{2})
	data.AddRtAttr(nl.IFLA_TUN_MULTI_QUEUE, []byte{1})
	data.AddRtAttr(nl.IFLA_TUN_NUM_QUEUES, nl.Uint32Attr(2))
	props := nl.NewRtAttr(unix.IFLA_PROP_LIST|unix.NLA_F_NESTED, nil)
	props.AddRtAttr(unix.IFLA_ALT_IFNAME, nl.ZeroTerminated("alt"))
	f.Add(serialize([]nl.NetlinkRequestData{msg, nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated("tap0_ts")),
		nl.NewRtAttr(unix.IFLA_ADDRESS, []byte{2, 0, 0, 0, 0, 1}), info, props}))
	f.Add([]byte{})
	class := nl.NewRtAttr(unix.TCA_OPTIONS, nil)
	class.AddRtAttr(nl.TCA_HTB_PARMS, make([]byte, nl.SizeofTcHtbCopt))
	class.AddRtAttr(nl.TCA_HTB_RATE64, nl.Uint64Attr(5_000_000_000))
	f.Add(serialize([]nl.NetlinkRequestData{&nl.TcMsg{Handle: 0x74530001, Parent: 0x74530000, Ifindex: 3},
		nl.NewRtAttr(unix.TCA_KIND, nl.ZeroTerminated("htb")), class}))
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := parseLink(b)
		if err == nil {
			_ = viewOf(l)
		}
		if q, err := parseQdisc(b); err == nil {
			_ = q.Type()
		}
		if f, err := parseFilter(b); err == nil && f != nil {
			_ = f.Type()
		}
		if c, err := parseHTBClass(b); err == nil && c != nil {
			_ = c.Type()
		}
		// The library's decoding, where it does not look a link up (a
		// 16-byte link-layer address), reads the same address and MAC.
		// It takes an attribute type with a flag bit set (NLA_F_NESTED,
		// NLA_F_NET_BYTEORDER) for another type, where the kernel's
		// nla_type masks the bits, as parseNeighbor does: for a message
		// with such a type it is no reference.
		if nb, keep, err := parseNeighbor(b); err == nil && keep && len(nb.MAC) != 16 && len(b) >= unix.SizeofNdMsg && !attrTypeFlagged(b[unix.SizeofNdMsg:]) {
			if lib, err := libNeigh(b); err == nil {
				ip, _ := netip.AddrFromSlice(lib.IP)
				// ndm_ifindex is a C int: the library reads it unsigned,
				// so an index past 2^31 (no kernel's) differs in sign only.
				if ip.Unmap() != nb.IP || !bytes.Equal(lib.HardwareAddr, nb.MAC) || uint32(lib.LinkIndex) != uint32(nb.LinkIndex) {
					t.Errorf("neighbour %v, the library's %v %v dev %d", nb, lib.IP, lib.HardwareAddr, lib.LinkIndex)
				}
			}
		}
	})
}

// A dump whose decoding fails reports the first failure and decodes
// nothing after it; the rest of the dump is drained, so the socket's next
// exchange gets its own answers.
func TestDecodedDumpStopsDecodingAtFirstError(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-dumperr")
	peer := testnet.NewNS(t, "tapsync-dumperrp")
	testnet.Veth(t, ns, "eth0", nil, peer, "peer0")
	testnet.Veth(t, ns, "eth1", nil, peer, "peer1")
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	calls := 0
	bad := errors.New("bad message")
	_, err = decodedDump(n, unix.RTM_GETLINK, unix.RTM_NEWLINK, func([]byte) (netlink.Link, error) {
		calls++
		return nil, fmt.Errorf("message %d: %w", calls, bad)
	}, nl.NewIfInfomsg(unix.AF_UNSPEC))
	if !errors.Is(err, bad) || !strings.Contains(err.Error(), "message 1:") {
		t.Fatalf("dump = %v, want the first message's error", err)
	}
	if calls != 1 {
		t.Errorf("decoded %d messages, want 1: decoding goes on after the first error", calls)
	}
	links, err := n.dumpLinks()
	if err != nil || len(links) != 3 {
		t.Fatalf("the next dump = %d links, %v; want lo, eth0, eth1", len(links), err)
	}
}

// Addresses, routes and neighbours read on the Netns's own socket are
// what the netlink library read before (its decoding, then the filters
// and conversions this package applied): point-to-point addresses,
// secondaries, IPv6, gateways, a multipath route, metrics, a preferred
// source, other tables and the kernel's routes, permanent and learnt
// neighbours.
func TestAddrsRoutesNeighborsAgreeWithLibrary(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns, host := testnet.NewNS(t, "tapsync-arn"), testnet.NewNS(t, "tapsync-arnhost")
	testnet.Veth(t, ns, "eth0", net.HardwareAddr{0x02, 0, 0, 0, 1, 1}, host, "host0")
	testnet.Veth(t, ns, "eth1", net.HardwareAddr{0x02, 0, 0, 0, 1, 2}, host, "host1")
	for _, args := range [][]string{
		{"link", "set", "eth0", "up"},
		{"link", "set", "eth1", "up"},
		{"address", "add", "10.1.0.2/24", "dev", "eth0"},
		{"address", "add", "10.1.0.3/24", "dev", "eth0"},
		{"address", "add", "10.2.0.1", "peer", "10.2.0.2/24", "dev", "eth1"},
		{"-6", "address", "add", "2001:db8::2/64", "dev", "eth0", "nodad"},
		{"route", "add", "default", "via", "10.1.0.1", "dev", "eth0", "metric", "100"},
		{"route", "add", "10.9.0.0/16", "via", "10.1.0.1", "mtu", "1300", "src", "10.1.0.2"},
		{"route", "add", "10.8.0.0/16", "nexthop", "via", "10.1.0.1", "dev", "eth0", "nexthop", "dev", "eth1"},
		{"route", "add", "10.7.0.0/16", "via", "10.1.0.1", "table", "100"},
		{"route", "add", "10.6.0.0/16", "dev", "eth1", "proto", "static", "scope", "link"},
		{"-6", "route", "add", "2001:db8:1::/48", "via", "2001:db8::1", "dev", "eth0"},
		{"neigh", "add", "10.1.0.9", "lladdr", "02:00:00:00:01:09", "nud", "permanent", "dev", "eth0"},
		{"neigh", "add", "10.1.0.10", "lladdr", "02:00:00:00:01:0a", "nud", "stale", "dev", "eth0"},
		{"-6", "neigh", "add", "2001:db8::9", "lladdr", "02:00:00:00:01:19", "nud", "permanent", "dev", "eth0"},
	} {
		testnet.IP(t, append([]string{"-n", ns.Name}, args...)...)
	}
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	lib := libOf(t, n)
	same := func(what string, ours, theirs []string, least int) {
		t.Helper()
		slices.Sort(ours)
		slices.Sort(theirs)
		if !slices.Equal(ours, theirs) || len(ours) < least {
			t.Errorf("%s:\n ours    %q\n library %q\n(want the same, at least %d)", what, ours, theirs, least)
		}
	}

	byLink, err := n.addrsByLink()
	if err != nil {
		t.Fatal(err)
	}
	var ours, theirs []string
	for i, ps := range byLink {
		for _, p := range ps {
			ours = append(ours, fmt.Sprintf("%d %s", i, p))
		}
	}
	las, err := lib.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range las {
		if p, ok := libPrefix(a.IPNet); ok {
			theirs = append(theirs, fmt.Sprintf("%d %s", a.LinkIndex, p))
		}
	}
	same("addresses", ours, theirs, 6)

	rs, err := n.Routes()
	if err != nil {
		t.Fatal(err)
	}
	ours, theirs = nil, nil
	for _, r := range rs {
		ours = append(ours, fmt.Sprintf("%+v", r))
	}
	lrs, err := lib.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range lrs {
		if rt, ok := libRoute(r); ok {
			theirs = append(theirs, fmt.Sprintf("%+v", rt))
		}
	}
	same("routes", ours, theirs, 5)

	nbs, err := n.Neighbors()
	if err != nil {
		t.Fatal(err)
	}
	ours, theirs = nil, nil
	for _, nb := range nbs {
		ours = append(ours, nb.String())
	}
	lns, err := lib.NeighList(0, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, nb := range lns {
		ip, ok := netip.AddrFromSlice(nb.IP)
		if nb.State&netlink.NUD_PERMANENT == 0 || (nb.Family != netlink.FAMILY_V4 && nb.Family != netlink.FAMILY_V6) || !ok {
			continue
		}
		theirs = append(theirs, Neighbor{IP: ip.Unmap(), MAC: nb.HardwareAddr, LinkIndex: nb.LinkIndex, State: nb.State, Flags: nb.Flags}.String())
	}
	same("neighbours", ours, theirs, 2)
}

// libPrefix is an address as this package read it from the library: the
// host bits kept, 10.1.2.3/24 stays 10.1.2.3/24.
func libPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ip = ip.Unmap()
	ones, bits := n.Mask.Size()
	if bits != ip.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(ip, ones), true
}

// libRoute is a route as this package read it from the library.
func libRoute(r netlink.Route) (Route, bool) {
	if !hostnet.Observed(uint32(r.Table), uint8(r.Type), uint8(r.Protocol)) {
		return Route{}, false
	}
	if r.Family != netlink.FAMILY_V4 && r.Family != netlink.FAMILY_V6 {
		return Route{}, false
	}
	out := Route{
		LinkIndex: r.LinkIndex, Scope: uint8(r.Scope), IPv6: r.Family == netlink.FAMILY_V6, Protocol: int(r.Protocol),
		MTU: r.MTU, Metric: r.Priority, Gateway: addrOf(r.Gw), Src: addrOf(r.Src),
	}
	if r.Dst != nil {
		p, ok := libPrefix(r.Dst)
		if !ok {
			return Route{}, false
		}
		if p.Bits() > 0 {
			out.Dst = p.Masked()
		}
	}
	if len(r.MultiPath) > 0 && r.LinkIndex == 0 {
		hop := r.MultiPath[0]
		out.LinkIndex, out.Gateway = hop.LinkIndex, addrOf(hop.Gw)
	}
	return out, true
}

// attrTypeFlagged says whether an attribute of b (up to the first
// malformed one) has a flag bit set in its type.
func attrTypeFlagged(b []byte) bool {
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b))
		if l < unix.SizeofRtAttr || l > len(b) {
			return false
		}
		if binary.NativeEndian.Uint16(b[2:])&^attrTypeMask != 0 {
			return true
		}
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1)):]
	}
	return false
}

// libNeigh is the library's decoding of a neighbour message, which
// panics on some malformed attributes instead of failing.
func libNeigh(b []byte) (n *netlink.Neigh, err error) {
	defer func() {
		if recover() != nil {
			n, err = nil, errors.New("the library panicked")
		}
	}()
	return netlink.NeighDeserialize(b)
}
