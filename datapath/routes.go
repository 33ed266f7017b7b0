package datapath

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Routes lists the routes of the main table, IPv4 and IPv6, that are
// unicast and not installed by the kernel itself (RTPROT_KERNEL: the prefix
// routes that follow addresses, the IPv6 link-local routes). Those are the
// routes someone chose, and the ones a guest does not derive by itself.
//
// A multipath route is reported with its first hop only (its LinkIndex
// and Gateway), so the guest gets a single-path route to the same
// destination rather than none.
//
// Routes through loopback or through an endpoint tap are reported too;
// which links matter is the caller's decision.
func (n *Netns) Routes() ([]Route, error) {
	// Equivalent to: ip -n <netns> route show table main; ip -n <netns> -6 route show table main
	// One dump of both families, every table, decoded as read. A route
	// the header already rules out (another table, the kernel's, not
	// unicast, the cache) is not decoded: the local table alone has one
	// per address, link and broadcast, and decoding them was a tenth of a
	// no-op pass when the library did.
	rs, err := parsedDump(n.dumper, unix.RTM_GETROUTE, unix.RTM_NEWROUTE, func(m []byte) (Route, bool, error) {
		if !hostnet.ObservedMessage(m) {
			return Route{}, false, nil
		}
		rt, err := parseRoute(m, 0)
		if err != nil {
			return Route{}, false, err
		}
		r, ok := routeOf(rt)
		return r, ok, nil
	}, &nl.RtMsg{})
	if err != nil {
		return nil, fmt.Errorf("list routes in netns %s: %w", n.path, err)
	}
	return rs, nil
}

// routeOf is the Route of rt, a route whose message header
// hostnet.ObservedMessage let through, if it is one a guest's route can
// describe (IPv4 or IPv6, with a destination). A gateway of another
// family (RTA_VIA: an IPv4 route through an IPv6 neighbour) is not one a
// guest's route can name: the route goes without it, as the netlink
// library read it here.
func routeOf(rt routeRead) (Route, bool) {
	if (rt.Family != unix.AF_INET && rt.Family != unix.AF_INET6) || !rt.Dst.IsValid() {
		return Route{}, false
	}
	v6 := rt.Family == unix.AF_INET6
	gateway := func(a netip.Addr) netip.Addr {
		if a.IsValid() && a.Is6() != v6 {
			return netip.Addr{}
		}
		return a
	}
	out := Route{
		LinkIndex: rt.Dev,
		Scope:     rt.Scope,
		IPv6:      v6,
		Protocol:  int(rt.Protocol),
		MTU:       int(rt.Metrics["mtu"]),
		Metric:    int(rt.Metric),
		Gateway:   gateway(rt.Gateway),
		Src:       rt.PrefSrc,
	}
	// A /0 is the default route, however it was written.
	if rt.Dst.Bits() > 0 {
		out.Dst = rt.Dst.Masked()
	}
	if len(rt.Hops) > 0 && rt.Dev == 0 {
		out.LinkIndex, out.Gateway = rt.Hops[0].Dev, gateway(rt.Hops[0].Gateway)
	}
	return out, true
}

// addrOf converts ip, or returns the zero Addr for none.
func addrOf(ip net.IP) netip.Addr {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}
	}
	return a.Unmap()
}

// Neighbors lists the permanent neighbour entries (NUD_PERMANENT), IPv4
// and IPv6, on every link: the ones someone set, not the ones the kernel
// learnt and will forget.
func (n *Netns) Neighbors() ([]Neighbor, error) {
	// Equivalent to: ip -n <netns> neigh show nud permanent
	ns, err := parsedDump(n.dumper, unix.RTM_GETNEIGH, unix.RTM_NEWNEIGH, parseNeighbor, &netlink.Ndmsg{Family: unix.AF_UNSPEC})
	if err != nil {
		return nil, fmt.Errorf("list neighbours in netns %s: %w", n.path, err)
	}
	return ns, nil
}

// parseNeighbor decodes an RTM_NEWNEIGH message, keeping a permanent
// IPv4 or IPv6 entry. A 4-byte link-layer address is a tunnel's IPv4
// endpoint, not a MAC: such an entry has none.
func parseNeighbor(m []byte) (Neighbor, bool, error) {
	if len(m) < unix.SizeofNdMsg { // family, pad ×3, ifindex, state, flags, type
		return Neighbor{}, false, fmt.Errorf("short neighbour message (%d bytes)", len(m))
	}
	family := m[0]
	state := binary.NativeEndian.Uint16(m[8:10])
	if state&unix.NUD_PERMANENT == 0 || (family != unix.AF_INET && family != unix.AF_INET6) {
		return Neighbor{}, false, nil // learnt, or a bridge's forwarding entry: not decoded
	}
	nb := Neighbor{
		LinkIndex: int(int32(binary.NativeEndian.Uint32(m[4:8]))),
		State:     int(state),
		Flags:     int(m[10]),
	}
	err := walkAttrs(m[unix.SizeofNdMsg:], func(typ uint16, v []byte) error {
		switch typ {
		case unix.NDA_DST:
			nb.IP = addrOf(v)
		case unix.NDA_LLADDR:
			if len(v) != 4 {
				nb.MAC = net.HardwareAddr(slices.Clone(v))
			}
		}
		return nil
	})
	if err != nil {
		return Neighbor{}, false, fmt.Errorf("neighbour message: %w", err)
	}
	return nb, nb.IP.IsValid(), nil
}
