package datapath

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
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
	link, err := n.h.LinkByIndex(ifindex)
	if err != nil {
		return 0, false, fmt.Errorf("netns %s: rate limit of link %d: %w", n.path, ifindex, err)
	}
	bps, ok, err := n.rateLimitOn(link)
	if err != nil {
		return 0, false, fmt.Errorf("netns %s: rate limit of %s: %w", n.path, link.Attrs().Name, err)
	}
	return bps, ok, nil
}

// rootQdisc returns link's root qdisc, nil when it has none listed.
func (n *Netns) rootQdisc(link netlink.Link) (netlink.Qdisc, error) {
	qs, err := dump(func() ([]netlink.Qdisc, error) { return n.h.QdiscList(link) })
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

func (n *Netns) rateClass(link netlink.Link) (*netlink.HtbClass, error) {
	cs, err := dump(func() ([]netlink.Class, error) { return n.h.ClassList(link, netlink.MakeHandle(rateHandle, 0)) })
	if err != nil {
		return nil, fmt.Errorf("list classes: %w", err)
	}
	for _, c := range cs {
		if h, ok := c.(*netlink.HtbClass); ok && h.Handle == netlink.MakeHandle(rateHandle, 1) {
			return h, nil
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
	if bps == 0 {
		return n.RemoveRateLimit(ifindex)
	}
	link, err := n.h.LinkByIndex(ifindex)
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
		if err := n.h.QdiscReplace(q); err != nil {
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
		err = n.h.ClassAdd(cl)
	case cur.Rate != rate || cur.Ceil != rate || cur.Buffer != cl.Buffer || cur.Cbuffer != cl.Cbuffer:
		// Equivalent to: tc class change dev LINK parent 7453: classid 7453:1 htb rate R ceil R burst B cburst B
		err = n.h.ClassChange(cl)
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
	link, err := n.h.LinkByIndex(ifindex)
	if isLinkNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("netns %s: remove rate limit on link %d: %w", n.path, ifindex, err)
	}
	root, err := n.rootQdisc(link)
	if err == nil && isOurRateQdisc(root) {
		// Equivalent to: tc qdisc del dev LINK root handle 7453:
		if err = n.h.QdiscDel(root); err != nil && n.noOurQdisc(link) {
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

// RateLimitOn is one of our limits as observed: a link and its egress
// limit in bits per second.
type RateLimitOn struct {
	Ifindex int
	Name    string
	BPS     uint64
}

// RateLimits lists our limits on every link of the netns, from one
// qdisc dump and a class dump per limited link.
func (n *Netns) RateLimits() ([]RateLimitOn, error) {
	// Equivalent to: tc -n <netns> qdisc show
	qs, err := dump(func() ([]netlink.Qdisc, error) { return n.h.QdiscList(nil) })
	if err != nil {
		return nil, fmt.Errorf("list qdiscs in netns %s: %w", n.path, err)
	}
	var out []RateLimitOn
	for _, q := range qs {
		if q.Attrs().Parent != netlink.HANDLE_ROOT || !isOurRateQdisc(q) {
			continue
		}
		link, err := n.h.LinkByIndex(q.Attrs().LinkIndex)
		if isLinkNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("netns %s: rate limit on link %d: %w", n.path, q.Attrs().LinkIndex, err)
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
