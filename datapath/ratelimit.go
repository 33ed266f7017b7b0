package datapath

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Rate limits follow Kata's semantics: rx is traffic into the VM, tx
// traffic out of it, in bits per second, 0 = unlimited. A limit is an HTB
// qdisc at the root of a link's egress with one class, rate = ceil =
// the limit, that all traffic falls into.
//
// Where each one sits in the tcfilter model: a tc mirred "egress
// redirect" hands the frame to dev_queue_xmit of its target, so it is
// queued on the target's root (egress) qdisc. Into the VM, frames arrive
// on the container link and are redirected to the tap: the rx limit is
// on the tap's egress. Out of the VM, frames arrive on the tap and are
// redirected to the container link: the tx limit is on the container
// link's egress. TestRateLimitThroughRedirects measures both.

// rateHandle is the major number of our HTB qdisc. A root qdisc is ours if
// and only if it has this handle; the kernel's default root qdiscs have
// handle 0, and a qdisc someone added by hand has another number.
const rateHandle uint16 = 0x7453

// ErrQdiscNotOurs reports a root qdisc that someone else put on a link
// (Kata's rate limiter, an admin's shaping): it is never replaced.
var ErrQdiscNotOurs = errors.New("root qdisc is not ours")

// burstFloor is the smallest burst of a limit, in bytes. A GSO packet on
// a veth or tap can be 64 KiB; a bucket smaller than one packet still
// passes it (HTB lets tokens go negative) but makes the rate lumpy.
const burstFloor = 64 << 10

// burst is the HTB bucket size for a rate of rateBytes bytes per second:
// 10 ms of traffic (what the kernel timer can release between two
// wake-ups with room to spare), at least burstFloor, and never more than
// one second of traffic, so a slow limit cannot be overrun for long.
func burst(rateBytes uint64) uint32 {
	b := max(rateBytes/100, burstFloor)
	b = min(b, max(rateBytes, 1))
	return uint32(min(b, 1<<30))
}

// RateLimit reports the limit on ifindex's egress, in bits per second,
// and whether one of ours is there.
func (n *Netns) RateLimit(ifindex int) (uint64, bool, error) {
	link, err := n.linkByIndexLive(ifindex)
	if err != nil {
		return 0, false, fmt.Errorf("netns %s: rate limit of link %d: %w", n.path, ifindex, err)
	}
	bps, ok, err := n.rateLimitOn(link)
	if err != nil {
		return 0, false, fmt.Errorf("netns %s: rate limit of %s: %w", n.path, link.Attrs().Name, err)
	}
	return bps, ok, nil
}

// rootQdisc returns link's root qdisc, nil when it has none listed, or
// while Observe runs, when the link dump showed it plain (none of ours,
// told without the qdisc dump: see plainRoot).
func (n *Netns) rootQdisc(link netlink.Link) (netlink.Qdisc, error) {
	if n.plainRoot(link) {
		return nil, nil
	}
	qs, err := n.qdiscsOn(link)
	if err != nil {
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT {
			return q, nil
		}
	}
	return nil, nil
}

func isOurRateQdisc(q netlink.Qdisc) bool {
	return q != nil && q.Type() == "htb" && q.Attrs().Handle == netlink.MakeHandle(rateHandle, 0)
}

func (n *Netns) rateLimitOn(link netlink.Link) (uint64, bool, error) {
	root, err := n.rootQdisc(link)
	if err != nil || !isOurRateQdisc(root) {
		return 0, false, err
	}
	cl, err := n.rateClass(link)
	if err != nil || cl == nil {
		return 0, false, err
	}
	return cl.Rate * 8, true, nil
}

