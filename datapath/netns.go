package datapath

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Netns is one sandbox network namespace, opened by path. It holds a
// netlink handle bound to that namespace, so ordinary link and tc operations
// never need the calling thread to change namespace.
type Netns struct {
	path string
	ns   netns.NsHandle
	id   [2]uint64 // device and inode of the namespace (nsfs)
	// dumper is the route socket for the dumps and requests this package
	// encodes and decodes itself (dumps.go, rtnl.go, routes.go,
	// requests.go): every call of an observation, the guest's addresses,
	// routes and neighbours included, and of the common wiring.
	dumper *nlSocket
	// h is the library's handle, for the rest (macvtaps, rate limits,
	// deletions), opened by the first call that needs it (lib): most
	// netns never do, and opening it cost a socket made inside the netns
	// per netns opened.
	libMu  sync.Mutex
	h      *netlink.Handle
	closed bool // Close ran: lib opens nothing more
	// obs is what the Observe under way has read; nil outside Observe,
	// when every read dumps afresh: a mutation must see the kernel as it
	// is.
	obs *observation
	// seen keeps the filters from one observation to the next (see
	// KeepFilters).
	seen filtersSeen
}

// Open opens the network namespace at path (for example
// /var/run/netns/cni-1234) and a netlink handle inside it.
func Open(path string) (*Netns, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		ns.Close()
		return nil, fmt.Errorf("stat netns %s: %w", path, err)
	}
	n := &Netns{path: path, ns: ns, id: [2]uint64{st.Dev, st.Ino}}
	// The socket is made on a thread inside the netns (a socket stays in
	// the netns it was made in).
	err = n.Do(func() error {
		var err error
		n.dumper, err = openNLSocket()
		return err
	})
	if err != nil {
		// The socket, if made on a thread that then failed to return home.
		if n.dumper != nil {
			n.dumper.Close()
		}
		ns.Close()
		return nil, fmt.Errorf("netlink socket in netns %s: %w", path, err)
	}
	return n, nil
}

