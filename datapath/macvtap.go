package datapath

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrMacvtapMismatch reports an existing tsm<N> whose fixed properties
// (kind, lower device, mode, MAC) differ from what was asked. It is not
// changed in place: the caller decides whether to replace it.
var ErrMacvtapMismatch = errors.New("macvtap properties differ")

// MacvtapSpec is the macvtap wanted for endpoint Index in the macvtap
// model: a bridge-mode macvtap on the container link Container that
// carries MAC, the MAC the guest NIC gets. MAC is the container link's
// own MAC as recorded before the first EnsureMacvtap; it must come from
// the caller's record, because afterwards the container link carries
// HostMAC(MAC, Index) instead.
type MacvtapSpec struct {
	Index     int
	Container int // ifindex of the container link (the macvtap's lower device)
	MAC       net.HardwareAddr
	Queues    int // queues that OpenMacvtapQueues opens; 1..MaxQueues
	MTU       int // 0 = the container link's MTU
	// Keep, if set, is given the addresses EnsureMacvtap is about to take
	// from the container link, and the routes that go with them, before
	// any is deleted, so that the caller records them first: once taken,
	// they exist nowhere else. An error from Keep stops EnsureMacvtap
	// before it deletes anything.
	Keep func(Moved) error
}

func (s MacvtapSpec) validate() error {
	name := MacvtapName(s.Index)
	switch {
	case s.Index < 0:
		return fmt.Errorf("endpoint index %d is negative", s.Index)
	case len(name) >= unix.IFNAMSIZ:
		return fmt.Errorf("macvtap name %q for endpoint %d is longer than %d bytes", name, s.Index, unix.IFNAMSIZ-1)
	case s.Container <= 0:
		return fmt.Errorf("macvtap %s: no container link", name)
	case len(s.MAC) != 6 || s.MAC[0]&1 != 0:
		return fmt.Errorf("macvtap %s: %q is not a unicast Ethernet MAC", name, s.MAC)
	case s.Queues < 1 || s.Queues > MaxQueues:
		return fmt.Errorf("macvtap %s: %d queues is outside 1..%d", name, s.Queues, MaxQueues)
	case s.MTU < 0:
		return fmt.Errorf("macvtap %s: negative MTU %d", name, s.MTU)
	}
	return nil
}

var macvlanModes = map[netlink.MacvlanMode]string{
	netlink.MACVLAN_MODE_PRIVATE:  "private",
	netlink.MACVLAN_MODE_VEPA:     "vepa",
	netlink.MACVLAN_MODE_BRIDGE:   "bridge",
	netlink.MACVLAN_MODE_PASSTHRU: "passthru",
	netlink.MACVLAN_MODE_SOURCE:   "source",
}

func toMacvtap(l *netlink.Macvtap) Macvtap {
	idx, ok := ParseMacvtapName(l.Attrs().Name)
	if !ok {
		idx = -1
	}
	return Macvtap{Link: toLink(l), Index: idx, Mode: macvlanModes[l.Mode]}
}

// Macvtaps lists our endpoint macvtaps (tsm<N>) in the netns.
func (n *Netns) Macvtaps() ([]Macvtap, error) {
	links, err := n.linkList()
	if err != nil {
		return nil, err
	}
	var out []Macvtap
	for _, l := range links {
		if m, ok := l.(*netlink.Macvtap); ok && isMacvtapEndpoint(l) {
			out = append(out, toMacvtap(m))
		}
	}
	return out, nil
}

// isMacvtapEndpoint says whether l is one of our endpoint macvtaps.
func isMacvtapEndpoint(l netlink.Link) bool {
	_, ok := ParseMacvtapName(l.Attrs().Name)
	return ok && l.Type() == "macvtap"
}

func (n *Netns) macvtap(name string) (*netlink.Macvtap, error) {
	l, err := n.linkByName(name)
	if err != nil {
		return nil, err
	}
	m, ok := l.(*netlink.Macvtap)
	if !ok {
		return nil, fmt.Errorf("%w: %s is a %s, not a macvtap", ErrMacvtapMismatch, name, l.Type())
	}
	return m, nil
}

