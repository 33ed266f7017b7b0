package testagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tapsync/tapsync/agent/agentpb"
	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// linkWait is how long UpdateInterface waits for the link when the request
// names a devicePath: the NIC was just hot-plugged and the guest kernel
// may not have made the link yet. Kata's agent waits similarly, on
// events (uevents for the PCI path); this one on link events (waitLink).
const linkWait = 5 * time.Second

// iffNoARP is IFF_NOARP from <linux/if.h>.
const iffNoARP = 0x80

// dumpRetries bounds retries of a netlink dump the kernel interrupted
// (it changed while being dumped).
const dumpRetries = 5

func retryDump[T any](f func() ([]T, error)) ([]T, error) {
	var err error
	for range dumpRetries {
		var v []T
		if v, err = f(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return nil, err
}

func (s *Server) linkByMAC(mac net.HardwareAddr) (netlink.Link, error) {
	links, err := retryDump(s.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if bytes.Equal(l.Attrs().HardwareAddr, mac) {
			return l, nil
		}
	}
	return nil, nil
}

// updateInterface configures the link with the request's MAC.
//
// Equivalent to: ip link set DEV down (if up); ip link set DEV name NAME;
// ip link set NAME mtu MTU arp on|off; ip addr replace A dev NAME (and
// ip addr del for others); ip link set NAME up.
func (s *Server) updateInterface(ctx context.Context, req *agentpb.UpdateInterfaceRequest) (_ *agentpb.Interface, err error) {
	want := req.GetInterface()
	if want == nil {
		return nil, fmt.Errorf("%w: no interface", errInvalid)
	}
	tl := s.timeline.Load()
	tl.Record(control.EventUpdateInterface, want.GetHwAddr(), fmt.Sprintf("name %s addresses %s devicePath %q",
		want.GetName(), addrsText(want.GetIPAddresses()), want.GetDevicePath()))
	defer func() {
		done := "addresses " + addrsText(want.GetIPAddresses())
		if err != nil {
			done = "error: " + err.Error()
		}
		tl.Record(control.EventUpdateInterfaceDone, want.GetHwAddr(), done)
	}()
	mac, err := net.ParseMAC(want.GetHwAddr())
	if err != nil {
		return nil, fmt.Errorf("%w: hwAddr %q: %v", errInvalid, want.GetHwAddr(), err)
	}
	addrs, err := addrsFromPB(want.GetIPAddresses())
	if err != nil {
		return nil, err
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	var link netlink.Link
	if want.GetDevicePath() != "" {
		link, err = s.waitLink(ctx, mac)
	} else {
		link, err = s.linkByMAC(mac)
	}
	if err != nil {
		return nil, err
	}
	if link == nil {
		// Kata's wording: callers recognise it and retry.
		return nil, fmt.Errorf("Link not found (hwAddr %s)", mac)
	}
	name := link.Attrs().Name
	tl.Record(control.EventInterfaceLinkFound, want.GetHwAddr(), "name "+name)

	// Kata's agent takes an up link down before it configures it (and a
	// rename needs it down): the kernel drops the routes and neighbours
	// through it, and its IPv6 addresses. Do it first.
	if link.Attrs().Flags&net.FlagUp != 0 {
		if err := s.nl.LinkSetDown(link); err != nil {
			return nil, fmt.Errorf("set %s down: %w", name, err)
		}
	}
	if n := want.GetName(); n != "" && n != name {
		if err := s.nl.LinkSetName(link, n); err != nil {
			return nil, fmt.Errorf("rename %s to %s: %w", name, n, err)
		}
		name = n
	}
	if mtu := int(want.GetMtu()); mtu > 0 && mtu != link.Attrs().MTU {
		if err := s.nl.LinkSetMTU(link, mtu); err != nil {
			return nil, fmt.Errorf("set %s mtu %d: %w", name, mtu, err)
		}
	}
	if want.GetRawFlags()&iffNoARP != 0 {
		err = s.nl.LinkSetARPOff(link)
	} else {
		err = s.nl.LinkSetARPOn(link)
	}
	if err != nil {
		return nil, fmt.Errorf("set %s arp: %w", name, err)
	}
	if err := s.nl.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	if err := s.replaceAddrs(link, name, addrs); err != nil {
		return nil, err
	}

	link, err = s.nl.LinkByIndex(link.Attrs().Index)
	if err != nil {
		return nil, fmt.Errorf("read back %s: %w", name, err)
	}
	return s.interfaceToPB(link)
}

// waitLink finds the link with mac, waiting up to linkWait (or until ctx
// ends) for it to appear: it looks again after every link event. It
// answers nil, nil when the link did not come.
func (s *Server) waitLink(ctx context.Context, mac net.HardwareAddr) (netlink.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, linkWait)
	defer cancel()
	for {
		changed := s.links.changed() // before looking: an event after the look wakes us
		if l, err := s.linkByMAC(mac); err != nil || l != nil {
			return l, err
		}
		select {
		case <-ctx.Done():
			return nil, nil
		case <-changed:
		}
	}
}

// addrsText spells a request's addresses for the timeline: "[a/n b/m]".
func addrsText(pbs []*agentpb.IPAddress) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, a := range pbs {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(a.GetAddress() + "/" + a.GetMask())
	}
	b.WriteByte(']')
	return b.String()
}

// routesText spells a request's routes for the timeline.
func routesText(pbs []*agentpb.Route) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, r := range pbs {
		if i > 0 {
			b.WriteString("; ")
		}
		dst := r.GetDest()
		if dst == "" {
			dst = "default"
		}
		b.WriteString(dst)
		if gw := r.GetGateway(); gw != "" {
			b.WriteString(" via " + gw)
		}
		b.WriteString(" dev " + r.GetDevice())
	}
	b.WriteByte(']')
	return b.String()
}

