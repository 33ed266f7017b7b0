// Package datapath owns the host side of an endpoint inside one sandbox
// network namespace: listing container links, creating tsn<N> tap devices
// and handing out their queue fds, and the tc ingress + u32 match-all mirred
// redirects that join a container link to its tap in both directions.
//
// It never talks to QEMU, never decides what should exist (that is
// reconcile's job) and never touches a link, qdisc or filter it cannot prove
// is its own (tap name prefix, fixed filter priority and handle). Kata's
// tap<N>_kata devices are listed as Kata's, never as container links.
package datapath
