package datapath

// KeptFilters is the number of links whose filters the Netns keeps
// (filtersSeen), for the tests of package datapath_test.
func (n *Netns) KeptFilters() int { return len(n.seen.kept) }

// CountRequests counts, from now on, the requests the Netns sends on its
// own socket, by message type.
func (n *Netns) CountRequests() map[uint16]int {
	counts := map[uint16]int{}
	n.dumper.sent = func(typ uint16) { counts[typ]++ }
	return counts
}
