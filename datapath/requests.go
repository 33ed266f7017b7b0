package datapath

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// The link and tc requests of a wiring, on the Netns's own socket. The
// library's calls each received into a 64 KB array of their own, garbage
// at once: ten of them per endpoint made a start of 250 sandboxes
// allocate over 300 MB, and its live heap made each collection of that
// garbage cost the daemon more than it costs a process that keeps
// nothing. The messages are the library's encoding; only the socket is
// ours.

// ErrLinkGone is the error of a request about a link that does not exist
// (ENODEV): it went, or never was.
var ErrLinkGone = errors.New("link not found")

// linkByName reads link name. Equivalent to: ip link show dev NAME
func (n *Netns) linkByName(name string) (netlink.Link, error) {
	return n.getLink(0, name)
}

// linkByIndexLive reads link ifindex from the kernel.
// Equivalent to: ip link show dev <ifindex>
func (n *Netns) linkByIndexLive(ifindex int) (netlink.Link, error) {
	return n.getLink(ifindex, "")
}

func (n *Netns) getLink(ifindex int, name string) (netlink.Link, error) {
	req := nl.NewNetlinkRequest(unix.RTM_GETLINK, 0)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(ifindex)
	req.AddData(msg)
	what := name
	if name != "" {
		req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)))
	} else {
		what = "index " + strconv.Itoa(ifindex)
	}
	req.AddData(nl.NewRtAttr(unix.IFLA_EXT_MASK, nl.Uint32Attr(rtextFilterSkipStats)))
	var l netlink.Link
	err := n.dumper.exchange(req, unix.RTM_NEWLINK, func(m []byte) error {
		var err error
		l, err = parseLink(m)
		return err
	})
	switch {
	case errors.Is(err, unix.ENODEV):
		return nil, fmt.Errorf("link %s: %w", what, ErrLinkGone)
	case err != nil:
		return nil, fmt.Errorf("link %s: %w", what, err)
	case l == nil:
		return nil, fmt.Errorf("link %s: no answer", what)
	}
	return l, nil
}

// setLink changes link ifindex: up, and its MTU when mtu > 0.
// Equivalent to: ip link set dev LINK [mtu M] [up]
func (n *Netns) setLink(ifindex int, up bool, mtu int) error {
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(ifindex)
	if up {
		msg.Flags, msg.Change = unix.IFF_UP, unix.IFF_UP
	}
	req.AddData(msg)
	if mtu > 0 {
		req.AddData(nl.NewRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(mtu))))
	}
	return n.dumper.ack(req)
}

// addIngressQdisc adds an ingress qdisc (handle ffff:) to link ifindex;
// EEXIST when the link has one, or another qdisc holds the handle.
// Equivalent to: tc qdisc add dev LINK ingress
func (n *Netns) addIngressQdisc(ifindex int) error {
	n.seen.changed(ifindex)
	req := nl.NewNetlinkRequest(unix.RTM_NEWQDISC, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	req.AddData(&nl.TcMsg{Family: unix.AF_UNSPEC, Ifindex: int32(ifindex), Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS})
	req.AddData(nl.NewRtAttr(nl.TCA_KIND, nl.ZeroTerminated("ingress")))
	req.AddData(nl.NewRtAttr(nl.TCA_OPTIONS, nil))
	return n.dumper.ack(req)
}

// addRedirect adds our filter on link from's ingress hook (parent): a
// u32 match-all whose mirred action redirects every frame to the egress
// of link to, and steals it.
// Equivalent to: tc filter add dev FROM parent ffff: prio 29779 protocol all
//
//	u32 match u8 0 0 action mirred egress redirect dev TO
func (n *Netns) addRedirect(from int, parent uint32, to int) error {
	n.seen.changed(from)
	req := nl.NewNetlinkRequest(unix.RTM_NEWTFILTER, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	req.AddData(&nl.TcMsg{Family: unix.AF_UNSPEC, Ifindex: int32(from), Parent: parent,
		Info: netlink.MakeHandle(FilterPriority, nl.Swap16(unix.ETH_P_ALL))})
	req.AddData(nl.NewRtAttr(nl.TCA_KIND, nl.ZeroTerminated("u32")))
	opts := nl.NewRtAttr(nl.TCA_OPTIONS, nil)
	sel := nl.TcU32Sel{Flags: nl.TC_U32_TERMINAL, Nkeys: 1, Keys: []nl.TcU32Key{{}}} // match u8 0 0: every frame
	opts.AddRtAttr(nl.TCA_U32_SEL, sel.Serialize())
	act := opts.AddRtAttr(nl.TCA_U32_ACT, nil).AddRtAttr(nl.TCA_ACT_TAB, nil)
	act.AddRtAttr(nl.TCA_ACT_KIND, nl.ZeroTerminated("mirred"))
	mirred := nl.TcMirred{TcGen: nl.TcGen{Action: int32(netlink.TC_ACT_STOLEN)}, Eaction: int32(netlink.TCA_EGRESS_REDIR), Ifindex: uint32(to)}
	act.AddRtAttr(nl.TCA_ACT_OPTIONS, nil).AddRtAttr(nl.TCA_MIRRED_PARMS, mirred.Serialize())
	req.AddData(opts)
	return n.dumper.ack(req)
}
