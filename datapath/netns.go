package datapath

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Netns is one sandbox network namespace, opened by path. It holds a
// netlink handle bound to that namespace, so ordinary link and tc operations
// never need the calling thread to change namespace.
type Netns struct {
	path string
	ns   netns.NsHandle
	h    *netlink.Handle
	// links, while Observe runs, is its one link dump, which every part
	// of the observation reads (six dumps of the same list before).
	links []netlink.Link
}

// Open opens the network namespace at path (for example
// /var/run/netns/cni-1234) and a netlink handle inside it.
func Open(path string) (*Netns, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netlink handle in netns %s: %w", path, err)
	}
	// A dump that the kernel interrupts is retried by us (see dump); a
	// socket timeout keeps one wedged namespace from hanging its caller.
	if err := h.SetSocketTimeout(5 * time.Second); err != nil {
		h.Close()
		ns.Close()
		return nil, fmt.Errorf("netlink socket timeout in netns %s: %w", path, err)
	}
	return &Netns{path: path, ns: ns, h: h}, nil
}

// Path is the path the namespace was opened from.
func (n *Netns) Path() string { return n.path }

// Close releases the netlink handle and the namespace reference.
func (n *Netns) Close() error {
	n.h.Close()
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
	return onThread(func() error {
		if err := netns.Set(n.ns); err != nil {
			return fmt.Errorf("enter netns %s: %w", n.path, err)
		}
		return nil
	}, fn)
}

// onThread runs fn on a locked OS thread after enter has moved the thread
// into another network namespace, then moves it back. If it cannot move
// back, the thread stays locked and Go discards it when the goroutine
// ends, so no other goroutine ever runs in the wrong namespace.
func onThread(enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := enter(); err != nil {
			// enter failed before or after switching: only a thread that
			// is provably home again may be reused.
			if cur, cerr := netns.Get(); cerr == nil && cur.Equal(orig) {
				cur.Close()
				runtime.UnlockOSThread()
			}
			errc <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to the original netns: %w", err))
			return // thread stays locked and dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
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

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}
