package datapath

import (
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/vishvananda/netlink"
)

// Our class, read on the Netns's own socket, is what the library reads,
// for a rate that fits 32 bits and for one that needs the kernel's
// 64-bit attribute (past 2^32 bytes per second); and observing a limited
// link opens no library handle.
func TestRateClassAgreesWithLibrary(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-rate")
	peer := testnet.NewNS(t, "tapsync-ratepeer")
	testnet.Veth(t, ns, "eth0", nil, peer, "peer0")
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	eth0, err := n.linkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	for _, bps := range []uint64{8_000_000, 40_000_000_000} {
		if err := n.EnsureRateLimit(eth0.Attrs().Index, bps); err != nil {
			t.Fatal(err)
		}
		got, err := n.rateClass(eth0)
		if err != nil || got == nil {
			t.Fatalf("%d bit/s: our class %v, %v", bps, got, err)
		}
		cs, err := libOf(t, n).ClassList(eth0, netlink.MakeHandle(rateHandle, 0))
		if err != nil {
			t.Fatal(err)
		}
		var want *netlink.HtbClass
		for _, c := range cs {
			if h, ok := c.(*netlink.HtbClass); ok && h.Handle == netlink.MakeHandle(rateHandle, 1) {
				want = h
			}
		}
		if want == nil {
			t.Fatalf("%d bit/s: the library finds no class 7453:1 in %v", bps, cs)
		}
		want.Statistics = nil // the dump's counters, which ours does not read
		if *got != *want {
			t.Errorf("%d bit/s: our class %+v, the library's %+v", bps, *got, *want)
		}
		if got.Rate*8 != bps {
			t.Errorf("%d bit/s: class rate %d bytes/s", bps, got.Rate)
		}
	}

	n.libMu.Lock()
	n.h.Close()
	n.h = nil
	n.libMu.Unlock()
	st, err := n.Observe(Parts{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.RateLimits) != 1 || st.RateLimits[0].BPS != 40_000_000_000 {
		t.Errorf("observed limits %+v, want 40 Gbit/s on eth0", st.RateLimits)
	}
	if n.h != nil {
		t.Error("observing a limited link opened the library's handle")
	}
}