// replaceAddrs makes the link's addresses exactly addrs, except for
// link-local ones, which the kernel manages.
func (s *Server) replaceAddrs(link netlink.Link, name string, addrs []*net.IPNet) error {
	have, err := retryDump(func() ([]netlink.Addr, error) { return s.nl.AddrList(link, netlink.FAMILY_ALL) })
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", name, err)
	}
	for _, a := range have {
		if a.IP.IsLinkLocalUnicast() || containsAddr(addrs, a.IPNet) {
			continue
		}
		if err := s.nl.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("delete %s from %s: %w", a.IPNet, name, err)
		}
	}
	for _, n := range addrs {
		a := &netlink.Addr{IPNet: n}
		if n.IP.To4() == nil {
			// No duplicate address detection: the address is usable at
			// once, as the container's was.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := s.nl.AddrReplace(link, a); err != nil {
			return fmt.Errorf("replace %s on %s: %w", n, name, err)
		}
	}
	return nil
}

func containsAddr(list []*net.IPNet, n *net.IPNet) bool {
	for _, m := range list {
		if m.IP.Equal(n.IP) && bytes.Equal(m.Mask, n.Mask) {
			return true
		}
	}
	return false
}

func addrsFromPB(pbs []*agentpb.IPAddress) ([]*net.IPNet, error) {
	var out []*net.IPNet
	for _, a := range pbs {
		ip := net.ParseIP(a.GetAddress())
		if ip == nil {
			return nil, fmt.Errorf("%w: address %q", errInvalid, a.GetAddress())
		}
		bits := 128
		if ip4 := ip.To4(); ip4 != nil && a.GetFamily() == agentpb.IPFamily_v4 {
			ip, bits = ip4, 32
		}
		ones, err := strconv.Atoi(a.GetMask())
		if err != nil || ones < 0 || ones > bits {
			return nil, fmt.Errorf("%w: address %s: mask %q", errInvalid, a.GetAddress(), a.GetMask())
		}
		out = append(out, &net.IPNet{IP: ip, Mask: net.CIDRMask(ones, bits)})
	}
	return out, nil
}

func (s *Server) interfaceToPB(link netlink.Link) (*agentpb.Interface, error) {
	la := link.Attrs()
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return s.nl.AddrList(link, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", la.Name, err)
	}
	pb := &agentpb.Interface{
		Device:   la.Name,
		Name:     la.Name,
		Mtu:      uint64(la.MTU),
		HwAddr:   la.HardwareAddr.String(),
		Type:     link.Type(),
		RawFlags: la.RawFlags,
	}
	for _, a := range addrs {
		ones, _ := a.Mask.Size()
		pb.IPAddresses = append(pb.IPAddresses, &agentpb.IPAddress{
			Family:  familyOf(a.IP),
			Address: a.IP.String(),
			Mask:    strconv.Itoa(ones),
		})
	}
	return pb, nil
}

func familyOf(ip net.IP) agentpb.IPFamily {
	if ip.To4() != nil {
		return agentpb.IPFamily_v4
	}
	return agentpb.IPFamily_v6
}

// listInterfaces answers every link but loopback, with all its addresses
// (link-local ones included, as Kata's agent does).
func (s *Server) listInterfaces() (*agentpb.Interfaces, error) {
	links, err := retryDump(s.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := &agentpb.Interfaces{}
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		pb, err := s.interfaceToPB(l)
		if err != nil {
			return nil, err
		}
		out.Interfaces = append(out.Interfaces, pb)
	}
	return out, nil
}

