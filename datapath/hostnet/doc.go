// Package hostnet holds the values that describe the host side of a
// sandbox netns as tapsync observes it (links, taps, macvtaps, redirects,
// rate limits, routes, neighbours, and what the macvtap model took from a
// link) and the names tapsync gives its own devices there.
//
// It does no I/O and imports no netlink: datapath reads and changes the
// netns and returns these values, and the planner decides from them
// without depending on the kernel interface.
package hostnet
