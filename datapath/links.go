package datapath

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func linkKind(l netlink.Link) string {
	if t, ok := l.(*netlink.Tuntap); ok {
		if t.Mode == netlink.TUNTAP_MODE_TUN {
			return "tun"
		}
		return "tap"
	}
	return l.Type()
}

func toLink(l netlink.Link) Link {
	a := l.Attrs()
	parent := a.ParentIndex
	if a.NetNsID >= 0 {
		parent = 0 // the lower device lives in another netns
	}
	return Link{
		Parent:    parent,
		Master:    a.MasterIndex,
		Name:      a.Name,
		AltNames:  a.AltNames,
		Ifindex:   a.Index,
		Kind:      linkKind(l),
		MAC:       a.HardwareAddr,
		MTU:       a.MTU,
		OperState: a.OperState.String(),
		Up:        a.Flags&net.FlagUp != 0,
		NoARP:     a.RawFlags&unix.IFF_NOARP != 0,
	}
}

// isTapEndpoint says whether l is one of our endpoint taps: never a
// container link.
func isTapEndpoint(l netlink.Link) bool {
	_, ok := ParseTapName(l.Attrs().Name)
	return ok && linkKind(l) == "tap"
}

// isKataLink says whether l is a device Kata made for one of its
// endpoints: a tap (tcfilter model) or a macvtap on top of the container
// link (macvtap model), both named tap<N>_kata. Neither is a container
// link: wiring Kata's macvtap would put a second NIC with its MAC into
// the guest.
func isKataLink(l netlink.Link) bool {
	_, ok := ParseKataTapName(l.Attrs().Name)
	k := linkKind(l)
	return ok && (k == "tap" || k == "macvtap")
}

func isLoopback(l netlink.Link) bool { return l.Attrs().Flags&net.FlagLoopback != 0 }

func (n *Netns) linkList() ([]netlink.Link, error) {
	if n.obs != nil {
		return n.obs.links, nil
	}
	links, err := n.dumpLinks()
	if err != nil {
		return nil, fmt.Errorf("list links in netns %s: %w", n.path, err)
	}
	return links, nil
}

// linkByIndex looks the link up in Observe's link dump while it runs (a
// round trip per limited link before), and asks the kernel otherwise. A
// link that does not exist is (nil, nil).
func (n *Netns) linkByIndex(ifindex int) (netlink.Link, error) {
	if n.obs == nil {
		l, err := n.linkByIndexLive(ifindex)
		if isLinkNotFound(err) {
			return nil, nil
		}
		return l, err
	}
	for _, l := range n.obs.links {
		if l.Attrs().Index == ifindex {
			return l, nil
		}
	}
	return nil, nil
}

// ContainerLinks lists the links that the runtime or CNI put into the
// netns: everything but loopback, our endpoint taps (tsn<N>),
// macvtaps (tsm<N>) and ifbs (tsi<N>), and Kata's taps and macvtaps (tap<N>_kata), each with
// its addresses. Which of them can be wired is the caller's decision.
func (n *Netns) ContainerLinks() ([]Link, error) {
	return n.containerLinks(true)
}

// containerLinks is ContainerLinks, with the links' addresses only when
// withAddrs (a dump of its own).
func (n *Netns) containerLinks(withAddrs bool) ([]Link, error) {
	links, err := n.linkList()
	if err != nil {
		return nil, err
	}
	var addrs map[int][]netip.Prefix
	if withAddrs {
		if addrs, err = n.addrsByLink(); err != nil {
			return nil, err
		}
	}
	var out []Link
	for _, l := range links {
		if isLoopback(l) || isTapEndpoint(l) || isMacvtapEndpoint(l) || isIfbEndpoint(l) || isKataLink(l) {
			continue
		}
		cl := toLink(l)
		cl.Addrs = addrs[cl.Ifindex]
		out = append(out, cl)
	}
	return out, nil
}

// addrsByLink returns the addresses of every link in the netns by ifindex,
// from one dump on the Netns's own socket: a dump per link would cost a
// netlink round trip each. A point-to-point address is its local address
// alone (a /32 or /128), as the netlink library has always read it here.
func (n *Netns) addrsByLink() (map[int][]netip.Prefix, error) {
	// Equivalent to: ip -n <netns> address show
	as, err := n.rtnl().addrs(0, 0)
	if err != nil {
		return nil, err
	}
	out := map[int][]netip.Prefix{}
	for _, a := range as {
		p := a.Prefix
		if a.Peer.IsValid() {
			p = netip.PrefixFrom(p.Addr(), p.Addr().BitLen())
		}
		out[a.ifindex] = append(out[a.ifindex], p)
	}
	return out, nil
}

// KataLinks lists Kata's endpoint devices in the netns (tap<N>_kata, taps
// and macvtaps): evidence that Kata wired a container link, never ours to
// change or delete.
func (n *Netns) KataLinks() ([]Link, error) {
	links, err := n.linkList()
	if err != nil {
		return nil, err
	}
	var out []Link
	for _, l := range links {
		if isKataLink(l) {
			out = append(out, toLink(l))
		}
	}
	return out, nil
}
