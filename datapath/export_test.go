package datapath

// KeptFilters is the number of links whose filters the Netns keeps
// (filtersSeen), for the tests of package datapath_test.
func (n *Netns) KeptFilters() int { return len(n.seen.kept) }
