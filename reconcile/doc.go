// Package reconcile, with its pure subpackage planner, is the only package
// that decides. For one sandbox at a time it observes the netns (datapath)
// and the VM (qmp), reads the sandbox's record (state), has the planner
// compute a plan and applies it in order, recording intent before each
// mutation that cannot be observed back.
//
// It reaches the host, QEMU and the disk only through the small interfaces
// it defines, so planning and most of applying are tested without root.
// It never watches anything itself; watchers only tell it which sandbox to
// look at.
package reconcile