// EnsureMacvtap wires endpoint spec.Index in the macvtap model, in this
// order, each step idempotent:
//
//  1. the container link carries HostMAC(spec.MAC, N) (a link with any
//     other MAC than these two is refused with ErrMacvtapMismatch);
//  2. tsm<N> exists: a bridge-mode macvtap on the container link, with
//     spec.MAC, the container link's MTU (or spec.MTU), up;
//  3. the container link has no addresses left: they are read with the
//     routes that go with them, handed to spec.Keep, then deleted.
//
// It returns what steps 1 and 3 took away in this call; a repeated call
// returns spec.MAC and no addresses. A link with a route that could not
// be given back as it was (ErrCannotGiveBack) keeps its addresses.
func (n *Netns) EnsureMacvtap(ctx context.Context, spec MacvtapSpec) (Macvtap, Moved, error) {
	h, err := n.lib()
	if err != nil {
		return Macvtap{}, Moved{}, err
	}
	if err := spec.validate(); err != nil {
		return Macvtap{}, Moved{}, fmt.Errorf("netns %s: %w", n.path, err)
	}
	name := MacvtapName(spec.Index)
	c, err := n.linkByIndexLive(spec.Container)
	if err != nil {
		return Macvtap{}, Moved{}, fmt.Errorf("netns %s: container link %d of macvtap %s: %w", n.path, spec.Container, name, err)
	}
	cname := c.Attrs().Name
	wrap := func(what string, err error) error {
		return fmt.Errorf("netns %s: macvtap %s on %s: %s: %w", n.path, name, cname, what, err)
	}
	mtu := spec.MTU
	if mtu == 0 {
		mtu = c.Attrs().MTU
	}

	// Equivalent to: ip link set dev CONTAINER address HOSTMAC
	// First: a macvtap cannot come up while its lower device has its MAC
	// (EADDRINUSE), and two devices with one MAC on one lower device would
	// both claim the guest's frames.
	host := HostMAC(spec.MAC, spec.Index)
	switch cur := c.Attrs().HardwareAddr; {
	case slices.Equal(cur, host):
	case slices.Equal(cur, spec.MAC):
		if err := h.LinkSetHardwareAddr(c, host); err != nil {
			return Macvtap{}, Moved{}, wrap("set container link mac "+host.String(), err)
		}
	default:
		// The link changed its MAC under us (or the record is wrong):
		// its guest needs a new NIC, which is the caller's decision.
		return Macvtap{}, Moved{}, wrap("check container link", fmt.Errorf("%w: container link mac %s is neither the guest's %s nor %s",
			ErrMacvtapMismatch, cur, spec.MAC, host))
	}

	m, err := n.macvtap(name)
	switch {
	case isLinkNotFound(err):
		// Equivalent to: ip link add link CONTAINER name tsmN address MAC mtu M type macvtap mode bridge
		// The MAC is given at creation, so the macvtap never exists with
		// a random one that a guest could see. TxQLen -1 keeps the
		// kernel's default: the zero value would ask for 0, and a
		// macvtap queue's ring is txqueuelen long, so every frame to the
		// guest would be dropped.
		nm := &netlink.Macvtap{Macvlan: netlink.Macvlan{
			LinkAttrs: netlink.LinkAttrs{Name: name, ParentIndex: spec.Container, HardwareAddr: spec.MAC, MTU: mtu, TxQLen: -1},
			Mode:      netlink.MACVLAN_MODE_BRIDGE,
		}}
		if err := h.LinkAdd(nm); err != nil {
			return Macvtap{}, Moved{}, wrap("create", err)
		}
		zerolog.Ctx(ctx).Debug().Str("netns", n.path).Str("macvtap", name).Str("container", cname).Msg("created macvtap")
		if m, err = n.macvtap(name); err != nil {
			return Macvtap{}, Moved{}, wrap("read back", err)
		}
	case err != nil:
		return Macvtap{}, Moved{}, wrap("look up", err)
	}
	if why := macvtapMismatch(m, spec); why != "" {
		return Macvtap{}, Moved{}, wrap("check", fmt.Errorf("%w: %s", ErrMacvtapMismatch, why))
	}
	// Equivalent to: ip link set dev tsmN mtu M up
	if m.Attrs().MTU != mtu {
		if err := h.LinkSetMTU(m, mtu); err != nil {
			return Macvtap{}, Moved{}, wrap(fmt.Sprintf("set mtu %d", mtu), err)
		}
	}
	if m.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(m); err != nil {
			return Macvtap{}, Moved{}, wrap("set up", err)
		}
	}

	moved := Moved{MAC: slices.Clone(spec.MAC)}
	moved.Addrs, moved.Routes, err = n.takeAddrs(c, spec)
	if err != nil {
		return Macvtap{}, moved, wrap("take addresses", err)
	}
	if m, err = n.macvtap(name); err != nil {
		return Macvtap{}, moved, wrap("read back", err)
	}
	return toMacvtap(m), moved, nil
}

