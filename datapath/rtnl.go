package datapath

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// rtnl speaks on the Netns's own route socket (the dumper) the address
// and route messages whose attributes the netlink library does not carry
// (an address's metric and protocol; a route's source prefix, preference,
// expiry, hop weights, every metric and lock). The macvtap model reads
// what it takes from a container link and gives it back through it, and
// every observation reads the netns's addresses and routes with the same
// parsers (addrsByLink, Routes).
type rtnl struct {
	path string
	sock *nlSocket
}

func (n *Netns) rtnl() *rtnl { return &rtnl{path: n.path, sock: n.dumper} }

// request sends one message and waits for the kernel's acknowledgement.
func (r *rtnl) request(typ, flags int, data ...nl.NetlinkRequestData) error {
	req := nl.NewNetlinkRequest(typ, flags|unix.NLM_F_ACK)
	for _, d := range data {
		req.AddData(d)
	}
	return r.sock.ack(req)
}

// Attributes x/sys/unix does not name.
const (
	ifaProto = 11 // IFA_PROTO: who made the address (kernel_ll, kernel_ra, …)
	rtaNHID  = 30 // RTA_NH_ID: a nexthop object
	// infinity is a lifetime that never ends (INFINITY_LIFE_TIME).
	infinity = 0xffffffff
	// userHZ is the unit of the kernel's clock_t values (USER_HZ).
	userHZ = 100
	// attrTypeMask drops NLA_F_NESTED and NLA_F_NET_BYTEORDER from an
	// attribute's type.
	attrTypeMask = 0x3fff
)

// Address flags. addrFlagsSet are the IFA_F_* that `ip address add`
// sets and the kernel keeps; the others are the kernel's own state,
// following from the lifetimes (permanent, deprecated), the order of the
// addresses (secondary) and duplicate address detection (tentative,
// optimistic, dadfailed).
const addrFlagsSet = unix.IFA_F_NODAD | unix.IFA_F_HOMEADDRESS | unix.IFA_F_MANAGETEMPADDR | unix.IFA_F_NOPREFIXROUTE | unix.IFA_F_MCAUTOJOIN

// routeFlagsSet are the route flags (rtm_flags, rtnh_flags) one sets; the
// others (dead, linkdown, offload, trap, …) are the kernel's state.
const routeFlagsSet = unix.RTNH_F_ONLINK | unix.RTNH_F_PERVASIVE

// addrRead is an address as dumped: what gives it back, and the state
// that does not.
type addrRead struct {
	MovedAddr
	ifindex int
	flags   uint32 // every IFA_F_* bit
}

// addrs dumps the addresses of link ifindex (0: every link), in the
// kernel's order. Lifetimes become instants from now on.
func (r *rtnl) addrs(ifindex int, now time.Duration) ([]addrRead, error) {
	// Equivalent to: ip -d address show dev LINK
	out, err := parsedDump(r.sock, unix.RTM_GETADDR, unix.RTM_NEWADDR, func(m []byte) (addrRead, bool, error) {
		a, err := parseAddr(m, now)
		return a, err == nil && a.Prefix.IsValid() && (ifindex == 0 || a.ifindex == ifindex), err
	}, nl.NewIfAddrmsg(unix.AF_UNSPEC))
	if err != nil {
		return nil, fmt.Errorf("list addresses in netns %s: %w", r.path, err)
	}
	return out, nil
}

