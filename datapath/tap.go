package datapath

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// MaxQueues bounds the queue count of one tap; the kernel allows 256 queues
// per tap, far more than any guest has vCPUs for.
const MaxQueues = 256

// ErrTapMismatch reports an existing tsn<N> whose fixed properties
// (mode, headers, multiqueue, persistence) differ from what was asked. Such
// a tap is not changed in place: the caller decides whether to replace it.
var ErrTapMismatch = errors.New("tap properties differ")

// TapSpec is the tap wanted for endpoint Index.
type TapSpec struct {
	Index  int
	Queues int // 1 = single queue; >1 = multiqueue
	MTU    int // 0 = leave the kernel default
}

func toTap(l *netlink.Tuntap, index int) Tap {
	return Tap{
		Link:       toLink(l),
		Index:      index,
		MultiQueue: l.Flags&netlink.TUNTAP_MULTI_QUEUE != 0,
		VnetHdr:    l.Flags&netlink.TUNTAP_VNET_HDR != 0,
		NoPI:       l.Flags&netlink.TUNTAP_NO_PI != 0,
		Persistent: !l.NonPersist,
		Attached:   attached(l),
	}
}

func attached(l *netlink.Tuntap) int {
	if l.Flags&netlink.TUNTAP_MULTI_QUEUE != 0 {
		return l.Queues + l.DisabledQueues
	}
	if l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0 {
		return 1
	}
	return 0
}

func (s TapSpec) validate() error {
	name := TapName(s.Index)
	switch {
	case s.Index < 0:
		return fmt.Errorf("endpoint index %d is negative", s.Index)
	case len(name) >= unix.IFNAMSIZ:
		return fmt.Errorf("tap name %q for endpoint %d is longer than %d bytes", name, s.Index, unix.IFNAMSIZ-1)
	case s.Queues < 1 || s.Queues > MaxQueues:
		return fmt.Errorf("tap %s: %d queues is outside 1..%d", name, s.Queues, MaxQueues)
	case s.MTU < 0:
		return fmt.Errorf("tap %s: negative MTU %d", name, s.MTU)
	}
	return nil
}

func (s TapSpec) tunFlags() uint16 {
	f := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if s.Queues > 1 {
		f |= unix.IFF_MULTI_QUEUE
	}
	return f
}

// mismatch names the first fixed property of t that differs from s.
func (s TapSpec) mismatch(t Tap) string {
	switch {
	case t.Kind != "tap":
		return "kind " + t.Kind + ", want tap"
	case !t.NoPI:
		return "packet information header enabled"
	case !t.VnetHdr:
		return "vnet_hdr disabled"
	case t.MultiQueue != (s.Queues > 1):
		return fmt.Sprintf("multiqueue=%v, want %v", t.MultiQueue, s.Queues > 1)
	case !t.Persistent:
		return "not persistent (its lifetime belongs to another process)"
	}
	return ""
}

// Taps lists our endpoint taps (tsn<N>) in the netns; Kata's are KataLinks.
func (n *Netns) Taps() ([]Tap, error) {
	links, err := n.linkList()
	if err != nil {
		return nil, err
	}
	var out []Tap
	for _, l := range links {
		idx, ok := ParseTapName(l.Attrs().Name)
		t, isTun := l.(*netlink.Tuntap)
		if ok && isTun {
			out = append(out, toTap(t, idx))
		}
	}
	return out, nil
}

func (n *Netns) tap(name string) (*netlink.Tuntap, error) {
	l, err := n.linkByName(name)
	if err != nil {
		return nil, err
	}
	t, ok := l.(*netlink.Tuntap)
	if !ok {
		return nil, fmt.Errorf("%w: %s is a %s, not a tap", ErrTapMismatch, name, l.Type())
	}
	return t, nil
}

