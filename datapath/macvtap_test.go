package datapath_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

func TestMacvtapName(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    int
		ok   bool
	}{
		{"tsm0", 0, true}, {"tsm42", 42, true}, {"tsm", 0, false}, {"tsm01", 0, false},
		{"tsn0", 0, false}, {"tap0_kata", 0, false},
	} {
		n, ok := datapath.ParseMacvtapName(tc.name)
		if n != tc.n || ok != tc.ok {
			t.Errorf("ParseMacvtapName(%q) = %d, %v; want %d, %v", tc.name, n, ok, tc.n, tc.ok)
		}
		if _, tap := datapath.ParseTapName(tc.name); ok && tap {
			t.Errorf("%q parses as both a tap and a macvtap name", tc.name)
		}
		if ok && datapath.MacvtapName(n) != tc.name {
			t.Errorf("MacvtapName(%d) = %q", n, datapath.MacvtapName(n))
		}
	}
}

func TestHostMAC(t *testing.T) {
	a := datapath.HostMAC(containerMAC, 0)
	if !bytes.Equal(a, datapath.HostMAC(containerMAC, 0)) {
		t.Error("HostMAC is not deterministic")
	}
	if a[0]&1 != 0 || a[0]&2 == 0 || bytes.Equal(a, containerMAC) {
		t.Errorf("HostMAC = %s: want a locally administered unicast MAC other than the guest's", a)
	}
	other := net.HardwareAddr{0x02, 0x54, 0x53, 0x00, 0x01, 0x03}
	if bytes.Equal(a, datapath.HostMAC(containerMAC, 1)) || bytes.Equal(a, datapath.HostMAC(other, 0)) {
		t.Error("HostMAC collides across indexes or guest MACs")
	}
}

// macvtapSandbox is a sandbox whose eth0 has addresses and routes, as a
// CNI leaves it, with host0 reachable at .1.
func macvtapSandbox(t *testing.T) *sandbox {
	s := newSandbox(t)
	testnet.IP(t, "-n", s.ns.Name, "addr", "add", "10.77.0.2/24", "dev", "eth0")
	testnet.IP(t, "-n", s.ns.Name, "addr", "add", "fd77::2/64", "dev", "eth0", "nodad")
	testnet.IP(t, "-n", s.ns.Name, "route", "add", "default", "via", "10.77.0.1")
	testnet.IP(t, "-n", s.ns.Name, "route", "add", "10.99.0.0/16", "via", "10.77.0.1", "src", "10.77.0.2")
	testnet.IP(t, "-n", s.ns.Name, "-6", "route", "add", "default", "via", "fd77::1")
	testnet.IP(t, "-n", s.host.Name, "addr", "add", "10.77.0.1/24", "dev", "host0")
	s.eth0 = s.link(t, "eth0")
	return s
}

func (s *sandbox) routesOf(t *testing.T, ifindex int) []datapath.Route {
	t.Helper()
	rs, err := s.n.Routes()
	if err != nil {
		t.Fatal(err)
	}
	return slices.DeleteFunc(rs, func(r datapath.Route) bool { return r.LinkIndex != ifindex })
}

func prefixes(as []datapath.MovedAddr) []netip.Prefix {
	out := make([]netip.Prefix, len(as))
	for i, a := range as {
		out[i] = a.Prefix
	}
	return out
}

func sameSet[T comparable](a, b []T) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(x T) bool { return !slices.Contains(b, x) })
}

// hostSide opens the host netns and returns it with host0.
func (s *sandbox) hostSide(t *testing.T) (*datapath.Netns, datapath.Link) {
	t.Helper()
	host, err := datapath.Open(s.host.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Close() })
	links, err := host.ContainerLinks()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if l.Name == "host0" {
			return host, l
		}
	}
	t.Fatalf("no host0 in %v", links)
	return nil, datapath.Link{}
}

func unicast(dst, src net.HardwareAddr, marker string) []byte {
	f := append(slices.Clone(dst), src...)
	f = append(f, etherType>>8, etherType&0xff)
	return append(f, []byte(marker)...)
}