// rateClass returns our HTB class (rateHandle:1) on link, nil when it has
// none, from one class dump on the Netns's own socket: an observation of
// a limited link needs no library handle.
// Equivalent to: tc -n <netns> class show dev LINK parent 7453:
func (n *Netns) rateClass(link netlink.Link) (*netlink.HtbClass, error) {
	cs, err := decodedDump(n, unix.RTM_GETTCLASS, unix.RTM_NEWTCLASS, parseHTBClass,
		&nl.TcMsg{Family: unix.AF_UNSPEC, Ifindex: int32(link.Attrs().Index), Parent: netlink.MakeHandle(rateHandle, 0)})
	if err != nil {
		return nil, fmt.Errorf("list classes: %w", err)
	}
	for _, c := range cs {
		if c.Handle == netlink.MakeHandle(rateHandle, 1) {
			return c, nil
		}
	}
	return nil, nil
}

// EnsureRateLimit limits ifindex's egress to bps bits per second (whole
// bytes per second: bps is rounded down to a multiple of 8). 0 removes
// the limit. It replaces only the kernel's default root qdisc or ours;
// any other root qdisc is left alone and reported as ErrQdiscNotOurs. A
// new limit on a link that has one changes the class in place: the qdisc
// and its queue stay, so traffic does not flap.
func (n *Netns) EnsureRateLimit(ifindex int, bps uint64) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	if bps == 0 {
		return n.RemoveRateLimit(ifindex)
	}
	link, err := n.linkByIndexLive(ifindex)
	if err != nil {
		return fmt.Errorf("netns %s: rate limit on link %d: %w", n.path, ifindex, err)
	}
	name := link.Attrs().Name
	wrap := func(err error) error {
		return fmt.Errorf("netns %s: rate limit %d bit/s on %s: %w", n.path, bps, name, err)
	}
	if bps < 8 {
		return wrap(errors.New("below one byte per second"))
	}
	root, err := n.rootQdisc(link)
	if err != nil {
		return wrap(err)
	}
	switch {
	case isOurRateQdisc(root):
	case root != nil && root.Attrs().Handle != 0:
		return wrap(fmt.Errorf("%w: %s %s", ErrQdiscNotOurs, root.Type(), netlink.HandleStr(root.Attrs().Handle)))
	default:
		// Equivalent to: tc qdisc replace dev LINK root handle 7453: htb default 1
		q := netlink.NewHtb(netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(rateHandle, 0),
			Parent:    netlink.HANDLE_ROOT,
		})
		q.Defcls = 1
		n.seen.changed(q.Attrs().LinkIndex)
		if err := h.QdiscReplace(q); err != nil {
			return wrap(fmt.Errorf("add htb qdisc: %w", err))
		}
	}
	rate := bps / 8
	b := burst(rate)
	cl := netlink.NewHtbClass(netlink.ClassAttrs{
		LinkIndex: ifindex,
		Parent:    netlink.MakeHandle(rateHandle, 0),
		Handle:    netlink.MakeHandle(rateHandle, 1),
	}, netlink.HtbClassAttrs{Rate: rate * 8, Ceil: rate * 8, Buffer: b, Cbuffer: b,
		// One class shares with nobody: the quantum only has to be
		// set, so the kernel does not derive one and warn about it.
		Quantum: burstFloor})
	cur, err := n.rateClass(link)
	switch {
	case err != nil:
		return wrap(err)
	case cur == nil:
		// Equivalent to: tc class add dev LINK parent 7453: classid 7453:1 htb rate R ceil R burst B cburst B
		n.seen.changed(cl.Attrs().LinkIndex)
		err = h.ClassAdd(cl)
	case cur.Rate != rate || cur.Ceil != rate || cur.Buffer != cl.Buffer || cur.Cbuffer != cl.Cbuffer:
		// Equivalent to: tc class change dev LINK parent 7453: classid 7453:1 htb rate R ceil R burst B cburst B
		n.seen.changed(cl.Attrs().LinkIndex)
		err = h.ClassChange(cl)
	}
	if err != nil {
		return wrap(fmt.Errorf("set htb class: %w", err))
	}
	return nil
}