// EnsureTap makes tsn<N> exist as a persistent TAP device without
// packet information, with vnet_hdr, multiqueue when spec.Queues > 1, the
// given MTU, and up. An existing tap with the right fixed properties is
// kept (its MTU and state are corrected); one with other fixed properties
// is left alone and reported as ErrTapMismatch.
//
// The tap is persistent so that it outlives a crash of this process
// between creating it and handing its queues to QEMU, and so that its
// removal is an explicit, ordered step (after QEMU has let go of it).
func (n *Netns) EnsureTap(ctx context.Context, spec TapSpec) (Tap, error) {
	if err := spec.validate(); err != nil {
		return Tap{}, fmt.Errorf("netns %s: %w", n.path, err)
	}
	name := TapName(spec.Index)
	t, err := n.tap(name)
	switch {
	case isLinkNotFound(err):
		// Exclusive: a tap someone made under this name since we looked
		// is theirs, and attaching to it would make it look like ours.
		if err := n.createTap(name, spec.tunFlags()|unix.IFF_TUN_EXCL); err != nil {
			return Tap{}, err
		}
		zerolog.Ctx(ctx).Debug().Str("netns", n.path).Str("tap", name).Int("queues", spec.Queues).Msg("created tap")
		if t, err = n.tap(name); err != nil {
			return Tap{}, fmt.Errorf("netns %s: read back tap %s: %w", n.path, name, err)
		}
	case err != nil:
		return Tap{}, fmt.Errorf("netns %s: tap %s: %w", n.path, name, err)
	}
	if why := spec.mismatch(toTap(t, spec.Index)); why != "" {
		return Tap{}, fmt.Errorf("netns %s: tap %s: %w: %s", n.path, name, ErrTapMismatch, why)
	}
	// Equivalent to: ip link set dev tsnN mtu M up
	mtu := 0
	if spec.MTU > 0 && t.Attrs().MTU != spec.MTU {
		mtu = spec.MTU
	}
	if down := t.Attrs().Flags&unix.IFF_UP == 0; down || mtu > 0 {
		if down {
			// Before it is up: a tap created, or one of ours left down.
			if err := n.noHostIPv6(name); err != nil {
				return Tap{}, err
			}
		}
		if err := n.setLink(t.Attrs().Index, down, mtu); err != nil {
			return Tap{}, fmt.Errorf("netns %s: set %s up (mtu %d): %w", n.path, name, spec.MTU, err)
		}
	}
	if t, err = n.tap(name); err != nil {
		return Tap{}, fmt.Errorf("netns %s: read back tap %s: %w", n.path, name, err)
	}
	return toTap(t, spec.Index), nil
}

