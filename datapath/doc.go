// Package datapath owns the host side of an endpoint inside one sandbox
// network namespace: listing container links, creating tsn<N> tap devices
// (tcfilter model) and tsm<N> macvtaps (macvtap model, with the container
// link's MAC and addresses lent and given back), handing out queue fds of
// those and of tap or macvtap links a CNI made for the VM, the tc ingress +
// u32 match-all mirred redirects that join a container link to its tap in
// both directions, and HTB egress rate limits.
//
// It never talks to QEMU, never decides what should exist (that is
// reconcile's job) and never touches a link, qdisc or filter it cannot prove
// is its own (tsn/tsm name prefix, fixed filter priority and handle, qdisc
// handle 7453:). Kata's tap<N>_kata devices are listed as Kata's, never as
// container links.
//
// The values it returns and the names of its devices are package
// hostnet's, which imports no netlink, so that a package that only decides
// from them need not import this one.
package datapath