// listRoutes answers the unicast routes of the main table, IPv4 and IPv6,
// on every link but loopback: those added through UpdateRoutes and those
// the kernel made for addresses (proto kernel, IPv6 fe80::/64 included).
func (s *Server) listRoutes() (*agentpb.Routes, error) {
	links, err := retryDump(s.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback == 0 {
			names[l.Attrs().Index] = l.Attrs().Name
		}
	}
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return s.nl.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := &agentpb.Routes{}
	for _, r := range routes {
		dev, ok := names[r.LinkIndex]
		if !ok || r.Type != unix.RTN_UNICAST {
			continue
		}
		pb := &agentpb.Route{
			Device: dev,
			Scope:  uint32(r.Scope),
			Family: agentpb.IPFamily_v4,
			Flags:  uint32(r.Flags),
			Mtu:    uint32(r.MTU),
		}
		if r.Family == unix.AF_INET6 {
			pb.Family = agentpb.IPFamily_v6
		}
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones > 0 {
				pb.Dest = r.Dst.String()
			}
		}
		if r.Gw != nil {
			pb.Gateway = r.Gw.String()
		}
		if r.Src != nil {
			pb.Source = r.Src.String()
		}
		out.Routes = append(out.Routes, pb)
	}
	return out, nil
}

// updateRoutes adds or replaces each route, as newer Kata agents do (older
// ones first deleted every route not made by the kernel), and answers the
// routes now in the main table.
//
// Equivalent to: ip route replace DEST via GW dev DEV src SRC scope S mtu M
func (s *Server) updateRoutes(_ context.Context, req *agentpb.UpdateRoutesRequest) (_ *agentpb.Routes, err error) {
	tl := s.timeline.Load()
	asked := routesText(req.GetRoutes().GetRoutes())
	tl.Record(control.EventUpdateRoutes, "", asked)
	defer func() {
		if err != nil {
			asked = "error: " + err.Error()
		}
		tl.Record(control.EventUpdateRoutesDone, "", asked)
	}()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, pb := range req.GetRoutes().GetRoutes() {
		r, err := s.routeFromPB(pb)
		if err != nil {
			return nil, err
		}
		if err := s.nl.RouteReplace(r); err != nil {
			return nil, fmt.Errorf("replace route %q via %q dev %q: %w", pb.GetDest(), pb.GetGateway(), pb.GetDevice(), err)
		}
	}
	return s.listRoutes()
}

func (s *Server) routeFromPB(pb *agentpb.Route) (*netlink.Route, error) {
	r := &netlink.Route{
		Scope:  netlink.Scope(pb.GetScope()),
		MTU:    int(pb.GetMtu()),
		Family: unix.AF_INET,
		Table:  unix.RT_TABLE_MAIN,
	}
	bits := 32
	if pb.GetFamily() == agentpb.IPFamily_v6 {
		r.Family, bits = unix.AF_INET6, 128
	}
	if d := pb.GetDest(); d != "" && d != "default" {
		_, n, err := net.ParseCIDR(d)
		if err != nil {
			return nil, fmt.Errorf("%w: route dest %q: %v", errInvalid, d, err)
		}
		r.Dst = n
	} else {
		// The kernel wants a zero-length destination of the route's family.
		r.Dst = &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)}
	}
	if g := pb.GetGateway(); g != "" {
		if r.Gw = net.ParseIP(g); r.Gw == nil {
			return nil, fmt.Errorf("%w: route gateway %q", errInvalid, g)
		}
	}
	if src := pb.GetSource(); src != "" {
		if r.Src = net.ParseIP(src); r.Src == nil {
			return nil, fmt.Errorf("%w: route source %q", errInvalid, src)
		}
	}
	if dev := pb.GetDevice(); dev != "" {
		l, err := s.nl.LinkByName(dev)
		if err != nil {
			return nil, fmt.Errorf("route device %q: %w", dev, err)
		}
		r.LinkIndex = l.Attrs().Index
	}
	return r, nil
}

// addNeighbors adds or replaces each neighbour entry.
//
// Equivalent to: ip neigh replace IP lladdr MAC dev DEV nud STATE
func (s *Server) addNeighbors(req *agentpb.AddARPNeighborsRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, pb := range req.GetNeighbors().GetARPNeighbors() {
		ip := net.ParseIP(pb.GetToIPAddress().GetAddress())
		if ip == nil {
			return fmt.Errorf("%w: neighbour address %q", errInvalid, pb.GetToIPAddress().GetAddress())
		}
		l, err := s.nl.LinkByName(pb.GetDevice())
		if err != nil {
			return fmt.Errorf("neighbour %s device %q: %w", ip, pb.GetDevice(), err)
		}
		n := &netlink.Neigh{
			LinkIndex: l.Attrs().Index,
			Family:    unix.AF_INET,
			State:     int(pb.GetState()),
			Flags:     int(pb.GetFlags()),
			IP:        ip,
		}
		if ip.To4() == nil {
			n.Family = unix.AF_INET6
		}
		if n.State == 0 {
			n.State = netlink.NUD_PERMANENT
		}
		if ll := pb.GetLladdr(); ll != "" {
			if n.HardwareAddr, err = net.ParseMAC(ll); err != nil {
				return fmt.Errorf("%w: neighbour %s lladdr %q: %v", errInvalid, ip, ll, err)
			}
		}
		if err := s.nl.NeighSet(n); err != nil {
			return fmt.Errorf("replace neighbour %s on %s: %w", ip, pb.GetDevice(), err)
		}
	}
	return nil
}