func parseAddr(m []byte, now time.Duration) (addrRead, error) {
	if len(m) < unix.SizeofIfAddrmsg {
		return addrRead{}, fmt.Errorf("short address message (%d bytes)", len(m))
	}
	msg := nl.DeserializeIfAddrmsg(m)
	attrs, err := parseAttrs(m[unix.SizeofIfAddrmsg:])
	if err != nil {
		return addrRead{}, fmt.Errorf("address message: %w", err)
	}
	a := addrRead{ifindex: int(msg.Index), flags: uint32(msg.Flags)}
	a.Scope = msg.Scope
	var local, address netip.Addr
	valid, preferred := uint32(infinity), uint32(infinity)
	for _, at := range attrs {
		v := at.v
		switch at.typ {
		case unix.IFA_ADDRESS:
			address = addrOf(v)
		case unix.IFA_LOCAL:
			local = addrOf(v)
		case unix.IFA_BROADCAST:
			a.Broadcast = addrOf(v)
		case unix.IFA_LABEL:
			a.Label = cstring(v)
		case unix.IFA_FLAGS:
			if len(v) >= 4 {
				a.flags = binary.NativeEndian.Uint32(v)
			}
		case unix.IFA_CACHEINFO:
			if len(v) >= unix.SizeofIfaCacheinfo {
				ci := nl.DeserializeIfaCacheInfo(v)
				preferred, valid = ci.Prefered, ci.Valid
			}
		case unix.IFA_RT_PRIORITY:
			if len(v) >= 4 {
				a.Metric = binary.NativeEndian.Uint32(v)
			}
		case ifaProto:
			if len(v) >= 1 {
				a.Proto = v[0]
			}
		}
	}
	// IPv4 names the local address IFA_LOCAL and the peer IFA_ADDRESS;
	// IPv6 has IFA_LOCAL only when there is a peer.
	switch {
	case local.IsValid():
		a.Prefix = netip.PrefixFrom(local, int(msg.Prefixlen))
		if address.IsValid() && address != local {
			a.Peer = address
		}
	case address.IsValid():
		a.Prefix = netip.PrefixFrom(address, int(msg.Prefixlen))
	}
	a.Flags = a.flags & addrFlagsSet
	a.ValidUntil, a.PreferredUntil = until(valid, time.Second, now), until(preferred, time.Second, now)
	return a, nil
}

// until turns a remaining lifetime of left units into an instant (0:
// forever).
func until(left uint32, unit, now time.Duration) time.Duration {
	if left == infinity {
		return 0
	}
	return now + time.Duration(left)*unit
}

// addrMsg is the message that adds a (or, with delete, removes it) on
// link ifindex, its lifetimes counted from now.
func addrMsg(a MovedAddr, ifindex int, now time.Duration, del bool) []nl.NetlinkRequestData {
	family := unix.AF_INET
	if a.Prefix.Addr().Is6() {
		family = unix.AF_INET6
	}
	m := nl.NewIfAddrmsg(family)
	m.Index, m.Prefixlen, m.Scope = uint32(ifindex), uint8(a.Prefix.Bits()), a.Scope
	out := []nl.NetlinkRequestData{m, nl.NewRtAttr(unix.IFA_LOCAL, a.Prefix.Addr().AsSlice())}
	peer := a.Prefix.Addr()
	if a.Peer.IsValid() {
		peer = a.Peer
	}
	out = append(out, nl.NewRtAttr(unix.IFA_ADDRESS, peer.AsSlice()))
	if del {
		return out
	}
	m.Flags = uint8(a.Flags)
	out = append(out, nl.NewRtAttr(unix.IFA_FLAGS, nl.Uint32Attr(a.Flags)))
	if a.Broadcast.IsValid() {
		out = append(out, nl.NewRtAttr(unix.IFA_BROADCAST, a.Broadcast.AsSlice()))
	}
	if a.Label != "" {
		out = append(out, nl.NewRtAttr(unix.IFA_LABEL, nl.ZeroTerminated(a.Label)))
	}
	if a.Metric != 0 {
		out = append(out, nl.NewRtAttr(unix.IFA_RT_PRIORITY, nl.Uint32Attr(a.Metric)))
	}
	if a.Proto != 0 {
		out = append(out, nl.NewRtAttr(ifaProto, []byte{a.Proto}))
	}
	if a.ValidUntil != 0 || a.PreferredUntil != 0 {
		ci := nl.IfaCacheInfo{IfaCacheinfo: unix.IfaCacheinfo{Valid: left(a.ValidUntil, time.Second, now), Prefered: left(a.PreferredUntil, time.Second, now)}}
		out = append(out, nl.NewRtAttr(unix.IFA_CACHEINFO, ci.Serialize()))
	}
	return out
}

// left is what remains until instant u, in whole units (infinity for 0,
// forever; 0 once past).
func left(u, unit, now time.Duration) uint32 {
	if u == 0 {
		return infinity
	}
	if u <= now {
		return 0
	}
	return uint32(min((u-now)/unit, infinity-1))
}

