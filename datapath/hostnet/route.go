package hostnet

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// Redirect is one u32 match-all filter with a mirred egress redirect
// action, found on the ingress hook of From.
type Redirect struct {
	From, To         int // ifindexes; To may name a device that no longer exists
	FromName, ToName string
	Priority         uint16
	Owned            bool // at datapath.FilterPriority: created by tapsync
}

func (r Redirect) String() string {
	return fmt.Sprintf("%s→%s(prio %d)", r.FromName, r.ToName, r.Priority)
}

// RateLimitOn is one of our limits as observed: a link and its egress
// limit in bits per second, or with Ingress its ingress limit through
// ifb tsi<Ifb> (Ifindex 0: no link's ingress is redirected to the ifb;
// BPS 0: the ifb carries no limit).
type RateLimitOn struct {
	Ifindex int
	Name    string
	BPS     uint64
	Ingress bool
	Ifb     int
}

// Observed reports whether a route of this table, type (RTN_*) and
// protocol (RTPROT_*) is one a Route describes: a unicast route of the
// main table not derived by the kernel from an address or a link. Only
// those are observed, so a change of any other route changes nothing a
// reconcile reads (the watcher drops its event).
func Observed(table uint32, typ, proto uint8) bool {
	return table == unix.RT_TABLE_MAIN && typ == unix.RTN_UNICAST && proto != unix.RTPROT_KERNEL
}

// ObservedMessage is Observed for a route message, read from its header
// (the rtmsg that starts data) alone: the one filter on route messages,
// by which the watcher drops an event and an observation skips a route
// without decoding either. The kernel puts a route's table in rtm_table
// whenever it fits (a table past 255 shows as RT_TABLE_COMPAT there), so
// the main table needs no look at RTA_TABLE. A cloned route (the kernel's
// cache, its exceptions) is never observed. A payload shorter than the
// header is let through, for the caller's parser to refuse.
func ObservedMessage(data []byte) bool {
	if len(data) < unix.SizeofRtMsg {
		return true
	}
	// rtm_table, rtm_type, rtm_protocol, rtm_flags
	return Observed(uint32(data[4]), data[7], data[5]) && binary.NativeEndian.Uint32(data[8:12])&unix.RTM_F_CLONED == 0
}

// Route is a route of the sandbox's main table that a CNI plugin or an
// administrator added (not one the kernel derived from an address).
type Route struct {
	Dst       netip.Prefix // invalid (zero) = default route
	Gateway   netip.Addr   // zero = none
	LinkIndex int
	Src       netip.Addr // preferred source, zero = none
	Scope     uint8      // RT_SCOPE_* value
	IPv6      bool
	Protocol  int // RTPROT_*
	MTU       int // RTAX_MTU metric, 0 = none
	Metric    int // priority
}

func (r Route) String() string {
	dst := "default"
	switch {
	case r.Dst.IsValid():
		dst = r.Dst.String()
	case r.IPv6:
		dst = "default (ipv6)"
	}
	s := fmt.Sprintf("%s dev %d", dst, r.LinkIndex)
	if r.Gateway.IsValid() {
		s += " via " + r.Gateway.String()
	}
	if r.Src.IsValid() {
		s += " src " + r.Src.String()
	}
	s += fmt.Sprintf(" proto %d scope %d", r.Protocol, r.Scope)
	if r.MTU != 0 {
		s += fmt.Sprintf(" mtu %d", r.MTU)
	}
	if r.Metric != 0 {
		s += fmt.Sprintf(" metric %d", r.Metric)
	}
	return s
}

// Neighbor is a permanent neighbour entry (ARP or NDP) of the sandbox.
type Neighbor struct {
	IP        netip.Addr
	MAC       net.HardwareAddr
	LinkIndex int
	State     int // NUD_* bits
	Flags     int // NTF_* bits
}

func (n Neighbor) String() string {
	return fmt.Sprintf("%s lladdr %s dev %d nud %#x flags %#x", n.IP, n.MAC, n.LinkIndex, n.State, n.Flags)
}
