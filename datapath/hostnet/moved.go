package hostnet

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Moved is what datapath's EnsureMacvtap took from a container link, and
// what its RestoreContainerLink gives back: its own MAC (now the guest's),
// its addresses (they would make the host answer ARP and neighbour
// discovery for the guest) and the routes of every table that go with them, each
// with every attribute it had.
type Moved struct {
	MAC   net.HardwareAddr
	Addrs []MovedAddr // in the kernel's order
	// Routes are the routes through the link, in any table, and those
	// with one of its addresses as preferred source: the kernel deletes an
	// IPv4 route with the last IPv4 address of its device or with its
	// preferred source, and strips an IPv6 route of its preferred source.
	Routes []MovedRoute
}

// MovedAddr is one address the macvtap model took from a container link,
// with everything it takes to add it back as it was.
type MovedAddr struct {
	Prefix    netip.Prefix // the local address and the prefix length
	Peer      netip.Addr   // the other end of a point-to-point address; zero: none
	Broadcast netip.Addr   // IPv4; zero: none
	Label     string       // IPv4, when it is not the link's own name
	Scope     uint8
	Flags     uint32 // the IFA_F_* bits that are set, not the kernel's state (see datapath's addrFlagsSet)
	Metric    uint32 // of the address's prefix route (IFA_RT_PRIORITY)
	Proto     uint8  // who made it (IFA_PROTO)
	// ValidUntil and PreferredUntil end the address's lifetimes, as
	// instants on CLOCK_MONOTONIC (the kernel counts lifetimes on that
	// clock); zero: forever. An address is given back with what is left
	// of them, and not at all once its valid lifetime is over.
	ValidUntil, PreferredUntil time.Duration
}

func (a MovedAddr) String() string {
	s := a.Prefix.String()
	if a.Peer.IsValid() {
		s = fmt.Sprintf("%s peer %s/%d", a.Prefix.Addr(), a.Peer, a.Prefix.Bits())
	}
	if a.Broadcast.IsValid() {
		s += " brd " + a.Broadcast.String()
	}
	s += fmt.Sprintf(" scope %d", a.Scope)
	if a.Label != "" {
		s += " label " + a.Label
	}
	if a.Flags != 0 {
		s += fmt.Sprintf(" flags %#x", a.Flags)
	}
	if a.Metric != 0 {
		s += fmt.Sprintf(" metric %d", a.Metric)
	}
	if a.Proto != 0 {
		s += fmt.Sprintf(" proto %d", a.Proto)
	}
	if a.ValidUntil != 0 {
		s += " valid_lft finite"
	}
	if a.PreferredUntil != 0 {
		s += " preferred_lft finite"
	}
	return s
}

// MovedRoute is one route that went, or may go, with a container link's
// addresses: a route of any table through the link, or with one of its
// addresses as preferred source; with everything it takes to add it back
// as it was.
type MovedRoute struct {
	Family   uint8 // unix.AF_INET, unix.AF_INET6
	Table    uint32
	Dst      netip.Prefix // 0.0.0.0/0 or ::/0 for a default route
	From     netip.Prefix // source prefix (IPv6 source-specific routing); zero: none
	Tos      uint8
	Protocol uint8
	Scope    uint8
	Type     uint8  // RTN_*
	Flags    uint32 // the RTNH_F_* that are set (onlink, pervasive), not the kernel's state
	Metric   uint32 // priority
	Dev      int    // ifindex; 0 for a multipath route
	Gateway  netip.Addr
	PrefSrc  netip.Addr
	Hops     []Hop             // a multipath route's nexthops
	Metrics  map[string]uint32 // RTAX_* by iproute2's names (mtu, advmss, lock, …)
	CongCtl  string            // RTAX_CC_ALGO
	Pref     uint8             // IPv6 router preference (RTA_PREF)
	Realm    uint32            // RTA_FLOW
	// ExpiresAt is when an IPv6 route expires, on CLOCK_MONOTONIC; zero:
	// never.
	ExpiresAt time.Duration
}

// Hop is one nexthop of a multipath route.
type Hop struct {
	Dev     int
	Gateway netip.Addr
	Weight  int
	Flags   uint8
	Realm   uint32
}

func (r MovedRoute) String() string {
	s := fmt.Sprintf("%s table %d", r.Dst, r.Table)
	if r.From.IsValid() {
		s += " from " + r.From.String()
	}
	if r.Gateway.IsValid() {
		s += " via " + r.Gateway.String()
	}
	if r.Dev != 0 {
		s += fmt.Sprintf(" dev %d", r.Dev)
	}
	for _, h := range r.Hops {
		s += fmt.Sprintf(" nexthop via %s dev %d weight %d", h.Gateway, h.Dev, h.Weight)
	}
	if r.PrefSrc.IsValid() {
		s += " src " + r.PrefSrc.String()
	}
	s += fmt.Sprintf(" type %d proto %d scope %d metric %d", r.Type, r.Protocol, r.Scope, r.Metric)
	if r.Tos != 0 {
		s += fmt.Sprintf(" tos %d", r.Tos)
	}
	if r.Flags != 0 {
		s += fmt.Sprintf(" flags %#x", r.Flags)
	}
	for _, k := range slices.Sorted(maps.Keys(r.Metrics)) {
		s += fmt.Sprintf(" %s %d", k, r.Metrics[k])
	}
	if r.CongCtl != "" {
		s += " congctl " + r.CongCtl
	}
	if r.Pref != 0 {
		s += fmt.Sprintf(" pref %d", r.Pref)
	}
	if r.Realm != 0 {
		s += fmt.Sprintf(" realm %d", r.Realm)
	}
	if r.ExpiresAt != 0 {
		s += " expires"
	}
	return s
}

// Route is r as datapath's Routes reports it, if it reports it: a unicast route
// of the main table that the kernel did not derive by itself.
func (r MovedRoute) Route() (Route, bool) {
	if r.Table != unix.RT_TABLE_MAIN || r.Type != unix.RTN_UNICAST || r.Protocol == unix.RTPROT_KERNEL ||
		(r.Family != unix.AF_INET && r.Family != unix.AF_INET6) {
		return Route{}, false
	}
	out := Route{LinkIndex: r.Dev, Gateway: r.Gateway, Src: r.PrefSrc, Scope: r.Scope, IPv6: r.Family == unix.AF_INET6,
		Protocol: int(r.Protocol), MTU: int(r.Metrics["mtu"]), Metric: int(r.Metric)}
	if r.Dst.Bits() > 0 {
		out.Dst = r.Dst
	}
	if len(r.Hops) > 0 && r.Dev == 0 {
		out.LinkIndex, out.Gateway = r.Hops[0].Dev, r.Hops[0].Gateway
	}
	return out, true
}