// routes dumps every route of every table, both families, but the
// kernel's cache.
func (r *rtnl) routes(now time.Duration) ([]routeRead, error) {
	// Equivalent to: ip -d route show table all; ip -d -6 route show table all
	out, err := parsedDump(r.sock, unix.RTM_GETROUTE, unix.RTM_NEWROUTE, func(m []byte) (routeRead, bool, error) {
		rt, err := parseRoute(m, now)
		return rt, err == nil && !rt.cloned && (rt.Family == unix.AF_INET || rt.Family == unix.AF_INET6), err
	}, &nl.RtMsg{})
	if err != nil {
		return nil, fmt.Errorf("list routes in netns %s: %w", r.path, err)
	}
	return out, nil
}

// routeRead is a route as dumped.
type routeRead struct {
	MovedRoute
	cloned bool
	// unknown names the attributes that MovedRoute cannot carry
	// (encapsulations, nexthop objects, MPLS): such a route cannot be
	// given back as it was.
	unknown []string
}

// metricNames are the RTAX_* metrics by the names iproute2 gives them.
var metricNames = map[uint16]string{
	unix.RTAX_LOCK: "lock", unix.RTAX_MTU: "mtu", unix.RTAX_WINDOW: "window", unix.RTAX_RTT: "rtt",
	unix.RTAX_RTTVAR: "rttvar", unix.RTAX_SSTHRESH: "ssthresh", unix.RTAX_CWND: "cwnd", unix.RTAX_ADVMSS: "advmss",
	unix.RTAX_REORDERING: "reordering", unix.RTAX_HOPLIMIT: "hoplimit", unix.RTAX_INITCWND: "initcwnd",
	unix.RTAX_FEATURES: "features", unix.RTAX_RTO_MIN: "rto_min", unix.RTAX_INITRWND: "initrwnd",
	unix.RTAX_QUICKACK: "quickack", unix.RTAX_FASTOPEN_NO_COOKIE: "fastopen_no_cookie",
}

func metricName(t uint16) string {
	if s, ok := metricNames[t]; ok {
		return s
	}
	return "rtax" + strconv.Itoa(int(t))
}

func metricType(name string) (uint16, bool) {
	for t, s := range metricNames {
		if s == name {
			return t, true
		}
	}
	if n, err := strconv.ParseUint(strings.TrimPrefix(name, "rtax"), 10, 16); err == nil && strings.HasPrefix(name, "rtax") {
		return uint16(n), true
	}
	return 0, false
}

func parseRoute(m []byte, now time.Duration) (routeRead, error) {
	if len(m) < unix.SizeofRtMsg {
		return routeRead{}, fmt.Errorf("short route message (%d bytes)", len(m))
	}
	msg := nl.DeserializeRtMsg(m)
	attrs, err := parseAttrs(m[unix.SizeofRtMsg:])
	if err != nil {
		return routeRead{}, fmt.Errorf("route message: %w", err)
	}
	r := routeRead{cloned: msg.Flags&unix.RTM_F_CLONED != 0}
	r.Family, r.Table, r.Tos, r.Protocol, r.Scope, r.Type = msg.Family, uint32(msg.Table), msg.Tos, msg.Protocol, msg.Scope, msg.Type
	r.Flags = msg.Flags & routeFlagsSet
	var dst, from netip.Addr
	for _, at := range attrs {
		v := at.v
		switch t := at.typ; t {
		case unix.RTA_DST:
			dst = addrOf(v)
		case unix.RTA_SRC:
			from = addrOf(v)
		case unix.RTA_OIF:
			r.Dev = int(u32(v))
		case unix.RTA_GATEWAY:
			r.Gateway = addrOf(v)
		case unix.RTA_VIA:
			r.Gateway = viaOf(v)
		case unix.RTA_PRIORITY:
			r.Metric = u32(v)
		case unix.RTA_PREFSRC:
			r.PrefSrc = addrOf(v)
		case unix.RTA_FLOW:
			r.Realm = u32(v)
		case unix.RTA_TABLE:
			r.Table = u32(v)
		case unix.RTA_PREF:
			if len(v) >= 1 {
				r.Pref = v[0]
			}
		case unix.RTA_CACHEINFO:
			// Only an IPv6 route's expiry (rta_expires, clock_t) is a
			// property of the route; the rest is usage.
			if r.Family == unix.AF_INET6 && len(v) >= 12 {
				if e := int32(binary.NativeEndian.Uint32(v[8:12])); e > 0 {
					r.ExpiresAt = until(uint32(e), time.Second/userHZ, now)
				}
			}
		case unix.RTA_METRICS:
			ms, err := parseAttrs(v)
			if err != nil {
				return routeRead{}, fmt.Errorf("route metrics: %w", err)
			}
			for _, mt := range ms {
				mtype := mt.typ
				if mtype == unix.RTAX_CC_ALGO {
					r.CongCtl = cstring(mt.v)
					continue
				}
				if r.Metrics == nil {
					r.Metrics = map[string]uint32{}
				}
				r.Metrics[metricName(mtype)] = u32(mt.v)
			}
		case unix.RTA_MULTIPATH:
			hops, unknown, err := parseHops(v)
			if err != nil {
				return routeRead{}, err
			}
			r.Hops, r.unknown = hops, append(r.unknown, unknown...)
		case unix.RTA_PAD, unix.RTA_UID, unix.RTA_MFC_STATS:
		case unix.RTA_ENCAP, unix.RTA_ENCAP_TYPE:
			r.unknown = append(r.unknown, "encap")
		case rtaNHID:
			r.unknown = append(r.unknown, "nexthop object")
		case unix.RTA_NEWDST:
			r.unknown = append(r.unknown, "mpls")
		default:
			r.unknown = append(r.unknown, "attribute "+strconv.Itoa(int(t)))
		}
	}
	if dst.IsValid() {
		r.Dst = netip.PrefixFrom(dst, int(msg.Dst_len))
	} else {
		r.Dst = netip.PrefixFrom(zeroAddr(r.Family), 0)
	}
	if from.IsValid() {
		r.From = netip.PrefixFrom(from, int(msg.Src_len))
	}
	return r, nil
}

