package datapath

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// FilterPriority is the tc priority of tapsync's redirect filters. A
// filter is ours if and only if it sits at this priority on an ingress
// hook; Kata's own filters are added with priority 0, which the kernel
// turns into 49152, so the two never collide.
const FilterPriority uint16 = 0x7453

// ingressHandle is the handle of a link's ingress hook: an ingress or a
// clsact qdisc, whichever the link has, takes it.
var ingressHandle = netlink.MakeHandle(0xffff, 0)

// ingressParent returns the parent handle for ingress filters on link, or
// 0 when the link has no ingress hook yet. A clsact qdisc serves as one too.
// While Observe runs, a link whose root qdisc is plain (plainRoot) gets
// ffff:fff2 without the qdisc dump: a link without a hook is then not told
// apart, but its filter dump is empty (and kept, see filtersSeen), and
// costs less than the qdisc dump, which the kernel makes of every link's
// qdiscs with their statistics.
func (n *Netns) ingressParent(link netlink.Link) (uint32, error) {
	if n.plainRoot(link) {
		return netlink.HANDLE_MIN_INGRESS, nil
	}
	qdiscs, err := n.qdiscsOn(link)
	if err != nil {
		return 0, fmt.Errorf("list qdiscs on %s: %w", link.Attrs().Name, err)
	}
	return ingressParentOf(qdiscs), nil
}

// ingressParentOf is ingressParent given the link's qdiscs.
func ingressParentOf(qdiscs []netlink.Qdisc) uint32 {
	for _, q := range qdiscs {
		switch q.Type() {
		case "ingress":
			return ingressHandle
		case "clsact":
			return netlink.HANDLE_MIN_INGRESS
		}
	}
	return 0
}

// ensureIngress returns the ingress parent of link, adding an ingress
// qdisc when it has none, and whether it added it: a hook just added
// holds no filter yet. The add comes first: on a link without a hook
// (every new endpoint's tap and container link) it is the only call, and
// when it fails the qdisc listing tells why. A link whose handle ffff: is
// held by a qdisc other than an ingress or a clsact has no room for the
// hook: that is an error naming the qdisc, and the link is left as it is.
// Equivalent to: tc qdisc add dev LINK ingress
func (n *Netns) ensureIngress(link netlink.Link) (parent uint32, added bool, err error) {
	name := link.Attrs().Name
	err = n.addIngressQdisc(link.Attrs().Index)
	if err == nil {
		return ingressHandle, true, nil
	}
	// EEXIST: an ingress or a clsact is there, or (older kernels) another
	// qdisc holds ffff:; EINVAL: (newer kernels) another qdisc holds
	// ffff: ("Cannot move an existing qdisc to a different parent").
	if !errors.Is(err, unix.EEXIST) && !errors.Is(err, unix.EINVAL) {
		return 0, false, fmt.Errorf("add ingress qdisc on %s: %w", name, err)
	}
	qdiscs, lerr := n.qdiscsOn(link)
	if lerr != nil {
		return 0, false, fmt.Errorf("add ingress qdisc on %s: %w; list qdiscs: %w", name, err, lerr)
	}
	if parent := ingressParentOf(qdiscs); parent != 0 {
		return parent, false, nil
	}
	for _, q := range qdiscs {
		if q.Attrs().Handle == ingressHandle {
			return 0, false, fmt.Errorf("add ingress qdisc on %s: handle ffff: is held by its %s qdisc (parent %s), not an ingress hook; left alone",
				name, q.Type(), netlink.HandleStr(q.Attrs().Parent))
		}
	}
	return 0, false, fmt.Errorf("add ingress qdisc on %s: %w", name, err)
}

// redirectsOn lists the mirred-redirect u32 filters on link's ingress.
func (n *Netns) redirectsOn(link netlink.Link, parent uint32) ([]Redirect, error) {
	filters, err := n.ingressFilters(link, parent)
	if err != nil {
		return nil, fmt.Errorf("list ingress filters on %s: %w", link.Attrs().Name, err)
	}
	var out []Redirect
	for _, f := range filters {
		u, ok := f.(*netlink.U32)
		if !ok || u.Priority == IngressPriority { // a limit, not a redirect
			continue
		}
		for _, a := range u.Actions {
			m, ok := a.(*netlink.MirredAction)
			if !ok || m.MirredAction != netlink.TCA_EGRESS_REDIR {
				continue
			}
			out = append(out, Redirect{
				From: link.Attrs().Index, FromName: link.Attrs().Name,
				To: m.Ifindex, Priority: u.Priority,
				Owned: u.Priority == FilterPriority,
			})
		}
	}
	return out, nil
}

