package datapath_test

import (
	"errors"
	"io"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
)

// redirectedGuest is the tcfilter datapath with a netns standing in for
// the VM: vm0 takes the tap's place (eth0 ⇄ vm0 redirects both ways, the
// limits on the same egress hooks as on a tap), and its peer geth0 in the
// guest netns is the guest's NIC. A veth's egress qdisc is reached by a
// mirred redirect exactly as a tap's is; a tap would need a process
// pumping frames between its fd and a stack.
type redirectedGuest struct {
	*sandbox
	guest    testnet.NS
	guestNS  *datapath.Netns
	hostNS   *datapath.Netns
	vm0      datapath.Link
	hostAddr string // host0's address
	vmAddr   string // geth0's address
}

func newRedirectedGuest(t *testing.T) *redirectedGuest {
	s := newSandbox(t)
	g := &redirectedGuest{sandbox: s, guest: testnet.NewNS(t, "tapsync-dpguest"), hostAddr: "10.78.0.1", vmAddr: "10.78.0.2"}
	testnet.Veth(t, s.ns, "vm0", nil, g.guest, "geth0")
	testnet.IP(t, "-n", g.guest.Name, "addr", "add", g.vmAddr+"/24", "dev", "geth0")
	testnet.IP(t, "-n", s.host.Name, "addr", "add", g.hostAddr+"/24", "dev", "host0")
	g.vm0 = s.link(t, "vm0")
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, g.vm0.Ifindex); err != nil {
		t.Fatal(err)
	}
	var err error
	if g.guestNS, err = datapath.Open(g.guest.Path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.guestNS.Close() })
	if g.hostNS, err = datapath.Open(s.host.Path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.hostNS.Close() })
	testnet.Run(t, "ip", "netns", "exec", s.host.Name, "ping", "-c", "1", "-W", "5", g.vmAddr)
	return g
}