func parseHops(b []byte) ([]Hop, []string, error) {
	var hops []Hop
	var unknown []string
	for len(b) >= unix.SizeofRtNexthop {
		nh := nl.DeserializeRtNexthop(b)
		l := int(nh.RtNexthop.Len)
		if l < unix.SizeofRtNexthop || l > len(b) {
			return nil, nil, fmt.Errorf("route nexthop of %d bytes in %d", l, len(b))
		}
		h := Hop{Dev: int(nh.Ifindex), Weight: int(nh.Hops) + 1, Flags: nh.Flags & routeFlagsSet}
		attrs, err := parseAttrs(b[unix.SizeofRtNexthop:l])
		if err != nil {
			return nil, nil, fmt.Errorf("route nexthop: %w", err)
		}
		for _, at := range attrs {
			switch t := at.typ; t {
			case unix.RTA_GATEWAY:
				h.Gateway = addrOf(at.v)
			case unix.RTA_VIA:
				h.Gateway = viaOf(at.v)
			case unix.RTA_FLOW:
				h.Realm = u32(at.v)
			default:
				unknown = append(unknown, "nexthop attribute "+strconv.Itoa(int(t)))
			}
		}
		hops = append(hops, h)
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1) & ^(unix.RTA_ALIGNTO-1)):]
	}
	return hops, unknown, nil
}

// attr is one route netlink attribute.
type attr struct {
	typ uint16 // without NLA_F_NESTED and NLA_F_NET_BYTEORDER
	v   []byte
}

// parseAttrs splits b into attributes. Unlike the netlink library's
// parser it returns an error, not a panic, for a length that does not
// fit.
func parseAttrs(b []byte) ([]attr, error) {
	var out []attr
	err := walkAttrs(b, func(typ uint16, v []byte) error {
		out = append(out, attr{typ: typ, v: v})
		return nil
	})
	return out, err
}

// walkAttrs calls fn with each attribute in b, in order, its type without
// the NLA_F_* bits, until fn or the decoding fails.
func walkAttrs(b []byte, fn func(typ uint16, v []byte) error) error {
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b))
		if l < unix.SizeofRtAttr || l > len(b) {
			return fmt.Errorf("attribute of %d bytes in %d", l, len(b))
		}
		if err := fn(binary.NativeEndian.Uint16(b[2:])&attrTypeMask, b[unix.SizeofRtAttr:l]); err != nil {
			return err
		}
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1) & ^(unix.RTA_ALIGNTO-1)):]
	}
	return nil
}

func u32(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return binary.NativeEndian.Uint32(b)
}

// viaOf decodes struct rtvia: a gateway of the other family.
func viaOf(b []byte) netip.Addr {
	if len(b) < 2 {
		return netip.Addr{}
	}
	return addrOf(b[2:])
}

