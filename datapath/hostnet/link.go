package hostnet

import (
	"crypto/sha256"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Link is a network interface as seen inside a sandbox netns.
type Link struct {
	Name string
	// AltNames are the link's alternative names (ip link property add
	// altname): the kernel gives them to no other link either.
	AltNames []string
	Ifindex  int
	// Kind is the rtnetlink kind (veth, macvlan, ipvlan, macvtap, vlan, …),
	// with tuntap split into "tap" and "tun"; "device" for links without
	// a kind, such as loopback or a physical NIC moved into the netns.
	Kind      string
	MAC       net.HardwareAddr
	MTU       int
	OperState string
	Up        bool // administratively up
	// Addrs is every address of the link with its prefix length, IPv4
	// and IPv6, link-local included, in the kernel's dump order (the
	// primary IPv4 address first); callers filter. Filled for container
	// links only, nil for taps.
	Addrs []netip.Prefix
	NoARP bool // IFF_NOARP
	// Parent is the ifindex of the lower device of a macvlan, macvtap,
	// ipvlan or vlan link (0: none, or in another netns).
	Parent int
	// Master is the ifindex of the device l is enslaved to (a bridge,
	// bond, VRF, …; 0: none).
	Master int
}

func (l Link) String() string {
	return fmt.Sprintf("%s(%d %s %s)", l.Name, l.Ifindex, l.Kind, l.MAC)
}

// Tap names. Ours are tsn<N>: a prefix of our own, because Kata names its
// taps tap<N>_kata and picks N without looking at what else is in the
// netns; sharing its names would let a Kata hot-add fail on our tap, or
// attach to it. Three letters leave twelve bytes of IFNAMSIZ for N, so
// every index that can be allocated fits.
const (
	tapPrefix     = "tsn"
	kataTapPrefix = "tap"
	kataTapSuffix = "_kata"
)

// TapName is the name of endpoint N's tap device.
func TapName(index int) string { return tapPrefix + strconv.Itoa(index) }

// ParseTapName returns N for a name of the form tsn<N>.
func ParseTapName(name string) (int, bool) {
	s, ok := strings.CutPrefix(name, tapPrefix)
	if !ok {
		return 0, false
	}
	return parseIndex(s)
}

// ParseKataTapName returns N for a name of the form tap<N>_kata: Kata's
// tap (tcfilter model) or macvtap (macvtap model) for its endpoint N.
func ParseKataTapName(name string) (int, bool) {
	s, ok := strings.CutPrefix(name, kataTapPrefix)
	if !ok {
		return 0, false
	}
	if s, ok = strings.CutSuffix(s, kataTapSuffix); !ok {
		return 0, false
	}
	return parseIndex(s)
}

// ParseEndpointName returns N for a name that one of endpoint N's devices
// takes: tsn<N> (tap), tsm<N> (macvtap) or tsi<N> (ifb), whatever kind of
// link carries it now.
func ParseEndpointName(name string) (int, bool) {
	for _, parse := range []func(string) (int, bool){ParseTapName, ParseMacvtapName, ParseIfbName} {
		if n, ok := parse(name); ok {
			return n, true
		}
	}
	return 0, false
}

// parseIndex parses a decimal index without sign or leading zeros, so
// that each index has exactly one name.
func parseIndex(s string) (int, bool) {
	if s == "" || (len(s) > 1 && s[0] == '0') || s[0] < '0' || s[0] > '9' {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// Tap is an endpoint tap as observed in the netns.
type Tap struct {
	Link
	Index      int // endpoint index N of tsn<N>
	MultiQueue bool
	VnetHdr    bool
	NoPI       bool
	Persistent bool // false for taps that live only as long as their fds (Kata's)
	// Attached counts the queues held open (typically by QEMU), enabled
	// or not. The kernel reports queue counts only for multiqueue taps;
	// for a single-queue tap it is 1 when it has carrier, which the tun
	// driver turns on exactly while a queue is attached (and the tap is up).
	Attached int
}

// Macvtap names. Ours are tsm<N>: a prefix of our own for the same reason
// as tsn<N> (Kata names its macvtaps tap<N>_kata and picks N blindly),
// and distinct from tsn<N> so that a name alone says which model an
// endpoint device belongs to; a tap and a macvtap of one index never
// collide.
const macvtapPrefix = "tsm"

// MacvtapName is the name of endpoint N's macvtap device (macvtap model).
func MacvtapName(index int) string { return macvtapPrefix + strconv.Itoa(index) }

// ParseMacvtapName returns N for a name of the form tsm<N>.
func ParseMacvtapName(name string) (int, bool) {
	s, ok := strings.CutPrefix(name, macvtapPrefix)
	if !ok {
		return 0, false
	}
	return parseIndex(s)
}

// Ifb names. A limit on a link's ingress goes through an ifb of ours,
// tsi<N>, one per endpoint (see datapath's EnsureIngressLimit).
const ifbPrefix = "tsi"

// IfbName is the name of endpoint N's ifb device.
func IfbName(index int) string { return ifbPrefix + strconv.Itoa(index) }

// ParseIfbName returns N for a name of the form tsi<N>.
func ParseIfbName(name string) (int, bool) {
	s, ok := strings.CutPrefix(name, ifbPrefix)
	if !ok {
		return 0, false
	}
	return parseIndex(s)
}

// HostMAC is the MAC a container link carries while its own MAC is lent
// to endpoint index's macvtap: a locally administered unicast address
// derived from the guest MAC and the index.
//
// Derived, not random: a crash between creating the macvtap and
// changing the container link's MAC converges to the same address
// without recording anything more, and datapath's RemoveMacvtap's caller can tell
// the link's state from its MAC. Derived from the guest MAC and not from
// the index alone: guest MACs are unique on the pod network, so the
// host-side MACs of two sandboxes never collide on a shared L2 (an index
// alone would give every sandbox's first endpoint the same MAC).
func HostMAC(guest net.HardwareAddr, index int) net.HardwareAddr {
	sum := sha256.Sum256([]byte("tapsync macvtap host mac\x00" + guest.String() + "\x00" + strconv.Itoa(index)))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02 // unicast, locally administered
	if slices.Equal(mac, guest) {
		mac[5] ^= 0x01
	}
	return mac
}

// Macvtap is a macvtap device in the netns: one of ours (Index ≥ 0) or
// a container link of kind macvtap.
type Macvtap struct {
	Link
	Index int    // endpoint index N of tsm<N>; -1 when not ours
	Mode  string // bridge, vepa, private, passthru, source
}