// RemoveRateLimit deletes our HTB qdisc from ifindex's egress; the kernel
// puts its default root qdisc back. No limit, a link that is gone, or a
// root qdisc of someone else's are success (the last left alone).
func (n *Netns) RemoveRateLimit(ifindex int) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	link, err := n.linkByIndexLive(ifindex)
	if isLinkNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("netns %s: remove rate limit on link %d: %w", n.path, ifindex, err)
	}
	root, err := n.rootQdisc(link)
	if err == nil && isOurRateQdisc(root) {
		// Equivalent to: tc qdisc del dev LINK root handle 7453:
		n.seen.changed(root.Attrs().LinkIndex)
		if err = h.QdiscDel(root); err != nil && n.noOurQdisc(link) {
			err = nil // gone meanwhile
		}
	}
	if err != nil {
		return fmt.Errorf("netns %s: remove rate limit on %s: %w", n.path, link.Attrs().Name, err)
	}
	return nil
}

// noOurQdisc says whether link has no root qdisc of ours (any more).
func (n *Netns) noOurQdisc(link netlink.Link) bool {
	root, err := n.rootQdisc(link)
	return err == nil && !isOurRateQdisc(root)
}

// RateLimits lists our limits on every link of the netns, from one
// qdisc dump (while Observe runs, none when no link's root qdisc can be
// one of ours) and a class dump per limited link, then one filter dump
// per link with an ingress hook for the limits through our ifbs.
func (n *Netns) RateLimits() ([]RateLimitOn, error) {
	links, err := n.linkList()
	if err != nil {
		return nil, err
	}
	egress, err := n.egressLimits()
	if err != nil {
		return nil, err
	}
	ingress, err := n.ingressLimits(links)
	if err != nil {
		return nil, err
	}
	return append(egress, ingress...), nil
}

// egressLimits lists our HTBs on the egress of every link but our ifbs
// (whose HTB is the limit of another link's ingress).
func (n *Netns) egressLimits() ([]RateLimitOn, error) {
	if o := n.obs; o != nil && len(o.plainRoot) == len(o.links) {
		return nil, nil // no link's root qdisc is an HTB
	}
	qs, err := n.allQdiscs()
	if err != nil {
		return nil, fmt.Errorf("list qdiscs in netns %s: %w", n.path, err)
	}
	var out []RateLimitOn
	for _, q := range qs {
		if q.Attrs().Parent != netlink.HANDLE_ROOT || !isOurRateQdisc(q) {
			continue
		}
		link, err := n.linkByIndex(q.Attrs().LinkIndex)
		if err != nil {
			return nil, fmt.Errorf("netns %s: rate limit on link %d: %w", n.path, q.Attrs().LinkIndex, err)
		}
		if link == nil {
			continue
		}
		if isIfbEndpoint(link) {
			continue
		}
		cl, err := n.rateClass(link)
		if err != nil {
			return nil, fmt.Errorf("netns %s: rate limit on %s: %w", n.path, link.Attrs().Name, err)
		}
		if cl != nil {
			out = append(out, RateLimitOn{Ifindex: link.Attrs().Index, Name: link.Attrs().Name, BPS: cl.Rate * 8})
		}
	}
	return out, nil
}

// Limits on a link's ingress. What a link receives passes no egress
// qdisc of the netns before it reaches its consumer (a tap link's frames
// from the VM enter the stack on the tap link; a macvtap's frames for the
// VM arrive on its lower device and go to the macvtap's queues from the
// receive path), so such a limit goes through an ifb device: a matchall
// filter on the link's ingress redirects every frame to the ifb, whose
// egress carries the same HTB as any other limit, and the ifb hands each
// frame back to the receive path of the link it came from, past tc.
// Each endpoint has at most one such limit; its ifb is tsi<N> (IfbName).

// IngressPriority is the tc priority of our ingress-limit filter. It
// differs from FilterPriority (the tcfilter model's redirects) so that
// neither is ever taken for the other: Redirects does not list it. (A
// matchall filter would say it better, but this kernel has no
// cls_matchall or cls_basic; u32 is what the redirects use already.)
const IngressPriority uint16 = 0x7454

