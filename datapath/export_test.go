package datapath

import "testing"

// KeptFilters is the number of links whose filters the Netns keeps
// (filtersSeen), for the tests of package datapath_test.
func (n *Netns) KeptFilters() int { return len(n.seen.kept) }

// CountRequests counts, from now on until the test ends, the requests the
// Netns sends on its own socket, by message type. Read the counts between
// calls of the Netns: the socket's lock guards them.
func (n *Netns) CountRequests(t testing.TB) map[uint16]int {
	counts := map[uint16]int{}
	s := n.dumper
	s.mu.Lock()
	s.sent = func(typ uint16) { counts[typ]++ }
	s.mu.Unlock()
	t.Cleanup(func() {
		s.mu.Lock()
		s.sent = nil
		s.mu.Unlock()
	})
	return counts
}