func macvtapMismatch(m *netlink.Macvtap, spec MacvtapSpec) string {
	switch {
	case m.Attrs().ParentIndex != spec.Container || m.Attrs().NetNsID >= 0:
		return fmt.Sprintf("lower device %d, want %d", m.Attrs().ParentIndex, spec.Container)
	case m.Mode != netlink.MACVLAN_MODE_BRIDGE:
		return "mode " + macvlanModes[m.Mode] + ", want bridge"
	case !slices.Equal(m.Attrs().HardwareAddr, spec.MAC):
		return fmt.Sprintf("mac %s, want %s", m.Attrs().HardwareAddr, spec.MAC)
	}
	return ""
}

// takeAddrs deletes every address of link after handing them, and the
// routes that go with them, to spec.Keep; it returns what it took.
func (n *Netns) takeAddrs(link netlink.Link, spec MacvtapSpec) ([]MovedAddr, []MovedRoute, error) {
	r := n.rtnl()
	now := monotonic()
	addrs, routes, err := r.lent(link.Attrs().Index, link.Attrs().Name, now)
	if err != nil || len(addrs) == 0 {
		return nil, nil, err
	}
	if spec.Keep != nil {
		if err := spec.Keep(Moved{MAC: slices.Clone(spec.MAC), Addrs: addrs, Routes: routes}); err != nil {
			return nil, nil, fmt.Errorf("record before taking: %w", err)
		}
	}
	if err := r.take(link.Attrs().Index, addrs, now); err != nil {
		return nil, nil, err
	}
	return addrs, routes, nil
}

// RestoreContainerLink gives a container link back what EnsureMacvtap
// took: its MAC, then its addresses, then the routes that went with them
// (routes need their gateway reachable through an address), each as it
// was; then it reads them back and returns an error naming what differs.
// What is there already as it was is left alone. An IPv6 link-local
// address that the kernel derived from the borrowed host MAC (after a
// link flap) is removed, so the link ends with exactly what it had. An
// address whose lifetime ran out meanwhile stays away, and comes back
// with what is left of it otherwise.
func (n *Netns) RestoreContainerLink(ifindex int, m Moved) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	link, err := n.linkByIndexLive(ifindex)
	if err != nil {
		return fmt.Errorf("netns %s: restore container link %d: %w", n.path, ifindex, err)
	}
	name := link.Attrs().Name
	wrap := func(err error) error { return fmt.Errorf("netns %s: restore container link %s: %w", n.path, name, err) }
	if len(m.MAC) != 6 {
		return wrap(fmt.Errorf("%q is not an Ethernet MAC", m.MAC))
	}
	cur := link.Attrs().HardwareAddr
	if !slices.Equal(cur, m.MAC) {
		// Equivalent to: ip link set dev CONTAINER address MAC
		if err := h.LinkSetHardwareAddr(link, m.MAC); err != nil {
			return wrap(fmt.Errorf("set mac %s: %w", m.MAC, err))
		}
		if ll, ok := eui64LinkLocal(cur); ok && !slices.ContainsFunc(m.Addrs, func(a MovedAddr) bool { return a.Prefix == ll }) {
			a := &netlink.Addr{IPNet: &net.IPNet{IP: ll.Addr().AsSlice(), Mask: net.CIDRMask(64, 128)}}
			if err := h.AddrDel(link, a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				return wrap(fmt.Errorf("delete link-local address %s: %w", ll, err))
			}
		}
	}
	if len(m.Addrs) == 0 && len(m.Routes) == 0 {
		return nil
	}
	r := n.rtnl()
	if err := r.giveBack(ifindex, name, m, monotonic()); err != nil {
		return wrap(err)
	}
	return nil
}

// eui64LinkLocal is the fe80::/64 address the kernel derives from mac
// (addrgenmode eui64, the default).
func eui64LinkLocal(mac net.HardwareAddr) (netip.Prefix, bool) {
	if len(mac) != 6 {
		return netip.Prefix{}, false
	}
	var b [16]byte
	b[0], b[1] = 0xfe, 0x80
	b[8], b[9], b[10] = mac[0]^0x02, mac[1], mac[2]
	b[11], b[12] = 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.PrefixFrom(netip.AddrFrom16(b), 64), true
}

// RemoveMacvtap deletes tsm<N>. A macvtap already gone is success; a
// link of that name that is not a macvtap is refused. Call it only after
// QEMU has released the queues, then RestoreContainerLink.
func (n *Netns) RemoveMacvtap(index int) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	name := MacvtapName(index)
	m, err := n.macvtap(name)
	if isLinkNotFound(err) {
		return nil
	}
	if err == nil {
		// Equivalent to: ip link del dev tsmN
		n.seen.changed(m.Attrs().Index)
		err = h.LinkDel(m)
		if isLinkNotFound(err) || errors.Is(err, unix.ENODEV) {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("netns %s: remove macvtap %s: %w", n.path, name, err)
	}
	return nil
}