// ifbQueueLen is the ifb's transmit queue length, which bounds the HTB
// leaf queue: the kernel's default for an ifb (32) drops a TCP window's
// burst and makes the measured rate fall well below the limit.
const ifbQueueLen = 1000

// isIfbEndpoint says whether l is one of our ifbs: never a container link.
func isIfbEndpoint(l netlink.Link) bool {
	_, ok := ParseIfbName(l.Attrs().Name)
	return ok && l.Type() == "ifb"
}

// ifb returns our ifb tsi<N>, LinkNotFoundError when there is none; a
// link of that name that is not an ifb is an error.
func (n *Netns) ifb(index int) (netlink.Link, error) {
	l, err := n.linkByName(IfbName(index))
	if err != nil {
		return nil, err
	}
	if l.Type() != "ifb" {
		return nil, fmt.Errorf("%s is a %s, not an ifb", IfbName(index), l.Type())
	}
	return l, nil
}

// ingressLimitFilter returns the ifindex our ingress-limit filter at
// parent, link's ingress hook, redirects to (0: no filter of ours).
func (n *Netns) ingressLimitFilter(link netlink.Link, parent uint32) (int, error) {
	fs, err := n.ingressFilters(link, parent)
	if err != nil {
		return 0, fmt.Errorf("list ingress filters on %s: %w", link.Attrs().Name, err)
	}
	for _, f := range fs {
		m, ok := f.(*netlink.U32)
		if !ok || m.Priority != IngressPriority {
			continue
		}
		for _, a := range m.Actions {
			if r, ok := a.(*netlink.MirredAction); ok && r.MirredAction == netlink.TCA_EGRESS_REDIR {
				return r.Ifindex, nil
			}
		}
	}
	return 0, nil
}

// delIngressLimitFilter deletes our ingress-limit filter at parent,
// link's ingress hook.
// Equivalent to: tc filter del dev LINK parent ffff: prio 29780
func (n *Netns) delIngressLimitFilter(link netlink.Link, parent uint32) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	f := &netlink.U32{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: link.Attrs().Index, Parent: parent, Priority: IngressPriority, Protocol: unix.ETH_P_ALL,
	}}
	n.seen.changed(f.Attrs().LinkIndex)
	if err := h.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("delete filter prio %d on %s: %w", IngressPriority, link.Attrs().Name, err)
	}
	return nil
}

// EnsureIngressLimit limits what ifindex receives to bps bits per second
// through endpoint index's ifb tsi<N>: the ifb is made (up, its queue
// long enough), limited like any egress (EnsureRateLimit), then the
// link's ingress is redirected to it; a filter of ours that points
// elsewhere is replaced. 0 removes the limit (RemoveIngressLimit).
func (n *Netns) EnsureIngressLimit(ifindex, index int, bps uint64) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	if bps == 0 {
		return n.RemoveIngressLimit(ifindex, index)
	}
	name := IfbName(index)
	link, err := n.linkByIndexLive(ifindex)
	if err != nil {
		return fmt.Errorf("netns %s: ingress limit on link %d via %s: %w", n.path, ifindex, name, err)
	}
	wrap := func(err error) error {
		return fmt.Errorf("netns %s: ingress limit %d bit/s on %s via %s: %w", n.path, bps, link.Attrs().Name, name, err)
	}
	ifb, err := n.ifb(index)
	if isLinkNotFound(err) {
		// Equivalent to: ip link add tsiN txqueuelen 1000 type ifb
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.TxQLen = name, ifbQueueLen
		if err = h.LinkAdd(&netlink.Ifb{LinkAttrs: attrs}); err != nil && !errors.Is(err, unix.EEXIST) {
			return wrap(fmt.Errorf("add ifb: %w", err))
		}
		ifb, err = n.ifb(index)
	}
	if err != nil {
		return wrap(err)
	}
	if ifb.Attrs().Flags&net.FlagUp == 0 {
		// Equivalent to: ip link set tsiN up
		if err := h.LinkSetUp(ifb); err != nil {
			return wrap(fmt.Errorf("set %s up: %w", name, err))
		}
	}
	if err := n.EnsureRateLimit(ifb.Attrs().Index, bps); err != nil {
		return err
	}
	parent, added, err := n.ensureIngress(link)
	if err != nil {
		return wrap(err)
	}
	if !added { // a hook just added has no filters to look at
		to, err := n.ingressLimitFilter(link, parent)
		if err != nil {
			return wrap(err)
		}
		if to == ifb.Attrs().Index {
			return nil
		}
		if to != 0 {
			if err := n.delIngressLimitFilter(link, parent); err != nil {
				return wrap(err)
			}
		}
	}
	// Equivalent to: tc filter add dev LINK parent ffff: prio 29780 protocol all
	//   u32 match u8 0 0 action mirred egress redirect dev tsiN
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: parent, Priority: IngressPriority, Protocol: unix.ETH_P_ALL},
		Sel: &netlink.TcU32Sel{
			Flags: netlink.TC_U32_TERMINAL,
			Nkeys: 1,
			Keys:  []netlink.TcU32Key{{Mask: 0, Val: 0, Off: 0}},
		},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR,
			Ifindex:      ifb.Attrs().Index,
		}},
	}
	n.seen.changed(f.Attrs().LinkIndex)
	if err := h.FilterAdd(f); err != nil {
		return wrap(fmt.Errorf("add filter: %w", err))
	}
	return nil
}