// lib returns the library's handle in the netns, opening it on first use.
// Only rtnetlink: every call of ours is a link, address, route,
// neighbour or tc one, and the library's default (a socket for xfrm and
// netfilter too, each made by entering the netns) tripled what opening a
// handle costs. A dump the kernel interrupts is retried by us (see dump);
// a socket timeout keeps one wedged namespace from hanging its caller.
func (n *Netns) lib() (*netlink.Handle, error) {
	n.libMu.Lock()
	defer n.libMu.Unlock()
	if n.h != nil {
		return n.h, nil
	}
	if n.closed {
		// n.ns is closed: its number may name another file by now.
		return nil, fmt.Errorf("netns %s: %w", n.path, os.ErrClosed)
	}
	var h *netlink.Handle
	err := n.Do(func() error {
		var err error
		h, err = netlink.NewHandleAt(netns.None(), unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		if h != nil { // made on a thread that then failed to return home
			h.Close()
		}
		return nil, fmt.Errorf("netlink handle in netns %s: %w", n.path, err)
	}
	if err := h.SetSocketTimeout(socketTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("netlink socket timeout in netns %s: %w", n.path, err)
	}
	n.h = h
	return h, nil
}

// socketTimeout bounds each send and receive on a netlink socket of ours.
const socketTimeout = 5 * time.Second

// ErrNetnsReplaced says that a Netns's path no longer names the namespace
// it holds: the namespace was deleted, or another one was mounted there.
var ErrNetnsReplaced = errors.New("path names another network namespace")

// Verify checks, with one stat, that the path still names the namespace
// this Netns holds, so that a caller may keep one Netns (and its netlink
// socket) across passes instead of opening one per pass. On
// ErrNetnsReplaced the caller closes this Netns and opens the path again
// (or tears down: the namespace is gone).
//
// A kept Netns pins its namespace: the kernel keeps a namespace alive
// while a socket or descriptor in it is open, and announces its death
// (RTM_DELNSID) only afterwards. So a Netns must not be kept past the
// moment its owner learns that the sandbox ended, and a namespace known
// only by a path that dies with a process (/proc/<pid>/ns/net) is better
// reopened per pass.
func (n *Netns) Verify() error {
	var st unix.Stat_t
	if err := unix.Stat(n.path, &st); err != nil {
		return fmt.Errorf("netns %s: %w: %w", n.path, ErrNetnsReplaced, err)
	}
	if [2]uint64{st.Dev, st.Ino} != n.id {
		return fmt.Errorf("netns %s: %w", n.path, ErrNetnsReplaced)
	}
	return nil
}

// ID is the namespace's identity: the device and inode of its nsfs file.
func (n *Netns) ID() [2]uint64 { return n.id }

// Path is the path the namespace was opened from.
func (n *Netns) Path() string { return n.path }

// Close releases the netlink handle and the namespace reference.
func (n *Netns) Close() error {
	n.libMu.Lock()
	if n.h != nil {
		n.h.Close()
		n.h = nil
	}
	n.closed = true
	n.libMu.Unlock()
	n.dumper.Close()
	return n.ns.Close()
}

// Do runs fn on an OS thread that has entered the namespace. Only work
// that the kernel ties to the calling thread's namespace belongs here
// (opening /dev/net/tun, creating a socket); fn must not start goroutines,
// because they would not inherit the namespace.
//
// If the thread cannot be returned to its original namespace it is left
// locked, and Go discards it when the goroutine ends, so no other goroutine
// ever runs in the wrong namespace.
func (n *Netns) Do(fn func() error) error {
	return OnThread(func() error {
		if err := netns.Set(n.ns); err != nil {
			return fmt.Errorf("enter netns %s: %w", n.path, err)
		}
		return nil
	}, fn)
}

// OnThread runs fn on a locked OS thread after enter has moved the thread
// into another network namespace (setns, or unshare), then moves it back
// (also when enter fails after moving it).
// If it cannot move back, the thread stays locked and Go discards it when
// the goroutine ends, so no other goroutine ever runs in the wrong
// namespace (a thread locked for good instead, when it happened to be the
// main thread, which Go parks rather than ends, showed the whole process
// in the other netns in /proc/self/ns/net). It returns once the thread
// has let go of every descriptor it opened.
func OnThread(enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := inThread(enter, fn)
		if home {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// inThread is OnThread's work on the locked thread; home says the thread
// is back in its own namespace and may be reused.
func inThread(enter, fn func() error) (home bool, err error) {
	orig, err := ownNetns()
	if err != nil {
		return true, fmt.Errorf("get current netns: %w", err)
	}
	if err := enter(); err != nil {
		// enter failed before or after switching: a thread that left is
		// moved back, and only one provably home again is reused.
		return backHome(orig), err
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		return false, errors.Join(ferr, fmt.Errorf("return to the original netns: %w", err))
	}
	return true, ferr
}

// backHome says whether the calling thread is in orig, moving it there
// if it is not.
func backHome(orig netns.NsHandle) bool {
	cur, err := netns.Get()
	if err != nil {
		return false
	}
	defer cur.Close()
	return cur.Equal(orig) || netns.Set(orig) == nil
}

// own is the process's network namespace, kept open from the package's
// init on: every thread that no OnThread holds is in it (one that cannot
// return is discarded), so each call need not open its thread's (a path
// lookup in /proc, and a close, per call). Opened at init, before any
// thread can have left it, so that a count of descriptors taken later
// does not see it appear.
var own struct {
	mu     sync.Mutex
	ns     netns.NsHandle
	opened bool // ns is open (its zero value, 0, is not a closed handle)
}

func init() { _, _ = ownNetns() }

// ownNetns returns the process's network namespace, opening it from the
// calling thread, which must not have left it, if init could not. A
// failed opening is tried again by the next call.
func ownNetns() (netns.NsHandle, error) {
	own.mu.Lock()
	defer own.mu.Unlock()
	if own.opened {
		return own.ns, nil
	}
	ns, err := netns.Get()
	if err != nil {
		return ns, err
	}
	own.ns, own.opened = ns, true
	return ns, nil
}

// dumpRetries bounds how often an interrupted netlink dump is repeated.
// The kernel interrupts a dump when the table changes under it; during a
// CNI ADD that can happen a few times in a row.
const dumpRetries = 5

// dump repeats a netlink dump that the kernel reported as interrupted, so
// callers never act on a partial list.
func dump[T any](f func() ([]T, error)) ([]T, error) {
	var (
		out []T
		err error
	)
	for range dumpRetries {
		out, err = f()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, err
}

// observation is what one Observe reads once and every part of it
// reads: one link dump (six of the same list before), which names each
// link's root qdisc; the qdisc dump only when one of those may be a limit
// of ours (the kernel dumps every link's qdiscs, with their statistics,
// even when asked for one link's: it cost more than the link dump); and
// one ingress filter dump per link (the kernel has no netns-wide filter
// dump), shared by the redirects and the ingress limits.
type observation struct {
	links []netlink.Link
	// plainRoot holds the links whose root qdisc is a plain one
	// (plainRootQdiscs), by ifindex.
	plainRoot  map[int]bool
	qdiscs     []netlink.Qdisc // the qdisc dump, once qdiscsRead
	qdiscsRead bool
	filters    map[int][]netlink.Filter // by ifindex, filled as read
}

// plainRoot says whether Observe, running, found link's root qdisc
// plain (plainRootQdiscs): then link has no limit of ours, and its ingress
// hook, if it has one, is an ingress or clsact qdisc at ffff:, whose
// ingress filters parent ffff:fff2 reaches alike. Outside Observe it is
// false, and callers read the qdiscs.
func (n *Netns) plainRoot(link netlink.Link) bool {
	return n.obs != nil && n.obs.plainRoot[link.Attrs().Index]
}

// qdiscsOn lists link's qdiscs, from Observe's dump while it runs, else
// from a dump of its own (the kernel dumps every link's qdiscs even when
// asked for one link's).
func (n *Netns) qdiscsOn(link netlink.Link) ([]netlink.Qdisc, error) {
	qs, err := n.allQdiscs()
	if err != nil {
		return nil, err
	}
	var out []netlink.Qdisc
	for _, q := range qs {
		if q.Attrs().LinkIndex == link.Attrs().Index {
			out = append(out, q)
		}
	}
	return out, nil
}

// allQdiscs lists every qdisc of the netns, dumped at most once while
// Observe runs. Equivalent to: tc -n <netns> qdisc show
func (n *Netns) allQdiscs() ([]netlink.Qdisc, error) {
	o := n.obs
	if o == nil {
		return n.dumpQdiscs()
	}
	if !o.qdiscsRead {
		qs, err := n.dumpQdiscs()
		if err != nil {
			return nil, err
		}
		o.qdiscs, o.qdiscsRead = qs, true
	}
	return o.qdiscs, nil
}

// plainRootQdiscs are the root qdisc kinds that tell Observe enough
// without the qdisc dump: none is a limit of ours (an HTB), and none has
// a class ffff:fff2, so the link's handle ffff:, if taken, is its ingress
// hook. (The kernel lets any qdisc take handle ffff: at the root; an HTB,
// say, with a class ffff:fff2 would answer a filter dump at that parent
// with that class's filters. An mq is left out for the same reason: its
// queues' qdiscs may be anything, with any handle; a multi-queue tap's
// netns is read with the qdisc dump.) noop is the kind of a link with no root
// qdisc of its own (one never up; an HTB added to a link that is down
// shows as htb). A kind not listed, or none (no IFLA_QDISC), sends
// Observe to the qdisc dump.
var plainRootQdiscs = map[string]bool{
	"noop": true, "noqueue": true, "pfifo_fast": true, "fq_codel": true, "fq": true,
	"pfifo": true, "bfifo": true, "sfq": true, "codel": true, "pie": true, "fq_pie": true, "cake": true,
}

// ingressFilters lists the filters at parent (link's ingress hook), at
// most once per link while Observe runs, and then not at all while they
// are kept from an earlier observation (filtersSeen).
// Equivalent to: tc -n <netns> filter show dev LINK parent PARENT
func (n *Netns) ingressFilters(link netlink.Link, parent uint32) ([]netlink.Filter, error) {
	i, o := link.Attrs().Index, n.obs
	if o == nil {
		return n.dumpFilters(link, parent)
	}
	if fs, ok := o.filters[i]; ok {
		return fs, nil
	}
	if fs, ok := n.seen.get(i, parent); ok {
		o.filters[i] = fs
		return fs, nil
	}
	fs, err := n.dumpFilters(link, parent)
	if err == nil {
		o.filters[i] = fs
		n.seen.put(i, parent, fs)
	}
	return fs, err
}

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, ErrLinkGone)
}
