package main

import (
	"os"
	"runtime/debug"
)

// startupGCPercent is the Go collector's GOGC while the daemon starts:
// from its first registration until the first full resync is done (see
// awaitReady). That burst (every sandbox's record read, monitor dialled,
// netns observed and, on a fresh node, wired) allocates its whole working
// set from an empty heap, and at the default of 100 the collector ran a
// cycle each time the heap doubled from 4 MB, scanning every dial's and
// reader's stack each time: 4–7 % of a restart's CPU. At 300 it runs a
// third as often, the heap growing to at most four times what is live
// before a cycle (a GOMEMLIMIT still caps it), and the default comes back
// once the burst is over, with one collection that gives the pages the
// burst left free back to the kernel (the daemon's RSS settles where it
// would have without).
const startupGCPercent = 300

// startupGC sets startupGCPercent unless the operator set GOGC, and
// returns what puts the collector back as it was.
func startupGC() (restore func()) {
	if _, set := os.LookupEnv("GOGC"); set {
		return func() {}
	}
	prev := debug.SetGCPercent(startupGCPercent)
	return func() {
		debug.SetGCPercent(prev)
		debug.FreeOSMemory()
	}
}