// throughput streams TCP from the netns from to addr in the netns to for
// a warm-up and then a 2 s window, and returns the receiver's rate in
// bits per second over the window.
func throughput(t *testing.T, from, to *datapath.Netns, addr string) float64 {
	t.Helper()
	var ln net.Listener
	if err := to.Do(func() (err error) { ln, err = net.Listen("tcp4", addr+":0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var got atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 1<<16)
		for {
			n, err := c.Read(buf)
			got.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	var c net.Conn
	if err := from.Do(func() (err error) {
		c, err = net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	sent := make(chan error, 1)
	go func() {
		buf := make([]byte, 1<<16)
		for {
			select {
			case <-stop:
				sent <- nil
				return
			default:
			}
			c.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := c.Write(buf); err != nil && !errors.Is(err, io.EOF) && !isTimeout(err) {
				sent <- err
				return
			}
		}
	}()
	// The window starts after TCP has filled its buffers and the HTB
	// bucket has spent its burst.
	time.Sleep(500 * time.Millisecond)
	b0, t0 := got.Load(), time.Now()
	time.Sleep(2 * time.Second)
	b1, t1 := got.Load(), time.Now()
	close(stop)
	if err := <-sent; err != nil {
		t.Fatalf("stream to %s: %v", addr, err)
	}
	c.Close()
	<-done
	return float64(b1-b0) * 8 / t1.Sub(t0).Seconds()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func within(got, want, tol float64) bool { return got >= want*(1-tol) && got <= want*(1+tol) }

var sentRE = regexp.MustCompile(`Sent (\d+) bytes`)

// qdiscSent is the byte counter of dev's root qdisc: it restarts at 0
// when the qdisc is replaced.
func qdiscSent(t *testing.T, ns testnet.NS, dev string) (string, int64) {
	t.Helper()
	out := testnet.Run(t, "tc", "-n", ns.Name, "-s", "qdisc", "show", "dev", dev, "root")
	m := sentRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no counters in %q", out)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return out, n
}

func TestRateLimitThroughRedirects(t *testing.T) {
	g := newRedirectedGuest(t)
	const limit = 20e6
	defaults := g.tcShow(t) + testnet.Run(t, "tc", "-n", g.ns.Name, "qdisc", "show", "dev", "vm0")
	rx, tx := g.vm0.Ifindex, g.eth0.Ifindex // into the VM: tap's egress; out of it: container link's egress

	// Each limit on its own: rx alone limits only the stream into the VM.
	if err := g.n.EnsureRateLimit(rx, limit); err != nil {
		t.Fatal(err)
	}
	in := throughput(t, g.hostNS, g.guestNS, g.vmAddr)
	out := throughput(t, g.guestNS, g.hostNS, g.hostAddr)
	t.Logf("rx limit %.0f Mbit/s: into the VM %.2f Mbit/s, out of it %.0f Mbit/s", limit/1e6, in/1e6, out/1e6)
	if !within(in, limit, 0.15) || out < 5*limit {
		t.Errorf("rx limit: into %.2f / out of %.2f Mbit/s, want %.0f ±15%% / ≥ %.0f", in/1e6, out/1e6, limit/1e6, 5*limit/1e6)
	}
	for range 2 {
		if err := g.n.EnsureRateLimit(rx, limit); err != nil {
			t.Fatal(err)
		}
		if err := g.n.EnsureRateLimit(tx, limit); err != nil {
			t.Fatal(err)
		}
	}
	shown := func() string {
		return testnet.Run(t, "tc", "-n", g.ns.Name, "qdisc", "show") + testnet.Run(t, "tc", "-n", g.ns.Name, "class", "show", "dev", "eth0") +
			testnet.Run(t, "tc", "-n", g.ns.Name, "class", "show", "dev", "vm0")
	}
	once := shown()
	if err := g.n.EnsureRateLimit(tx, limit); err != nil {
		t.Fatal(err)
	}
	if twice := shown(); twice != once {
		t.Errorf("a repeated EnsureRateLimit changed tc state:\n%s\n%s", once, twice)
	}
	if bps, ok, err := g.n.RateLimit(tx); err != nil || !ok || bps != limit {
		t.Errorf("RateLimit(eth0) = %d, %v, %v; want %d", bps, ok, err, uint64(limit))
	}
	st, err := g.n.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.RateLimits) != 2 {
		t.Errorf("observed limits %v, want eth0 and vm0", st.RateLimits)
	}
	out = throughput(t, g.guestNS, g.hostNS, g.hostAddr)
	t.Logf("tx limit %.0f Mbit/s: out of the VM %.2f Mbit/s", limit/1e6, out/1e6)
	if !within(out, limit, 0.15) {
		t.Errorf("tx limit: out of the VM %.2f Mbit/s, want %.0f ±15%%", out/1e6, limit/1e6)
	}

	// A new limit changes the class only: the qdisc keeps its counters.
	_, sentBefore := qdiscSent(t, g.ns, "eth0")
	if err := g.n.EnsureRateLimit(tx, 2*limit); err != nil {
		t.Fatal(err)
	}
	if show, sent := qdiscSent(t, g.ns, "eth0"); sent < sentBefore {
		t.Errorf("changing the limit replaced the qdisc (sent %d → %d):\n%s", sentBefore, sent, show)
	}
	out2 := throughput(t, g.guestNS, g.hostNS, g.hostAddr)
	t.Logf("limit %.0f Mbit/s: out of the VM %.2f Mbit/s", 2*limit/1e6, out2/1e6)
	if !within(out2, 2*limit, 0.15) {
		t.Errorf("throughput out of the VM %.2f Mbit/s, want %.0f ±15%%", out2/1e6, 2*limit/1e6)
	}

	for range 2 {
		if err := g.n.RemoveRateLimit(rx); err != nil {
			t.Fatal(err)
		}
		if err := g.n.EnsureRateLimit(tx, 0); err != nil { // 0 = unlimited
			t.Fatal(err)
		}
	}
	if now := g.tcShow(t) + testnet.Run(t, "tc", "-n", g.ns.Name, "qdisc", "show", "dev", "vm0"); now != defaults {
		t.Errorf("default qdiscs not restored:\n%s\n%s", defaults, now)
	}
	if _, ok, _ := g.n.RateLimit(tx); ok {
		t.Error("RateLimit reports a limit after removal")
	}
	in = throughput(t, g.hostNS, g.guestNS, g.vmAddr)
	out = throughput(t, g.guestNS, g.hostNS, g.hostAddr)
	t.Logf("unlimited: into the VM %.0f Mbit/s, out of it %.0f Mbit/s", in/1e6, out/1e6)
	if in < 5*limit || out < 5*limit {
		t.Errorf("after removal into %.2f / out of %.2f Mbit/s, want ≥ %.0f", in/1e6, out/1e6, 5*limit/1e6)
	}
}

func TestRateLimitLeavesForeignQdisc(t *testing.T) {
	s := newSandbox(t)
	// Kata's limiter, or an admin's: a root HTB with another handle.
	testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
	// Its packet counter aside: the kernel's own IPv6 packets (DAD, router
	// solicitations) may leave through it meanwhile.
	counter := regexp.MustCompile(`direct_packets_stat \d+`)
	show := func() string {
		return counter.ReplaceAllString(testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "show", "dev", "eth0"), "direct_packets_stat N")
	}
	before := show()
	err := s.n.EnsureRateLimit(s.eth0.Ifindex, 10e6)
	if !errors.Is(err, datapath.ErrQdiscNotOurs) || !regexp.MustCompile(`eth0`).MatchString(err.Error()) {
		t.Errorf("EnsureRateLimit over a foreign root qdisc = %v, want ErrQdiscNotOurs naming eth0", err)
	}
	if err := s.n.RemoveRateLimit(s.eth0.Ifindex); err != nil {
		t.Errorf("RemoveRateLimit with a foreign root qdisc = %v", err)
	}
	if after := show(); after != before {
		t.Errorf("foreign qdisc changed:\n%s\n%s", before, after)
	}
	if _, ok, err := s.n.RateLimit(s.eth0.Ifindex); ok || err != nil {
		t.Errorf("RateLimit = %v, %v; a foreign qdisc is no limit of ours", ok, err)
	}
	if err := s.n.RemoveRateLimit(999); err != nil {
		t.Errorf("RemoveRateLimit on a missing link = %v", err)
	}
}

// TestIngressLimitThroughIfb limits what eth0 receives (a tap link's
// frames from the VM, a macvtap's lower device's frames for it) through
// tsi<N>: only the stream into eth0 slows down, a new limit changes the
// ifb's class only, and removal leaves eth0's tc state and the netns as
// they were.
func TestIngressLimitThroughIfb(t *testing.T) {
	s := newSandbox(t)
	testnet.IP(t, "-n", s.ns.Name, "addr", "add", "10.79.0.2/24", "dev", "eth0")
	testnet.IP(t, "-n", s.host.Name, "addr", "add", "10.79.0.1/24", "dev", "host0")
	hostNS, err := datapath.Open(s.host.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hostNS.Close() })
	testnet.Run(t, "ip", "netns", "exec", s.host.Name, "ping", "-c", "1", "-W", "5", "10.79.0.2")
	before := testnet.IP(t, "-n", s.ns.Name, "-br", "link") + s.tcShow(t)

	const limit = 20e6
	for range 2 {
		if err := s.n.EnsureIngressLimit(s.eth0.Ifindex, 3, limit); err != nil {
			t.Fatal(err)
		}
	}
	st, err := s.n.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	want := []datapath.RateLimitOn{{Ifindex: s.eth0.Ifindex, Name: "eth0", BPS: limit, Ingress: true, Ifb: 3}}
	if !slices.Equal(st.RateLimits, want) {
		t.Errorf("observed limits %+v, want %+v", st.RateLimits, want)
	}
	if slices.ContainsFunc(st.Links, func(l datapath.Link) bool { return l.Name == "tsi3" }) {
		t.Errorf("tsi3 listed as a container link: %v", st.Links)
	}
	in := throughput(t, hostNS, s.n, "10.79.0.2")
	out := throughput(t, s.n, hostNS, "10.79.0.1")
	t.Logf("ingress limit %.0f Mbit/s: into eth0 %.2f Mbit/s, out of it %.0f Mbit/s", limit/1e6, in/1e6, out/1e6)
	if !within(in, limit, 0.15) || out < 5*limit {
		t.Errorf("ingress limit: into %.2f / out of %.2f Mbit/s, want %.0f ±15%% / ≥ %.0f", in/1e6, out/1e6, limit/1e6, 5*limit/1e6)
	}
	_, sentBefore := qdiscSent(t, s.ns, "tsi3")
	if err := s.n.EnsureIngressLimit(s.eth0.Ifindex, 3, 2*limit); err != nil {
		t.Fatal(err)
	}
	if show, sent := qdiscSent(t, s.ns, "tsi3"); sent < sentBefore {
		t.Errorf("changing the limit replaced the qdisc (sent %d → %d):\n%s", sentBefore, sent, show)
	}
	in = throughput(t, hostNS, s.n, "10.79.0.2")
	t.Logf("ingress limit %.0f Mbit/s: into eth0 %.2f Mbit/s", 2*limit/1e6, in/1e6)
	if !within(in, 2*limit, 0.15) {
		t.Errorf("into eth0 %.2f Mbit/s, want %.0f ±15%%", in/1e6, 2*limit/1e6)
	}

	for range 2 {
		if err := s.n.EnsureIngressLimit(s.eth0.Ifindex, 3, 0); err != nil {
			t.Fatal(err)
		}
	}
	// The ingress qdisc that carried the filter stays (a hook someone
	// else may use too); the filter and the ifb go.
	after := testnet.IP(t, "-n", s.ns.Name, "-br", "link") + testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "show", "dev", "eth0", "ingress")
	if strings.Contains(after, "tsi3") || strings.Contains(after, "mirred") {
		t.Errorf("left behind:\n%s\nbefore:\n%s", after, before)
	}
	in = throughput(t, hostNS, s.n, "10.79.0.2")
	t.Logf("unlimited: into eth0 %.0f Mbit/s", in/1e6)
	if in < 5*limit {
		t.Errorf("after removal into eth0 %.2f Mbit/s, want ≥ %.0f", in/1e6, 5*limit/1e6)
	}
	// A crash between making the ifb and redirecting to it leaves an ifb
	// no link feeds: observed as such, and removable without a link.
	testnet.IP(t, "-n", s.ns.Name, "link", "add", "tsi4", "type", "ifb")
	if st, err = s.n.Observe(datapath.All); err != nil || !slices.Equal(st.RateLimits, []datapath.RateLimitOn{{Ingress: true, Ifb: 4}}) {
		t.Errorf("observed %+v, %v; want tsi4 fed by nothing", st.RateLimits, err)
	}
	for range 2 {
		if err := s.n.RemoveIngressLimit(0, 4); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.n.RemoveIngressLimit(999, 5); err != nil {
		t.Errorf("RemoveIngressLimit of a missing link and ifb = %v", err)
	}
}

// An ingress limit moved to another endpoint's ifb finds our filter on
// eth0 pointing at the first one and replaces it: eth0 keeps one filter
// of ours, at the new ifb, and the first ifb is fed by nothing.
func TestIngressLimitMovesToAnotherIfb(t *testing.T) {
	s := newSandbox(t)
	const limit = 20e6
	for _, ifb := range []int{3, 4, 4} {
		if err := s.n.EnsureIngressLimit(s.eth0.Ifindex, ifb, limit); err != nil {
			t.Fatalf("EnsureIngressLimit via tsi%d: %v", ifb, err)
		}
	}
	st, err := s.n.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	want := []datapath.RateLimitOn{
		{BPS: limit, Ingress: true, Ifb: 3},
		{Ifindex: s.eth0.Ifindex, Name: "eth0", BPS: limit, Ingress: true, Ifb: 4},
	}
	if !slices.Equal(st.RateLimits, want) {
		t.Errorf("observed limits %+v, want %+v", st.RateLimits, want)
	}
	out := testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "show", "dev", "eth0", "ingress")
	if n := strings.Count(out, "Egress Redirect to device"); n != 1 || !strings.Contains(out, "device tsi4") {
		t.Errorf("eth0's ingress filters, want one redirect, to tsi4:\n%s", out)
	}
}
