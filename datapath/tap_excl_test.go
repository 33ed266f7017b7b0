package datapath

import (
	"context"
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestCreateTapIsExclusive: a tap that appeared under our name between
// looking and creating (someone else's) is not attached to. Attaching
// would rewrite its vnet_hdr flag and hand its traffic to us.
func TestCreateTapIsExclusive(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-excl")
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	// Someone else's persistent tap, without vnet_hdr, under our name.
	testnet.IP(t, "-n", ns.Name, "tuntap", "add", "dev", TapName(7), "mode", "tap")
	before := testnet.IP(t, "-n", ns.Name, "-d", "link", "show", TapName(7))

	spec := TapSpec{Index: 7, Queues: 1}
	err = n.createTap(TapName(7), spec.tunFlags()|unix.IFF_TUN_EXCL)
	if !errors.Is(err, unix.EBUSY) {
		t.Fatalf("exclusive create over an existing tap = %v, want EBUSY", err)
	}
	if after := testnet.IP(t, "-n", ns.Name, "-d", "link", "show", TapName(7)); after != before {
		t.Errorf("the existing tap was changed:\n%s\n%s", before, after)
	}
}

// TestWiringNeedsNoLibraryHandle: observing a netns (its addresses, routes
// and neighbours too) and wiring a tap to a link both ways go through the
// Netns's own socket; the library's handle is opened only by a call that
// needs it (here the tap's removal), once, inside the netns.
func TestWiringNeedsNoLibraryHandle(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-lib")
	peer := testnet.NewNS(t, "tapsync-libpeer")
	testnet.Veth(t, ns, "eth0", nil, peer, "peer0")
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	if _, err := n.Observe(Parts{Addrs: true, Routes: true, Neighbors: true}); err != nil {
		t.Fatal(err)
	}
	tap, err := n.EnsureTap(context.Background(), TapSpec{Index: 0, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	eth0, err := n.linkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.EnsureRedirects(eth0.Attrs().Index, tap.Ifindex); err != nil {
		t.Fatal(err)
	}
	if n.h != nil {
		t.Fatal("observing and wiring opened the library's handle")
	}
	// The handle the removal will use sees the tap: it is inside the
	// sandbox's netns, and deletes nothing of the host's.
	if _, err := libOf(t, n).LinkByName(TapName(0)); err != nil {
		t.Fatalf("the library's handle does not see %s: %v", TapName(0), err)
	}
	n.libMu.Lock()
	n.h.Close()
	n.h = nil // RemoveTap opens its own
	n.libMu.Unlock()
	if err := n.RemoveTap(0); err != nil {
		t.Fatal(err)
	}
	if n.h == nil {
		t.Fatal("the tap's removal did not open the library's handle")
	}
	if out := testnet.IP(t, "-n", ns.Name, "link", "show"); strings.Contains(out, TapName(0)) {
		t.Fatalf("the tap is still in the netns (the handle is not inside it?):\n%s", out)
	}
}

// TestOnThreadReturnsWithoutItsFds: OnThread returns once its thread has
// closed what it opened, whether fn ran, enter failed at home (the thread
// checks that it is home before it is reused) or enter failed in another
// netns (the thread is moved back). A caller that counts its descriptors
// right after finds none left over (the watcher's test of a failed Watch
// did, now and then, when each call closed its thread's netns after
// answering).
func TestOnThreadReturnsWithoutItsFds(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-thread")
	other, err := netns.GetFromPath(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	// What OnThread may open is a netns handle: those are counted. A
	// count of every descriptor is one that anything else in the test
	// binary moves for a moment: it once found one more after call 289
	// of "fn ran", whose enter and fn open nothing, in a `make test`.
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, e := range ents {
			if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "net:[") {
				n++
			}
		}
		return n
	}
	noop := func() error { return nil }
	refused := errors.New("refused")
	for _, c := range []struct {
		name  string
		enter func() error
		calls int
	}{
		// Opens nothing now (the process's netns is kept from init): a
		// guard against a per-call opening coming back.
		{"fn ran", noop, 2000},
		{"enter failed at home", func() error { return refused }, 20000},
		// Each call moves its thread back (a thread that could not be
		// moved back would be discarded): fewer.
		{"enter failed elsewhere", func() error {
			if err := netns.Set(other); err != nil {
				return err
			}
			return refused
		}, 300},
	} {
		t.Run(c.name, func(t *testing.T) {
			// More Ps than cores: an idle one takes the caller as soon as
			// the thread answers, while the thread may still be closing.
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(8))
			for i := range c.calls {
				before := count()
				if err := OnThread(c.enter, noop); err != nil && !errors.Is(err, refused) {
					t.Fatal(err)
				}
				if after := count(); after != before {
					t.Fatalf("call %d: %d netns descriptors open after OnThread returned, %d before", i, after, before)
				}
			}
		})
	}
}

// A closed Netns opens no library handle: its namespace descriptor is
// closed, and its number may name another file by then.
func TestClosedNetnsOpensNoHandle(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-closed")
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := n.lib(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("lib after Close = %v, want os.ErrClosed", err)
	}
}

// TestEnterFailedElsewhereComesHome: a thread whose enter left for
// another netns and then failed is moved back to the process's netns, and
// says it is home, which is what lets OnThread reuse it (a thread that
// cannot be moved back is discarded instead).
func TestEnterFailedElsewhereComesHome(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-home")
	other, err := netns.GetFromPath(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	own, err := ownNetns()
	if err != nil {
		t.Fatal(err)
	}
	refused := errors.New("refused")
	type result struct {
		home, back bool
		err        error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		home, err := inThread(func() error {
			if err := netns.Set(other); err != nil {
				return err
			}
			return refused
		}, func() error { return nil })
		cur, gerr := netns.Get()
		back := gerr == nil && cur.Equal(own)
		if gerr == nil {
			cur.Close()
		}
		if home && back {
			runtime.UnlockOSThread() // else the thread ends with the goroutine
		}
		res <- result{home, back, err}
	}()
	r := <-res
	if !errors.Is(r.err, refused) {
		t.Fatalf("inThread = %v, want enter's error", r.err)
	}
	if !r.home || !r.back {
		t.Errorf("after enter failed in another netns: home %v, thread in the process's netns %v; want both", r.home, r.back)
	}
}