// crossFrames proves that q is guest MAC's NIC on host0's wire: a frame
// host0 sends to guest reaches one of q's queues, and a frame written to
// each queue reaches host0.
func crossFrames(t *testing.T, s *sandbox, q *datapath.Queues, guest net.HardwareAddr) {
	t.Helper()
	host, host0 := s.hostSide(t)
	sock := packetSocket(t, host, host0.Ifindex)
	out := unicast(guest, host0.MAC, "tapsync-to-guest-"+guest.String())
	if err := unix.Sendto(sock, out, 0, &unix.SockaddrLinklayer{Protocol: htons(etherType), Ifindex: host0.Ifindex, Halen: 6,
		Addr: [8]byte(append(slices.Clone(guest), 0, 0))}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	deadline := time.Now().Add(5 * time.Second)
	seen := 0
	for found := false; !found; {
		if time.Now().After(deadline) {
			t.Fatalf("no frame from host0 to %s reached any of %d queues (saw %d others)\n%s\n%s", guest, len(q.Tap), seen,
				testnet.IP(t, "-n", s.ns.Name, "-s", "link", "show"), testnet.IP(t, "-n", s.host.Name, "-s", "link", "show"))
		}
		for _, f := range q.Tap {
			f.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			n, err := f.Read(buf)
			if err != nil {
				continue
			}
			if n > vnetHdrLen && bytes.Equal(buf[vnetHdrLen:n], out) {
				found = true
				break
			}
			seen++
		}
	}
	for i, f := range q.Tap {
		in := unicast(host0.MAC, guest, "tapsync-from-guest-"+string(rune('a'+i)))
		if _, err := f.Write(append(make([]byte, vnetHdrLen), in...)); err != nil {
			t.Fatalf("write to queue %d: %v", i, err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			n, _, err := unix.Recvfrom(sock, buf, 0)
			if err == nil && bytes.Equal(buf[:n], in) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no frame from queue %d reached host0 (last error %v)", i, err)
			}
		}
	}
}

func TestMacvtapModel(t *testing.T) {
	for _, tc := range []struct {
		name   string
		queues int
		hide   bool // no devtmpfs node: the private node path
	}{
		{"single-devtmpfs", 1, false},
		{"multi-private-node", 3, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.hide {
				datapath.DevDir = t.TempDir()
				t.Cleanup(func() { datapath.DevDir = "/dev" })
			}
			testMacvtapModel(t, tc.queues)
		})
	}
}