func zeroAddr(family uint8) netip.Addr {
	if family == unix.AF_INET6 {
		return netip.IPv6Unspecified()
	}
	return netip.IPv4Unspecified()
}

// gateway encodes a gateway of route family: RTA_GATEWAY, or RTA_VIA for
// one of the other family.
func gateway(family uint8, gw netip.Addr) *nl.RtAttr {
	if gw.Is6() == (family == unix.AF_INET6) {
		return nl.NewRtAttr(unix.RTA_GATEWAY, gw.AsSlice())
	}
	f := uint16(unix.AF_INET)
	if gw.Is6() {
		f = unix.AF_INET6
	}
	b := binary.NativeEndian.AppendUint16(nil, f)
	return nl.NewRtAttr(unix.RTA_VIA, append(b, gw.AsSlice()...))
}

// routeMsg is the message that adds r, its expiry counted from now.
func routeMsg(r MovedRoute, now time.Duration) []nl.NetlinkRequestData {
	m := &nl.RtMsg{RtMsg: unix.RtMsg{Family: r.Family, Dst_len: uint8(r.Dst.Bits()), Tos: r.Tos,
		Protocol: r.Protocol, Scope: r.Scope, Type: r.Type, Flags: r.Flags}}
	if r.Table < 256 {
		m.Table = uint8(r.Table)
	}
	out := []nl.NetlinkRequestData{m, nl.NewRtAttr(unix.RTA_TABLE, nl.Uint32Attr(r.Table))}
	if r.Dst.Bits() > 0 {
		out = append(out, nl.NewRtAttr(unix.RTA_DST, r.Dst.Addr().AsSlice()))
	}
	if r.From.IsValid() {
		m.Src_len = uint8(r.From.Bits())
		out = append(out, nl.NewRtAttr(unix.RTA_SRC, r.From.Addr().AsSlice()))
	}
	if r.Metric != 0 {
		out = append(out, nl.NewRtAttr(unix.RTA_PRIORITY, nl.Uint32Attr(r.Metric)))
	}
	if r.Dev != 0 {
		out = append(out, nl.NewRtAttr(unix.RTA_OIF, nl.Uint32Attr(uint32(r.Dev))))
	}
	if r.Gateway.IsValid() {
		out = append(out, gateway(r.Family, r.Gateway))
	}
	if r.PrefSrc.IsValid() {
		out = append(out, nl.NewRtAttr(unix.RTA_PREFSRC, r.PrefSrc.AsSlice()))
	}
	if r.Realm != 0 {
		out = append(out, nl.NewRtAttr(unix.RTA_FLOW, nl.Uint32Attr(r.Realm)))
	}
	if len(r.Metrics) > 0 || r.CongCtl != "" {
		ms := nl.NewRtAttr(unix.RTA_METRICS, nil)
		for name, v := range r.Metrics {
			if t, ok := metricType(name); ok {
				ms.AddRtAttr(int(t), nl.Uint32Attr(v))
			}
		}
		if r.CongCtl != "" {
			ms.AddRtAttr(unix.RTAX_CC_ALGO, nl.ZeroTerminated(r.CongCtl))
		}
		out = append(out, ms)
	}
	if len(r.Hops) > 0 {
		var b []byte
		for _, h := range r.Hops {
			nh := &nl.RtNexthop{RtNexthop: unix.RtNexthop{Flags: h.Flags, Hops: uint8(max(h.Weight, 1) - 1), Ifindex: int32(h.Dev)}}
			if h.Gateway.IsValid() {
				nh.Children = append(nh.Children, gateway(r.Family, h.Gateway))
			}
			if h.Realm != 0 {
				nh.Children = append(nh.Children, nl.NewRtAttr(unix.RTA_FLOW, nl.Uint32Attr(h.Realm)))
			}
			b = append(b, nh.Serialize()...)
		}
		out = append(out, nl.NewRtAttr(unix.RTA_MULTIPATH, b))
	}
	if r.Family == unix.AF_INET6 {
		out = append(out, nl.NewRtAttr(unix.RTA_PREF, []byte{r.Pref}))
		if r.ExpiresAt != 0 {
			out = append(out, nl.NewRtAttr(unix.RTA_EXPIRES, nl.Uint32Attr(max(left(r.ExpiresAt, time.Second, now), 1))))
		}
	}
	return out
}
