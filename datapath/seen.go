package datapath

import (
	"github.com/vishvananda/netlink"
)

// filtersSeen keeps, from one observation to the next, the ingress
// filters Observe dumped of each link, so that an observation dumps again
// only the links whose tc may have changed since: a dump per link (an
// empty one for a link with no ingress hook) was most of what a pass that
// finds nothing to do costs.
//
// It is off until KeepFilters: keeping it is only right for a caller that
// hears every change of the netns's links and tc (a netlink watch) and
// passes it on through FiltersChanged before the next observation.
// Changes made through this Netns are noted where they are made. Only
// Observe reads it; a mutation always reads the kernel. Like the Netns,
// it serves one caller at a time.
type filtersSeen struct {
	on   bool
	kept map[int]keptFilters // by ifindex
}

// keptFilters are the filters at parent on one link.
type keptFilters struct {
	parent uint32
	fs     []netlink.Filter
}

// KeepFilters makes Observe keep the ingress filters it dumps and read
// them again while nothing says they changed. From then on the caller
// must pass every netlink message about the netns's links and tc on to
// FiltersChanged (to ForgetFilters when messages may have been lost)
// before it observes again.
func (n *Netns) KeepFilters() { n.seen.on = true }

// FiltersChanged notes that link ifindex or its tc may have changed (a
// link or tc message about it): the next observation dumps its filters
// again, and those of the links that redirect to it.
func (n *Netns) FiltersChanged(ifindex int) { n.seen.changed(ifindex) }

// ForgetFilters drops every link's kept filters: the next observation
// dumps them all.
func (n *Netns) ForgetFilters() { clear(n.seen.kept) }

// prune drops what is kept of links not in present (gone, their messages
// passed on or not).
func (s *filtersSeen) prune(present []netlink.Link) {
	for i := range s.kept {
		if !hasLink(present, i) {
			delete(s.kept, i)
		}
	}
}

// get returns the filters kept of link ifindex at parent.
func (s *filtersSeen) get(ifindex int, parent uint32) ([]netlink.Filter, bool) {
	k, ok := s.kept[ifindex]
	if !ok || k.parent != parent {
		return nil, false
	}
	return k.fs, true
}

// put keeps the filters of link ifindex at parent, as just dumped.
func (s *filtersSeen) put(ifindex int, parent uint32, fs []netlink.Filter) {
	if !s.on {
		return
	}
	if s.kept == nil {
		s.kept = map[int]keptFilters{}
	}
	s.kept[ifindex] = keptFilters{parent: parent, fs: fs}
}

// changed notes a change of link ifindex or of its tc: what is kept of
// it goes, and so do the filters that redirect to it (the kernel
// reports a redirect's target as 0 once the target is gone, and says so
// with no message about the link the filter is on).
func (s *filtersSeen) changed(ifindex int) {
	delete(s.kept, ifindex)
	for i, k := range s.kept {
		if redirectsTo(k.fs, ifindex) {
			delete(s.kept, i)
		}
	}
}

// redirectsTo says whether one of fs redirects to link ifindex.
func redirectsTo(fs []netlink.Filter, ifindex int) bool {
	for _, f := range fs {
		u, ok := f.(*netlink.U32)
		if !ok {
			continue
		}
		for _, a := range u.Actions {
			if m, ok := a.(*netlink.MirredAction); ok && m.Ifindex == ifindex {
				return true
			}
		}
	}
	return false
}

func hasLink(links []netlink.Link, ifindex int) bool {
	for _, l := range links {
		if l.Attrs().Index == ifindex {
			return true
		}
	}
	return false
}
