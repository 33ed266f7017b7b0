package datapath_test

import (
	"context"
	"net"
	"testing"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
)

// convergedSandbox is what a no-op pass finds: two container links, each
// with a tap and redirects both ways, as reconcile leaves them.
func convergedSandbox(b *testing.B) *sandbox {
	b.Helper()
	s := &sandbox{ns: testnet.NewNS(b, "tapsync-dpb"), host: testnet.NewNS(b, "tapsync-dpbhost")}
	testnet.Veth(b, s.ns, "eth0", containerMAC, s.host, "host0")
	testnet.Veth(b, s.ns, "net1", net.HardwareAddr{0x02, 0x54, 0x53, 0x00, 0x01, 0x03}, s.host, "host1")
	testnet.IP(b, "-n", s.ns.Name, "address", "add", "10.20.0.5/24", "dev", "eth0")
	testnet.IP(b, "-n", s.ns.Name, "route", "add", "default", "via", "10.20.0.1", "dev", "eth0")
	n, err := datapath.Open(s.ns.Path)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Close() })
	links, err := n.ContainerLinks()
	if err != nil {
		b.Fatal(err)
	}
	for i, l := range links {
		tp, err := n.EnsureTap(context.Background(), datapath.TapSpec{Index: i, Queues: 1})
		if err != nil {
			b.Fatal(err)
		}
		if err := n.EnsureRedirects(l.Ifindex, tp.Ifindex); err != nil {
			b.Fatal(err)
		}
	}
	s.n = n
	return s
}

// BenchmarkObserve is the host side of a no-op pass: one observation of
// a converged sandbox with two links (issue 9).
func BenchmarkObserve(b *testing.B) {
	s := convergedSandbox(b)
	st, err := s.n.Observe(datapath.All)
	if err != nil {
		b.Fatal(err)
	}
	if len(st.Links) != 2 || len(st.Taps) != 2 || len(st.Redirects) != 4 {
		b.Fatalf("converged sandbox: %d links, %d taps, %d redirects; want 2, 2, 4", len(st.Links), len(st.Taps), len(st.Redirects))
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.n.Observe(datapath.All); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOpenObserve is what a pass pays on the host side: open the
// netns, observe it, close it.
func BenchmarkOpenObserve(b *testing.B) {
	s := convergedSandbox(b)
	b.ReportAllocs()
	for b.Loop() {
		n, err := datapath.Open(s.ns.Path)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := n.Observe(datapath.All); err != nil {
			b.Fatal(err)
		}
		n.Close()
	}
}

// BenchmarkVerifyObserve is what a pass would pay with a Netns kept
// across passes: the identity check, then the observation.
func BenchmarkVerifyObserve(b *testing.B) {
	s := convergedSandbox(b)
	b.ReportAllocs()
	for b.Loop() {
		if err := s.n.Verify(); err != nil {
			b.Fatal(err)
		}
		if _, err := s.n.Observe(datapath.All); err != nil {
			b.Fatal(err)
		}
	}
}
