package testagent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/e2e/testagent/control"
	"github.com/tapsync/tapsync/e2e/testnet"
)

const callTimeout = 10 * time.Second

// guest is a throwaway netns standing in for the guest, with the agent
// serving it on a unix socket, and a netlink handle of the test's own to
// check the kernel independently of the agent.
type guest struct {
	ns   testnet.NS
	srv  *Server
	nl   *netlink.Handle
	path string
}

func newGuest(t *testing.T) *guest {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	g := &guest{ns: testnet.NewNS(t, "tsagent")}
	h, err := netns.GetFromPath(g.ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	if g.srv, err = NewServerAt(h); err != nil {
		t.Fatal(err)
	}
	if g.nl, err = netlink.NewHandleAt(h); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.nl.Close)
	g.path = filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", g.path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- g.srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		g.srv.Close()
	})
	return g
}

func (g *guest) dial(t *testing.T) *agent.Client {
	t.Helper()
	c, err := agent.Dial(context.Background(), agent.URL{Scheme: agent.SchemeUnix, Path: g.path}, callTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// globalAddrs drops the link-local addresses the kernel adds by itself.
func globalAddrs(ps []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if !p.Addr().IsLinkLocalUnicast() {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// kernelAddrs reads the link's addresses with the test's own handle.
func (g *guest) kernelAddrs(t *testing.T, link netlink.Link) []netip.Prefix {
	t.Helper()
	as, err := g.nl.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Prefix
	for _, a := range as {
		ip, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		out = append(out, netip.PrefixFrom(ip.Unmap(), ones))
	}
	return globalAddrs(out)
}

func TestUpdateInterface(t *testing.T) {
	g := newGuest(t)
	peer := testnet.NewNS(t, "tspeer")
	m := mac("02:00:5e:00:10:01")
	testnet.Veth(t, g.ns, "veth0", m, peer, "peer0")
	c := g.dial(t)
	ctx := context.Background()

	want := agent.Interface{
		Name:  "eth7",
		MAC:   m,
		Addrs: prefixes("10.1.0.5/24", "fd00:1::5/64"),
		MTU:   1400,
		NoARP: true,
	}
	for i := range 2 { // the second time changes nothing and still succeeds
		got, err := c.UpdateInterface(ctx, want)
		if err != nil {
			t.Fatalf("UpdateInterface #%d: %v", i+1, err)
		}
		if got.Name != "eth7" || got.MTU != 1400 || !got.NoARP || got.MAC.String() != m.String() {
			t.Errorf("UpdateInterface #%d answered %+v", i+1, got)
		}
		if a := globalAddrs(got.Addrs); !slices.Equal(a, want.Addrs) {
			t.Errorf("UpdateInterface #%d answered addresses %v, want %v", i+1, a, want.Addrs)
		}
	}

	link, err := g.nl.LinkByName("eth7")
	if err != nil {
		t.Fatalf("renamed link not in the kernel: %v", err)
	}
	la := link.Attrs()
	if la.MTU != 1400 || la.Flags&net.FlagUp == 0 || la.RawFlags&0x80 == 0 || la.HardwareAddr.String() != m.String() {
		t.Errorf("kernel link: mtu %d flags %v raw %#x mac %s", la.MTU, la.Flags, la.RawFlags, la.HardwareAddr)
	}
	if a := g.kernelAddrs(t, link); !slices.Equal(a, want.Addrs) {
		t.Errorf("kernel addresses %v, want %v", a, want.Addrs)
	}

	// Replace semantics: addresses not asked for go; ARP comes back on.
	want.Addrs = prefixes("10.1.0.6/24")
	want.NoARP = false
	if _, err := c.UpdateInterface(ctx, want); err != nil {
		t.Fatal(err)
	}
	link, _ = g.nl.LinkByName("eth7")
	if a := g.kernelAddrs(t, link); !slices.Equal(a, want.Addrs) {
		t.Errorf("after replace: kernel addresses %v, want %v", a, want.Addrs)
	}
	if link.Attrs().RawFlags&0x80 != 0 {
		t.Error("NOARP still set")
	}

	list, err := c.ListInterfaces(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, i := range list {
		names = append(names, i.Name)
		if i.Name == "eth7" && (i.MTU != 1400 || !slices.Equal(globalAddrs(i.Addrs), want.Addrs)) {
			t.Errorf("ListInterfaces: %+v", i)
		}
	}
	if !slices.Equal(names, []string{"eth7"}) {
		t.Errorf("ListInterfaces names %v, want [eth7] (no loopback)", names)
	}

	if n := g.srv.Calls(MethodUpdateInterface); n != 3 {
		t.Errorf("UpdateInterface counted %d times, want 3", n)
	}
	before := g.srv.MutatingCalls()
	if _, err := c.ListRoutes(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	if after := g.srv.MutatingCalls(); after != before {
		t.Errorf("reads counted as mutating calls: %d → %d", before, after)
	}
}

func TestLinkNotFound(t *testing.T) {
	g := newGuest(t)
	c := g.dial(t)
	_, err := c.UpdateInterface(context.Background(), agent.Interface{Name: "eth1", MAC: mac("02:00:5e:00:10:99")})
	if !errors.Is(err, agent.ErrLinkNotFound) {
		t.Fatalf("unknown MAC: err = %v, want agent.ErrLinkNotFound", err)
	}
}

// TestWaitForDevice: with a devicePath the agent waits for the link to
// appear (a NIC being hot-plugged) instead of failing at once; its
// timeline has the call's steps in order: received, the link's
// RTM_NEWLINK, the link found, done.
func TestWaitForDevice(t *testing.T) {
	g := newGuest(t)
	tl := NewTimeline()
	g.srv.SetTimeline(tl)
	peer := testnet.NewNS(t, "tspeer")
	c := g.dial(t)
	m := mac("02:00:5e:00:10:02")
	done := make(chan error, 1)
	go func() {
		_, err := c.UpdateInterface(context.Background(), agent.Interface{Name: "eth2", MAC: m, DevicePath: "02/1f", Addrs: prefixes("10.3.0.2/24")})
		done <- err
	}()
	// Add the link only once the agent has recorded the call (its count
	// goes up before that).
	received := func() bool {
		return slices.ContainsFunc(tl.Since(0).Events, func(e control.Event) bool { return e.Kind == control.EventUpdateInterface })
	}
	deadline := time.Now().Add(callTimeout)
	for !received() {
		if time.Now().After(deadline) {
			t.Fatal("the agent never got the call")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Not testnet.Veth: the agent renames the link the moment it
	// appears, before a later "ip link set veth1 up" could find it.
	testnet.IP(t, "-n", g.ns.Name, "link", "add", "veth1", "address", m.String(), "type", "veth", "peer", "name", "peer1", "netns", peer.Name)
	if err := <-done; err != nil {
		t.Fatalf("UpdateInterface with a device path: %v", err)
	}
	if _, err := g.nl.LinkByName("eth2"); err != nil {
		t.Errorf("link not renamed: %v", err)
	}
	// The order of the call's steps; link events (the rename among them)
	// may come in between.
	want := []string{control.EventUpdateInterface, control.EventNewLink, control.EventInterfaceLinkFound, control.EventUpdateInterfaceDone}
	var got []string
	for _, e := range tl.Since(0).Events {
		if e.MAC != m.String() {
			continue
		}
		if len(got) < len(want) && e.Kind == want[len(got)] {
			got = append(got, e.Kind)
		}
		if e.Kind == control.EventUpdateInterfaceDone && !strings.Contains(e.Detail, "10.3.0.2/24") {
			t.Errorf("done event %q: want the address set", e.Detail)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("timeline of the call: %v in order, want %v; all: %+v", got, want, tl.Since(0).Events)
	}
}

// TestTimelineSince: events come back after a sequence number, oldest
// first; what the bound pushed out is counted as dropped.
func TestTimelineSince(t *testing.T) {
	tl := NewTimeline()
	for i := range timelineCap + 10 {
		tl.Record("k", "", strconv.Itoa(i))
	}
	all := tl.Since(0)
	if len(all.Events) != timelineCap || all.Dropped != 10 || all.Events[0].Detail != "10" {
		t.Fatalf("Since(0): %d events from %q, %d dropped; want %d from \"10\", 10 dropped", len(all.Events), all.Events[0].Detail, all.Dropped, timelineCap)
	}
	last := all.Events[len(all.Events)-1].Seq
	if r := tl.Since(last - 2); len(r.Events) != 2 || r.Dropped != 0 || r.Events[0].Seq != last-1 {
		t.Errorf("Since(last-2) = %+v, want the last two", r)
	}
	if r := tl.Since(last); len(r.Events) != 0 {
		t.Errorf("Since(last) = %+v, want nothing", r)
	}
	var none *Timeline
	none.Record("k", "", "") // a nil timeline records nothing
	if r := none.Since(0); len(r.Events) != 0 {
		t.Errorf("nil timeline: %+v", r)
	}
}

func TestRoutesAndNeighbors(t *testing.T) {
	g := newGuest(t)
	peer := testnet.NewNS(t, "tspeer")
	m := mac("02:00:5e:00:10:03")
	testnet.Veth(t, g.ns, "veth0", m, peer, "peer0")
	c := g.dial(t)
	ctx := context.Background()
	if _, err := c.UpdateInterface(ctx, agent.Interface{Name: "eth0", MAC: m, Addrs: prefixes("10.1.0.5/24", "fd00:1::5/64")}); err != nil {
		t.Fatal(err)
	}
	want := []agent.Route{
		{Gateway: netip.MustParseAddr("10.1.0.1"), Device: "eth0"},
		{Dest: netip.MustParsePrefix("10.2.0.0/16"), Gateway: netip.MustParseAddr("10.1.0.1"), Device: "eth0"},
		{Gateway: netip.MustParseAddr("fd00:1::1"), Device: "eth0", IPv6: true},
	}
	for i := range 2 { // replace: the second time is no error
		got, err := c.UpdateRoutes(ctx, want)
		if err != nil {
			t.Fatalf("UpdateRoutes #%d: %v", i+1, err)
		}
		for _, r := range want {
			if !slices.Contains(got, r) {
				t.Errorf("UpdateRoutes #%d answer lacks %v: %v", i+1, r, got)
			}
		}
	}
	listed, err := c.ListRoutes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range want {
		if !slices.Contains(listed, r) {
			t.Errorf("ListRoutes lacks %v: %v", r, listed)
		}
	}
	// The kernel agrees, read without the agent.
	rs, err := g.nl.RouteGet(net.ParseIP("10.2.3.4"))
	if err != nil || len(rs) == 0 || !rs[0].Gw.Equal(net.ParseIP("10.1.0.1")) {
		t.Errorf("route to 10.2.3.4: %v, %v", rs, err)
	}

	n := agent.Neighbor{IP: netip.MustParseAddr("10.1.0.9"), MAC: mac("02:00:5e:00:10:09"), Device: "eth0", State: netlink.NUD_PERMANENT}
	for range 2 {
		if err := c.AddARPNeighbors(ctx, []agent.Neighbor{n}); err != nil {
			t.Fatal(err)
		}
	}
	link, _ := g.nl.LinkByName("eth0")
	neighs, err := g.nl.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range neighs {
		if e.IP.Equal(net.ParseIP("10.1.0.9")) && e.HardwareAddr.String() == n.MAC.String() && e.State == netlink.NUD_PERMANENT {
			found = true
		}
	}
	if !found {
		t.Errorf("neighbour not in the kernel: %v", neighs)
	}

	// Configured again, as Kata's agent does it (the up link taken down
	// first), the interface loses its routes and neighbours.
	if _, err := c.UpdateInterface(ctx, agent.Interface{Name: "eth0", MAC: m, Addrs: prefixes("10.1.0.5/24", "fd00:1::5/64")}); err != nil {
		t.Fatal(err)
	}
	if listed, err = c.ListRoutes(ctx); err != nil {
		t.Fatal(err)
	}
	for _, r := range want {
		if slices.Contains(listed, r) {
			t.Errorf("after the interface was configured again, ListRoutes still has %v", r)
		}
	}
	if neighs, err = g.nl.NeighList(link.Attrs().Index, netlink.FAMILY_V4); err != nil {
		t.Fatal(err)
	}
	for _, e := range neighs {
		if e.IP.Equal(net.ParseIP("10.1.0.9")) {
			t.Errorf("after the interface was configured again, the kernel still has neighbour %v", e)
		}
	}
}

// TestServeConn serves one open stream at a time, again and again, as the
// guest does on a virtio-serial port.
func TestServeConn(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	srv, err := NewServer()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	path := filepath.Join(t.TempDir(), "port.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := range 3 {
		served := make(chan error, 1)
		go func() {
			conn, err := l.Accept()
			if err != nil {
				served <- err
				return
			}
			served <- srv.ServeConn(context.Background(), conn)
		}()
		c, err := agent.Dial(context.Background(), agent.URL{Scheme: agent.SchemeUnix, Path: path}, callTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Check(context.Background()); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		c.Close()
		select {
		case err := <-served:
			if err != nil {
				t.Fatalf("ServeConn %d: %v", i, err)
			}
		case <-time.After(callTimeout):
			t.Fatalf("ServeConn %d did not return after the peer hung up", i)
		}
	}
	if n := srv.Calls(MethodCheck); n != 3 {
		t.Errorf("Check counted %d times, want 3", n)
	}
}
