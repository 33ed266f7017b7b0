package agent

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/tapsync/tapsync/agent/agentpb"
	"github.com/tapsync/tapsync/agent/guestnet"
)

// The values the agent configures are guestnet's, so that a package that
// only decides them need not import ttrpc. These names keep them where
// callers have always found them.
type (
	Interface = guestnet.Interface
	Route     = guestnet.Route
	Neighbor  = guestnet.Neighbor
)

// iffNoARP is IFF_NOARP from <linux/if.h>: the only bit of raw_flags the
// agent acts upon.
const iffNoARP = 0x80

func family(v6 bool) agentpb.IPFamily {
	if v6 {
		return agentpb.IPFamily_v6
	}
	return agentpb.IPFamily_v4
}

// is6 reports whether a is an IPv6 address for the agent. An IPv4-mapped
// address is sent as IPv6: the kernel would treat it so too.
func is6(a netip.Addr) bool { return !a.Is4() }

func addrToPB(p netip.Prefix) (*agentpb.IPAddress, error) {
	if !p.IsValid() {
		return nil, fmt.Errorf("invalid address prefix %v", p)
	}
	return &agentpb.IPAddress{
		Family:  family(is6(p.Addr())),
		Address: p.Addr().String(),
		Mask:    strconv.Itoa(p.Bits()),
	}, nil
}

func addrFromPB(a *agentpb.IPAddress) (netip.Prefix, error) {
	ip, err := netip.ParseAddr(a.GetAddress())
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("address %q: %w", a.GetAddress(), err)
	}
	bits, err := strconv.Atoi(a.GetMask())
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("address %s: mask %q is not a prefix length", ip, a.GetMask())
	}
	p := netip.PrefixFrom(ip, bits)
	if !p.IsValid() {
		return netip.Prefix{}, fmt.Errorf("address %s: prefix length %d out of range", ip, bits)
	}
	return p, nil
}

func interfaceToPB(i Interface) (*agentpb.Interface, error) {
	if len(i.MAC) == 0 {
		// The agent finds the guest link by MAC only.
		return nil, fmt.Errorf("interface %q: no MAC", i.Name)
	}
	if i.MTU < 0 {
		return nil, fmt.Errorf("interface %q: negative MTU %d", i.Name, i.MTU)
	}
	pb := &agentpb.Interface{
		// Kata's runtime sends the name in both fields; agents differ in
		// which one they read.
		Device:     i.Name,
		Name:       i.Name,
		Mtu:        uint64(i.MTU),
		HwAddr:     i.MAC.String(),
		DevicePath: i.DevicePath,
	}
	if i.NoARP {
		pb.RawFlags = iffNoARP
	}
	for _, p := range i.Addrs {
		a, err := addrToPB(p)
		if err != nil {
			return nil, fmt.Errorf("interface %q: %w", i.Name, err)
		}
		pb.IPAddresses = append(pb.IPAddresses, a)
	}
	return pb, nil
}

func interfaceFromPB(pb *agentpb.Interface) (Interface, error) {
	i := Interface{
		Name:       pb.GetName(),
		MTU:        int(pb.GetMtu()),
		NoARP:      pb.GetRawFlags()&iffNoARP != 0,
		DevicePath: pb.GetDevicePath(),
	}
	if i.Name == "" {
		i.Name = pb.GetDevice()
	}
	if pb.GetHwAddr() != "" {
		mac, err := net.ParseMAC(pb.GetHwAddr())
		if err != nil {
			return Interface{}, fmt.Errorf("interface %q: %w", i.Name, err)
		}
		i.MAC = mac
	}
	for _, a := range pb.GetIPAddresses() {
		p, err := addrFromPB(a)
		if err != nil {
			return Interface{}, fmt.Errorf("interface %q: %w", i.Name, err)
		}
		i.Addrs = append(i.Addrs, p)
	}
	return i, nil
}

// routeFamily is the family the route's addresses say, or r.IPv6 when it
// has none (a default route through a device). Mixed families are refused:
// the kernel would refuse them too, with a less helpful message.
func routeFamily(r Route) (v6 bool, err error) {
	var addrs []netip.Addr
	if r.Dest.IsValid() {
		addrs = append(addrs, r.Dest.Addr())
	}
	if r.Gateway.IsValid() {
		addrs = append(addrs, r.Gateway)
	}
	if r.Source.IsValid() {
		addrs = append(addrs, r.Source)
	}
	if len(addrs) == 0 {
		return r.IPv6, nil
	}
	v6 = is6(addrs[0])
	for _, a := range addrs[1:] {
		if is6(a) != v6 {
			return false, fmt.Errorf("route %s: mixed address families", r)
		}
	}
	return v6, nil
}

func routeToPB(r Route) (*agentpb.Route, error) {
	v6, err := routeFamily(r)
	if err != nil {
		return nil, err
	}
	if r.MTU < 0 {
		return nil, fmt.Errorf("route %s: negative MTU %d", r, r.MTU)
	}
	pb := &agentpb.Route{
		Device: r.Device,
		Scope:  uint32(r.Scope),
		Family: family(v6),
		Mtu:    uint32(r.MTU),
	}
	if r.Dest.IsValid() {
		pb.Dest = r.Dest.String()
	}
	if r.Gateway.IsValid() {
		pb.Gateway = r.Gateway.String()
	}
	if r.Source.IsValid() {
		pb.Source = r.Source.String()
	}
	return pb, nil
}

func routeFromPB(pb *agentpb.Route) (Route, error) {
	r := Route{
		Device: pb.GetDevice(),
		Scope:  uint8(pb.GetScope()),
		MTU:    int(pb.GetMtu()),
		IPv6:   pb.GetFamily() == agentpb.IPFamily_v6,
	}
	var err error
	switch d := pb.GetDest(); {
	case d == "" || d == "default":
	case strings.Contains(d, "/"):
		if r.Dest, err = netip.ParsePrefix(d); err != nil {
			return Route{}, fmt.Errorf("route to %q: %w", d, err)
		}
	default:
		// A bare address is a host route.
		a, err := netip.ParseAddr(d)
		if err != nil {
			return Route{}, fmt.Errorf("route to %q: %w", d, err)
		}
		r.Dest = netip.PrefixFrom(a, a.BitLen())
	}
	if g := pb.GetGateway(); g != "" {
		if r.Gateway, err = netip.ParseAddr(g); err != nil {
			return Route{}, fmt.Errorf("route to %q: gateway: %w", pb.GetDest(), err)
		}
	}
	if s := pb.GetSource(); s != "" {
		if r.Source, err = netip.ParseAddr(s); err != nil {
			return Route{}, fmt.Errorf("route to %q: source: %w", pb.GetDest(), err)
		}
	}
	if r.IPv6, err = routeFamily(r); err != nil {
		return Route{}, err
	}
	return r, nil
}

func neighborToPB(n Neighbor) (*agentpb.ARPNeighbor, error) {
	if !n.IP.IsValid() {
		return nil, fmt.Errorf("neighbour on %q: no IP", n.Device)
	}
	pb := &agentpb.ARPNeighbor{
		ToIPAddress: &agentpb.IPAddress{Family: family(is6(n.IP)), Address: n.IP.String()},
		Device:      n.Device,
		State:       int32(n.State),
		Flags:       int32(n.Flags),
	}
	if len(n.MAC) > 0 {
		pb.Lladdr = n.MAC.String()
	}
	return pb, nil
}