func testMacvtapModel(t *testing.T, queues int) {
	s := macvtapSandbox(t)
	ctx := context.Background()
	before := s.eth0
	beforeRoutes := s.routesOf(t, before.Ifindex)
	if len(before.Addrs) < 3 || len(beforeRoutes) != 3 {
		t.Fatalf("setup: eth0 addrs %v routes %v", before.Addrs, beforeRoutes)
	}
	spec := datapath.MacvtapSpec{Index: 4, Container: before.Ifindex, MAC: before.MAC, Queues: queues}
	m, moved, err := s.n.EnsureMacvtap(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "tsm4" || m.Index != 4 || !bytes.Equal(m.MAC, containerMAC) || m.Parent != before.Ifindex || m.Mode != "bridge" || !m.Up || m.MTU != before.MTU {
		t.Errorf("macvtap = %+v, want tsm4 in bridge mode on eth0 with %s, up, mtu %d", m, containerMAC, before.MTU)
	}
	eth0 := s.link(t, "eth0")
	if !bytes.Equal(eth0.MAC, datapath.HostMAC(containerMAC, 4)) || len(eth0.Addrs) != 0 {
		t.Errorf("eth0 after EnsureMacvtap = %s %v, want %s and no addresses", eth0.MAC, eth0.Addrs, datapath.HostMAC(containerMAC, 4))
	}
	if !bytes.Equal(moved.MAC, containerMAC) || !sameSet(prefixes(moved.Addrs), before.Addrs) {
		t.Errorf("moved = %+v, want MAC %s and addresses %v", moved, containerMAC, before.Addrs)
	}
	// Every route through eth0 is reported; the IPv4 ones went with its
	// addresses.
	var movedRoutes []datapath.Route
	for _, r := range moved.Routes {
		if rt, ok := r.Route(); ok {
			movedRoutes = append(movedRoutes, rt)
		}
	}
	left := s.routesOf(t, before.Ifindex)
	if !sameSet(movedRoutes, beforeRoutes) || slices.ContainsFunc(left, func(r datapath.Route) bool { return !r.IPv6 }) {
		t.Errorf("moved routes %v; before %v, left %v", movedRoutes, beforeRoutes, left)
	}

	// Again: nothing changes, nothing more is reported moved.
	links := testnet.IP(t, "-n", s.ns.Name, "-d", "-o", "link", "show")
	m2, moved2, err := s.n.EnsureMacvtap(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	m.OperState, m2.OperState = "", ""
	if !slices.Equal(m.MAC, m2.MAC) || m.Ifindex != m2.Ifindex || len(moved2.Addrs) != 0 || len(moved2.Routes) != 0 {
		t.Errorf("second EnsureMacvtap: %+v %+v", m2, moved2)
	}
	if again := testnet.IP(t, "-n", s.ns.Name, "-d", "-o", "link", "show"); stripState(again) != stripState(links) {
		t.Errorf("second EnsureMacvtap changed links:\n%s\n%s", links, again)
	}
	// tsm4 is ours: not a container link, listed by Observe.
	st, err := s.n.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(st.Links, func(l datapath.Link) bool { return l.Name == "tsm4" }) ||
		len(st.Macvtaps) != 1 || st.Macvtaps[0].Name != "tsm4" {
		t.Errorf("observe: links %v, macvtaps %v", st.Links, st.Macvtaps)
	}
	// A wrong spec is refused, not applied.
	bad := spec
	bad.MAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 9}
	if _, _, err := s.n.EnsureMacvtap(ctx, bad); !errors.Is(err, datapath.ErrMacvtapMismatch) || !strings.Contains(err.Error(), "tsm4") {
		t.Errorf("EnsureMacvtap with another MAC = %v, want ErrMacvtapMismatch naming tsm4", err)
	}

	q, err := s.n.OpenMacvtapQueues(ctx, spec, datapath.VhostAuto)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(q.Close)
	if len(q.Tap) != queues {
		t.Fatalf("%d queue fds, want %d", len(q.Tap), queues)
	}
	crossFrames(t, s, q, containerMAC)
	// No node of ours is left anywhere.
	if ents, _ := os.ReadDir(datapath.DevDir); datapath.DevDir != "/dev" && len(ents) != 0 {
		t.Errorf("nodes left in %s: %v", datapath.DevDir, ents)
	}
	q.Close()

	for i := range 2 {
		if err := s.n.RemoveMacvtap(4); err != nil {
			t.Fatalf("RemoveMacvtap #%d: %v", i+1, err)
		}
		if err := s.n.RestoreContainerLink(before.Ifindex, moved); err != nil {
			t.Fatalf("RestoreContainerLink #%d: %v", i+1, err)
		}
	}
	after := s.link(t, "eth0")
	if !bytes.Equal(after.MAC, containerMAC) || !sameSet(after.Addrs, before.Addrs) {
		t.Errorf("restored eth0 = %s %v, want %s %v", after.MAC, after.Addrs, containerMAC, before.Addrs)
	}
	if got := s.routesOf(t, before.Ifindex); !sameSet(got, beforeRoutes) {
		t.Errorf("restored routes %v, want %v", got, beforeRoutes)
	}
	if ms, _ := s.n.Macvtaps(); len(ms) != 0 {
		t.Errorf("macvtaps after removal: %v", ms)
	}
	// The restored link works: host0 pings the container's address.
	testnet.Run(t, "ip", "netns", "exec", s.host.Name, "ping", "-c", "1", "-W", "5", "10.77.0.2")
}

// stripState drops operational state, which the kernel settles on its
// own schedule.
func stripState(s string) string {
	for _, st := range []string{"state UP", "state DOWN", "state UNKNOWN", "state LOWERLAYERDOWN", "LOWER_UP,", "M-DOWN,", ",LOWER_UP", ",M-DOWN"} {
		s = strings.ReplaceAll(s, st, "")
	}
	return s
}

// TestRestoreAfterLinkFlap: the kernel gives a flapped link a link-local
// address from the borrowed MAC; restoring removes it.
func TestRestoreAfterLinkFlap(t *testing.T) {
	s := macvtapSandbox(t)
	before := s.eth0
	_, moved, err := s.n.EnsureMacvtap(context.Background(), datapath.MacvtapSpec{Index: 0, Container: before.Ifindex, MAC: before.MAC, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "-n", s.ns.Name, "link", "set", "eth0", "down")
	testnet.IP(t, "-n", s.ns.Name, "link", "set", "eth0", "up")
	deadline := time.Now().Add(5 * time.Second)
	for len(s.link(t, "eth0").Addrs) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the kernel gave the flapped eth0 no link-local address")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := s.n.RemoveMacvtap(0); err != nil {
		t.Fatal(err)
	}
	if err := s.n.RestoreContainerLink(before.Ifindex, moved); err != nil {
		t.Fatal(err)
	}
	if after := s.link(t, "eth0"); !sameSet(after.Addrs, before.Addrs) {
		t.Errorf("restored addresses %v, want %v", after.Addrs, before.Addrs)
	}
}

// TestMacvtapLinkQueues opens a macvtap that a CNI made. A macvtap of the
// same ifindex in another netns owns the devtmpfs name /dev/tap<ifindex>:
// the queues must still reach the sandbox's macvtap.
func TestMacvtapLinkQueues(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	mac := net.HardwareAddr{0x02, 0x54, 0x53, 0x00, 0x0a, 0x0b}
	testnet.IP(t, "-n", s.host.Name, "link", "add", "link", "host0", "name", "decoy", "index", "77", "type", "macvtap", "mode", "bridge")
	testnet.IP(t, "-n", s.ns.Name, "link", "add", "link", "eth0", "name", "net1", "index", "77", "address", mac.String(), "type", "macvtap", "mode", "bridge")
	testnet.IP(t, "-n", s.ns.Name, "link", "set", "net1", "up")
	if l := s.link(t, "net1"); l.Kind != "macvtap" {
		t.Fatalf("net1 = %+v, want a container link of kind macvtap", l)
	}
	if _, err := s.n.OpenMacvtapLinkQueues(ctx, "eth0", 1, datapath.VhostOff); !errors.Is(err, datapath.ErrMacvtapMismatch) {
		t.Errorf("OpenMacvtapLinkQueues(eth0) = %v, want ErrMacvtapMismatch", err)
	}
	q, err := s.n.OpenMacvtapLinkQueues(ctx, "net1", 2, datapath.VhostAuto)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(q.Close)
	crossFrames(t, s, q, mac)
	q.Close()
	if l := s.link(t, "net1"); !bytes.Equal(l.MAC, mac) {
		t.Errorf("net1 changed: %+v", l)
	}
}

func TestOpenTapLink(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	// The tap plugin's shape: a tap the VM uses directly, joined to the
	// outside by a bridge (here: a bridge with eth0).
	testnet.IP(t, "-n", s.ns.Name, "link", "add", "br0", "type", "bridge")
	testnet.IP(t, "-n", s.ns.Name, "link", "set", "eth0", "master", "br0")
	testnet.IP(t, "-n", s.ns.Name, "link", "set", "br0", "up")
	testnet.IP(t, "-n", s.ns.Name, "tuntap", "add", "dev", "tap9", "mode", "tap", "vnet_hdr")
	testnet.IP(t, "-n", s.ns.Name, "tuntap", "add", "dev", "mq9", "mode", "tap", "vnet_hdr", "multi_queue")
	testnet.IP(t, "-n", s.ns.Name, "tuntap", "add", "dev", "pi9", "mode", "tap", "pi")
	for _, name := range []string{"tap9", "mq9"} {
		testnet.IP(t, "-n", s.ns.Name, "link", "set", name, "master", "br0", "up")
	}
	for _, tc := range []struct {
		name   string
		queues int
		mq     bool
		guest  net.HardwareAddr
	}{
		{"tap9", 1, false, net.HardwareAddr{0x02, 0x54, 0x53, 0, 9, 1}},
		{"mq9", 4, true, net.HardwareAddr{0x02, 0x54, 0x53, 0, 9, 2}},
	} {
		before := testnet.IP(t, "-n", s.ns.Name, "-d", "-o", "link", "show", tc.name)
		tl, q, err := s.n.OpenTapLink(ctx, tc.name, tc.queues, datapath.VhostAuto)
		if err != nil {
			t.Fatal(err)
		}
		if tl.MultiQueue != tc.mq || !tl.VnetHdr || !tl.Persistent || len(q.Tap) != tc.queues {
			t.Errorf("%s: %+v with %d queues", tc.name, tl, len(q.Tap))
		}
		// Unknown to the bridge, the guest's MAC is flooded to every port.
		crossFrames(t, s, q, tc.guest)
		q.Close()
		if after := testnet.IP(t, "-n", s.ns.Name, "-d", "-o", "link", "show", tc.name); stripState(after) != stripState(before) {
			t.Errorf("%s changed:\n%s\n%s", tc.name, before, after)
		}
	}
	if _, _, err := s.n.OpenTapLink(ctx, "tap9", 2, datapath.VhostOff); !errors.Is(err, datapath.ErrTapMismatch) {
		t.Errorf("two queues of a single-queue tap = %v, want ErrTapMismatch", err)
	}
	if _, _, err := s.n.OpenTapLink(ctx, "pi9", 1, datapath.VhostOff); !errors.Is(err, datapath.ErrTapMismatch) {
		t.Errorf("tap with packet information = %v, want ErrTapMismatch", err)
	}
	if _, _, err := s.n.OpenTapLink(ctx, "gone9", 1, datapath.VhostOff); err == nil || !strings.Contains(err.Error(), "gone9") {
		t.Errorf("missing tap = %v, want an error naming gone9", err)
	}
	if links := testnet.IP(t, "-n", s.ns.Name, "-o", "link", "show"); strings.Contains(links, "gone9") {
		t.Error("OpenTapLink created a tap")
	}
}