// RemoveIngressLimit takes our filter off ifindex's ingress (its frames
// flow unlimited again), then deletes tsi<N>. A link or ifb already gone
// is success; ifindex 0 deletes only the ifb.
func (n *Netns) RemoveIngressLimit(ifindex, index int) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	name := IfbName(index)
	if ifindex != 0 {
		var parent uint32
		link, err := n.linkByIndexLive(ifindex)
		if err == nil {
			parent, err = n.ingressParent(link)
		}
		if err == nil && parent != 0 {
			err = n.delIngressLimitFilter(link, parent)
		}
		if err != nil && !isLinkNotFound(err) {
			return fmt.Errorf("netns %s: remove ingress limit on link %d via %s: %w", n.path, ifindex, name, err)
		}
	}
	ifb, err := n.ifb(index)
	if err == nil {
		// Equivalent to: ip link del dev tsiN
		n.seen.changed(ifb.Attrs().Index)
		err = h.LinkDel(ifb)
		if errors.Is(err, unix.ENODEV) {
			err = nil
		}
	}
	if err != nil && !isLinkNotFound(err) {
		return fmt.Errorf("netns %s: remove ifb %s: %w", n.path, name, err)
	}
	return nil
}

// ingressLimits lists our ifbs as limits on the ingress of the link that
// redirects to each (Ifindex 0: none does; BPS 0: no HTB on it yet).
func (n *Netns) ingressLimits(links []netlink.Link) ([]RateLimitOn, error) {
	from := map[int]netlink.Link{}
	err := n.eachIngress(links, func(l netlink.Link, parent uint32) error {
		to, err := n.ingressLimitFilter(l, parent)
		if to != 0 {
			from[to] = l
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	var out []RateLimitOn
	for _, l := range links {
		idx, ok := ParseIfbName(l.Attrs().Name)
		if !ok || l.Type() != "ifb" {
			continue
		}
		r := RateLimitOn{Ingress: true, Ifb: idx}
		if src, ok := from[l.Attrs().Index]; ok {
			r.Ifindex, r.Name = src.Attrs().Index, src.Attrs().Name
		}
		bps, ok, err := n.rateLimitOn(l)
		if err != nil {
			return nil, fmt.Errorf("netns %s: rate limit on %s: %w", n.path, l.Attrs().Name, err)
		}
		if ok {
			r.BPS = bps
		}
		out = append(out, r)
	}
	return out, nil
}