// createTap creates a persistent tap; with IFF_TUN_EXCL in flags it fails
// (EBUSY) rather than attach to a device that already exists. Equivalent
// to: ip tuntap add dev tsnN mode tap vnet_hdr [multi_queue]
func (n *Netns) createTap(name string, flags uint16) error {
	err := n.Do(func() error {
		f, err := openTunQueue(name, flags)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := unix.IoctlSetInt(int(f.Fd()), unix.TUNSETPERSIST, 1); err != nil {
			return fmt.Errorf("TUNSETPERSIST: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("netns %s: create tap %s: %w", n.path, name, err)
	}
	return nil
}

// noHostIPv6 gives the host no IPv6 address on a link of ours that is
// not up yet. The tap is a pipe between the redirects and QEMU: a
// link-local address of the host on it (its duplicate address detection,
// its router solicitations) would send frames of the host into the guest,
// and its address and routes, each a netlink event, would start passes
// that find nothing to do. Not the disable_ipv6 sysctl: a path lookup in
// /proc/sys/net walks the entries of every netns, half a millisecond per
// tap on a node of 250 sandboxes. A kernel without IPv6 has nothing to
// turn off. Equivalent to: ip link set dev NAME addrgenmode none
func (n *Netns) noHostIPv6(name string) error {
	const addrGenModeNone = 1 // IN6_ADDR_GEN_MODE_NONE, which x/sys/unix does not name
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	spec.AddRtAttr(unix.AF_INET6, nil).AddRtAttr(unix.IFLA_INET6_ADDR_GEN_MODE, []byte{addrGenModeNone})
	err := n.rtnl().request(unix.RTM_NEWLINK, 0, nl.NewIfInfomsg(unix.AF_UNSPEC),
		nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)), spec)
	if err != nil && !errors.Is(err, unix.EAFNOSUPPORT) {
		return fmt.Errorf("netns %s: no IPv6 address of the host on %s: %w", n.path, name, err)
	}
	return nil
}

// openTunQueue opens /dev/net/tun and attaches it to (or creates) the
// named device. The calling thread must be in the target netns: the tun
// driver creates and looks up devices in the opener's namespace.
func openTunQueue(name string, flags uint16) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// Vhost says whether queues come with vhost-net fds.
type Vhost string

const (
	VhostAuto Vhost = "auto" // use /dev/vhost-net when it exists
	VhostOn   Vhost = "on"   // require it
	VhostOff  Vhost = "off"  // never use it
)

// VhostNetPath is the vhost-net device; a variable so tests can point it
// elsewhere.
var VhostNetPath = "/dev/vhost-net"

var noVhostOnce sync.Once

// Queues are the open fds of one endpoint, ready to hand to QEMU.
type Queues struct {
	Tap   []*os.File
	Vhost []*os.File // empty, or one per tap queue
}

// Close closes every fd still held; closing twice is harmless.
func (q *Queues) Close() {
	for _, f := range append(q.Tap, q.Vhost...) {
		f.Close()
	}
}

// OpenQueues attaches spec.Queues new queues to the existing tsn<N>
// and, depending on vhost, opens one vhost-net fd per queue. The
// caller owns the fds (QEMU sets its own blocking mode on them).
func (n *Netns) OpenQueues(ctx context.Context, spec TapSpec, vhost Vhost) (*Queues, error) {
	if err := spec.validate(); err != nil {
		return nil, fmt.Errorf("netns %s: %w", n.path, err)
	}
	name := TapName(spec.Index)
	// TUNSETIFF on a missing name would quietly create a new, transient
	// tap: check first that ours is there.
	t, err := n.tap(name)
	if err != nil {
		return nil, fmt.Errorf("netns %s: open queues of %s: %w", n.path, name, err)
	}
	if why := spec.mismatch(toTap(t, spec.Index)); why != "" {
		return nil, fmt.Errorf("netns %s: open queues of %s: %w: %s", n.path, name, ErrTapMismatch, why)
	}
	q := &Queues{}
	err = n.Do(func() error {
		for i := range spec.Queues {
			f, err := openTunQueue(name, spec.tunFlags())
			if err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
			q.Tap = append(q.Tap, f)
		}
		return nil
	})
	if err == nil {
		err = openVhost(ctx, q, spec.Queues, vhost)
	}
	if err != nil {
		q.Close()
		return nil, fmt.Errorf("netns %s: open queues of %s: %w", n.path, name, err)
	}
	return q, nil
}

func openVhost(ctx context.Context, q *Queues, queues int, mode Vhost) error {
	if mode == VhostOff {
		return nil
	}
	if _, err := os.Stat(VhostNetPath); err != nil {
		if mode == VhostOn {
			return fmt.Errorf("vhost=on but %s is unusable: %w", VhostNetPath, err)
		}
		noVhostOnce.Do(func() {
			zerolog.Ctx(ctx).Info().Str("device", VhostNetPath).Err(err).
				Msg("vhost-net unavailable; endpoints use QEMU's userspace virtio-net backend (slower). Load the vhost_net module to enable it")
		})
		return nil
	}
	for range queues {
		f, err := os.OpenFile(VhostNetPath, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", VhostNetPath, err)
		}
		q.Vhost = append(q.Vhost, f)
	}
	return nil
}

// RemoveTap deletes tsn<N>. A tap that is already gone is success; a
// link of that name that is not a tap is refused. Call it only after QEMU
// has released the tap (netdev_del): QEMU can crash when its tap vanishes.
func (n *Netns) RemoveTap(index int) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	name := TapName(index)
	t, err := n.tap(name)
	if isLinkNotFound(err) {
		return nil
	}
	if err == nil {
		// Equivalent to: ip link del dev tsnN
		n.seen.changed(t.Attrs().Index)
		err = h.LinkDel(t)
		if isLinkNotFound(err) || errors.Is(err, unix.ENODEV) {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("netns %s: remove tap %s: %w", n.path, name, err)
	}
	return nil
}
