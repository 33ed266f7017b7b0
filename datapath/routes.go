package datapath

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/vishvananda/netlink"
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
	h, err := n.lib()
	if err != nil {
		return nil, err
	}
	// Equivalent to: ip -n <netns> route show table main; ip -n <netns> -6 route show table main
	// One dump of both families. Without a table filter the library
	// skips every route outside the main table before decoding it; with
	// RT_FILTER_TABLE it decodes the local table's (one per address, link
	// and broadcast) first, which was a tenth of a no-op pass. toRoute
	// keeps the main table only either way.
	rs, err := dump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{}, 0)
	})
	if err != nil {
		return nil, fmt.Errorf("list routes in netns %s: %w", n.path, err)
	}
	var out []Route
	for _, r := range rs {
		if rt, ok := toRoute(r); ok {
			out = append(out, rt)
		}
	}
	return out, nil
}

func toRoute(r netlink.Route) (Route, bool) {
	if !hostnet.Observed(uint32(r.Table), uint8(r.Type), uint8(r.Protocol)) {
		return Route{}, false
	}
	if r.Family != netlink.FAMILY_V4 && r.Family != netlink.FAMILY_V6 {
		return Route{}, false
	}
	out := Route{
		LinkIndex: r.LinkIndex,
		Scope:     uint8(r.Scope),
		IPv6:      r.Family == netlink.FAMILY_V6,
		Protocol:  int(r.Protocol),
		MTU:       r.MTU,
		Metric:    r.Priority,
		Gateway:   addrOf(r.Gw),
		Src:       addrOf(r.Src),
	}
	if r.Dst != nil {
		p, ok := prefixOf(r.Dst)
		if !ok {
			return Route{}, false
		}
		// A /0 is the default route, however it was written.
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
	h, err := n.lib()
	if err != nil {
		return nil, err
	}
	// Equivalent to: ip -n <netns> neigh show nud permanent
	ns, err := dump(func() ([]netlink.Neigh, error) { return h.NeighList(0, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("list neighbours in netns %s: %w", n.path, err)
	}
	var out []Neighbor
	for _, nb := range ns {
		if nb.State&netlink.NUD_PERMANENT == 0 || (nb.Family != netlink.FAMILY_V4 && nb.Family != netlink.FAMILY_V6) {
			continue
		}
		ip := addrOf(nb.IP)
		if !ip.IsValid() {
			continue
		}
		out = append(out, Neighbor{IP: ip, MAC: nb.HardwareAddr, LinkIndex: nb.LinkIndex, State: nb.State, Flags: nb.Flags})
	}
	return out, nil
}
