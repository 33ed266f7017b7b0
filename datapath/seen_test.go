package datapath_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
)

// TestObserveKeepsFilters: with KeepFilters, an observation reads the
// ingress filters an earlier one dumped until a change of that link is
// passed on (FiltersChanged, ForgetFilters) or made through the Netns
// itself; without it, every observation reads the kernel.
func TestObserveKeepsFilters(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	s.n.KeepFilters()
	tap, err := s.n.EnsureTap(ctx, datapath.TapSpec{Index: 0, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tap.Ifindex); err != nil {
		t.Fatal(err)
	}
	ours := func() int {
		t.Helper()
		st, err := s.n.Observe(datapath.Parts{})
		if err != nil {
			t.Fatal(err)
		}
		return len(ownedRedirects(st.Redirects))
	}
	// Every link's filters are kept: eth0's and the tap's, and lo's,
	// none (an observation dumps each link's ingress filters).
	if n := ours(); n != 2 || s.n.KeptFilters() != 3 {
		t.Fatalf("after wiring: %d redirects of ours, filters kept of %d links; want 2 and 3", n, s.n.KeptFilters())
	}
	delFilter := func() {
		testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "del", "dev", "eth0", "ingress", "prio", fmt.Sprint(datapath.FilterPriority))
	}

	// A change by hand, not passed on: the kept filters are read.
	delFilter()
	if n := ours(); n != 2 {
		t.Fatalf("a change not passed on: %d redirects of ours, want the 2 kept", n)
	}
	// Passed on: that link is dumped again.
	s.n.FiltersChanged(s.eth0.Ifindex)
	if n := ours(); n != 1 {
		t.Fatalf("after FiltersChanged(eth0): %d redirects of ours, want 1", n)
	}
	// A change made through the Netns is noted by it.
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tap.Ifindex); err != nil {
		t.Fatal(err)
	}
	if n := ours(); n != 2 {
		t.Fatalf("after EnsureRedirects: %d redirects of ours, want 2", n)
	}
	// Every link's: ForgetFilters.
	delFilter()
	s.n.ForgetFilters()
	if s.n.KeptFilters() != 0 {
		t.Errorf("ForgetFilters kept filters of %d links", s.n.KeptFilters())
	}
	if n := ours(); n != 1 {
		t.Fatalf("after ForgetFilters: %d redirects of ours, want 1", n)
	}
	// A link that is gone takes along what was kept of it and of the
	// filters that redirect to it: the kernel now reports their target
	// as 0, and says nothing about eth0.
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tap.Ifindex); err != nil {
		t.Fatal(err)
	}
	if n := ours(); n != 2 {
		t.Fatalf("rewired: %d redirects of ours, want 2", n)
	}
	if err := s.n.RemoveTap(0); err != nil {
		t.Fatal(err)
	}
	st, err := s.n.Observe(datapath.Parts{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Redirects) != 1 || st.Redirects[0].To != 0 || s.n.KeptFilters() != 2 {
		t.Errorf("after the tap's removal: redirects %+v, filters kept of %d links; want eth0's, to 0, and only it and lo kept", st.Redirects, s.n.KeptFilters())
	}

	// Without KeepFilters, every observation reads the kernel.
	if tap, err = s.n.EnsureTap(ctx, datapath.TapSpec{Index: 0, Queues: 1}); err != nil {
		t.Fatal(err)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tap.Ifindex); err != nil {
		t.Fatal(err)
	}
	other, err := datapath.Open(s.ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	st0, err := other.Observe(datapath.Parts{})
	if err != nil {
		t.Fatal(err)
	}
	delFilter()
	st1, err := other.Observe(datapath.Parts{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st0.Redirects) != 2 || len(st1.Redirects) != 1 || other.KeptFilters() != 0 {
		t.Errorf("a Netns that keeps nothing: %d redirects, then %d after a filter's deletion, filters kept of %d links; want 2, 1, 0",
			len(st0.Redirects), len(st1.Redirects), other.KeptFilters())
	}
}