// Redirects lists every mirred-redirect filter on every link of the netns,
// ours and others', with target names resolved where the target exists.
func (n *Netns) Redirects() ([]Redirect, error) {
	links, err := n.linkList()
	if err != nil {
		return nil, err
	}
	names := make(map[int]string, len(links))
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var out []Redirect
	err = n.eachIngress(links, func(l netlink.Link, parent uint32) error {
		rs, err := n.redirectsOn(l, parent)
		for _, r := range rs {
			r.ToName = names[r.To] // "" when the target vanished
			out = append(out, r)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// eachIngress calls fn for each of links that has an ingress hook, with
// the hook's parent handle, and while Observe runs for each link whose
// root qdisc is plain, with ffff:fff2 (see ingressParent); the
// first error stops it, named with the netns.
func (n *Netns) eachIngress(links []netlink.Link, fn func(l netlink.Link, parent uint32) error) error {
	for _, l := range links {
		parent, err := n.ingressParent(l)
		if err == nil && parent != 0 {
			err = fn(l, parent)
		}
		if err != nil {
			return fmt.Errorf("netns %s: %w", n.path, err)
		}
	}
	return nil
}

// EnsureRedirects joins a container link and its tap in both directions:
// every frame arriving on one leaves through the other. It is idempotent;
// a filter of ours that points anywhere else (for example at a tap that was
// re-created with a new ifindex) is replaced, and filters at other
// priorities are never touched.
func (n *Netns) EnsureRedirects(container, tap int) error {
	c, err := n.linkByIndexLive(container)
	if err != nil {
		return fmt.Errorf("netns %s: redirect from link %d: %w", n.path, container, err)
	}
	t, err := n.linkByIndexLive(tap)
	if err != nil {
		return fmt.Errorf("netns %s: redirect to link %d: %w", n.path, tap, err)
	}
	return errors.Join(n.ensureRedirect(c, t), n.ensureRedirect(t, c))
}

func (n *Netns) ensureRedirect(fromLink, toLink netlink.Link) error {
	from, to := fromLink.Attrs().Index, toLink.Attrs().Index
	fromName, toName := fromLink.Attrs().Name, toLink.Attrs().Name
	wrap := func(err error) error {
		return fmt.Errorf("netns %s: redirect %s→%s: %w", n.path, fromName, toName, err)
	}
	parent, added, err := n.ensureIngress(fromLink)
	if err != nil {
		return wrap(err)
	}
	var existing []Redirect
	if !added { // a hook just added has no filters to look at
		if existing, err = n.redirectsOn(fromLink, parent); err != nil {
			return wrap(err)
		}
	}
	var ours []Redirect
	for _, r := range existing {
		if r.Owned {
			ours = append(ours, r)
		}
	}
	if len(ours) == 1 && ours[0].To == to {
		return nil
	}
	if len(ours) > 0 {
		if err := n.delOurFilter(fromLink, parent); err != nil {
			return wrap(err)
		}
	}
	if err := n.addRedirect(from, parent, to); err != nil {
		return wrap(fmt.Errorf("add filter: %w", err))
	}
	return nil
}

// delOurFilter deletes every filter at FilterPriority on link's ingress.
// Equivalent to: tc filter del dev LINK parent ffff: prio 29779
func (n *Netns) delOurFilter(link netlink.Link, parent uint32) error {
	h, err := n.lib()
	if err != nil {
		return err
	}
	f := &netlink.U32{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: link.Attrs().Index,
		Parent:    parent,
		Priority:  FilterPriority,
		Protocol:  unix.ETH_P_ALL,
	}}
	n.seen.changed(f.Attrs().LinkIndex)
	if err := h.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete filter prio %d on %s: %w", FilterPriority, link.Attrs().Name, err)
	}
	return nil
}

// RemoveRedirects deletes the redirect pair of one endpoint: our filter
// on the tap, and our filter on the container link if it still points at
// that tap (or at a device that no longer exists). A filter of ours on the
// container link that points at another tap belongs to the endpoint that
// replaced this one and stays. tap may be 0 when the tap is unknown; then
// only a dangling filter on the container link is removed. Links, hooks
// or filters already gone are success; filters of other owners and the
// ingress qdisc itself always stay.
func (n *Netns) RemoveRedirects(container, tap int) error {
	var errs []error
	if tap > 0 {
		errs = append(errs, n.removeRedirect(tap, func(Redirect) bool { return true }))
	}
	errs = append(errs, n.removeRedirect(container, func(r Redirect) bool {
		if (r.To == tap && tap > 0) || r.To == 0 { // the kernel reports 0 once the target is gone
			return true
		}
		_, err := n.linkByIndexLive(r.To)
		return isLinkNotFound(err)
	}))
	return errors.Join(errs...)
}

// removeRedirect deletes our filter on ifindex's ingress if match says so.
func (n *Netns) removeRedirect(ifindex int, match func(Redirect) bool) error {
	link, err := n.linkByIndexLive(ifindex)
	if isLinkNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("netns %s: remove redirect from link %d: %w", n.path, ifindex, err)
	}
	parent, err := n.ingressParent(link)
	if err != nil || parent == 0 {
		return wrapNetns(n, err)
	}
	rs, err := n.redirectsOn(link, parent)
	if err != nil {
		return wrapNetns(n, err)
	}
	for _, r := range rs {
		if r.Owned && match(r) {
			return wrapNetns(n, n.delOurFilter(link, parent))
		}
	}
	return nil
}

func wrapNetns(n *Netns, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("netns %s: %w", n.path, err)
}
