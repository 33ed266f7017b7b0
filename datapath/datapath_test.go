package datapath_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

func TestTapName(t *testing.T) {
	for _, tc := range []struct {
		name     string
		n        int
		ok, kata bool
	}{
		{"tsn0", 0, true, false},
		{"tsn17", 17, true, false},
		{"tsn", 0, false, false},
		{"tsn01", 0, false, false},
		{"tsn-1", 0, false, false},
		{"tsn+1", 0, false, false},
		{"tsn1x", 0, false, false},
		{"eth0", 0, false, false},
		// Kata's names are Kata's, never ours.
		{"tap0_kata", 0, true, true},
		{"tap17_kata", 17, true, true},
		{"tap_kata", 0, false, true},
		{"tap01_kata", 0, false, true},
		{"tap-1_kata", 0, false, true},
		{"tap1_katax", 0, false, true},
		{"tapx_kata", 0, false, true},
	} {
		parse, name := datapath.ParseTapName, datapath.TapName
		if tc.kata {
			if _, ours := datapath.ParseTapName(tc.name); ours {
				t.Errorf("ParseTapName(%q) claims Kata's name as ours", tc.name)
			}
			parse, name = datapath.ParseKataTapName, func(n int) string { return fmt.Sprintf("tap%d_kata", n) }
		} else if _, kata := datapath.ParseKataTapName(tc.name); kata {
			t.Errorf("ParseKataTapName(%q) claims our name as Kata's", tc.name)
		}
		n, ok := parse(tc.name)
		if n != tc.n || ok != tc.ok {
			t.Errorf("parse(%q) = %d, %v; want %d, %v", tc.name, n, ok, tc.n, tc.ok)
		}
		if ok && name(n) != tc.name {
			t.Errorf("name(%d) = %q, want %q", n, name(n), tc.name)
		}
	}
	// Any index fits IFNAMSIZ with room for the terminating NUL.
	if n := len(datapath.TapName(999_999_999_999)); n > unix.IFNAMSIZ-1 {
		t.Errorf("TapName of a 12-digit index is %d bytes", n)
	}
}

// ParseEndpointName knows every name an endpoint's devices take, and no
// other.
func TestParseEndpointName(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    int
		ok   bool
	}{
		{"tsn3", 3, true}, {"tsm4", 4, true}, {"tsi5", 5, true},
		{"tsx1", 0, false}, {"tsn01", 0, false}, {"tap0_kata", 0, false}, {"eth0", 0, false},
	} {
		if n, ok := datapath.ParseEndpointName(tc.name); n != tc.n || ok != tc.ok {
			t.Errorf("ParseEndpointName(%q) = %d, %v; want %d, %v", tc.name, n, ok, tc.n, tc.ok)
		}
	}
	for _, name := range []func(int) string{datapath.TapName, datapath.MacvtapName, datapath.IfbName} {
		if n, ok := datapath.ParseEndpointName(name(7)); !ok || n != 7 {
			t.Errorf("ParseEndpointName(%q) = %d, %v; want 7, true", name(7), n, ok)
		}
	}
}

// sandbox is a throwaway sandbox netns with a veth eth0 whose peer host0
// lives in a second netns standing in for the node.
type sandbox struct {
	ns, host testnet.NS
	n        *datapath.Netns
	eth0     datapath.Link
}

var containerMAC = net.HardwareAddr{0x02, 0x54, 0x53, 0x00, 0x01, 0x02}

func newSandbox(t *testing.T) *sandbox {
	t.Helper()
	s := &sandbox{ns: testnet.NewNS(t, "tapsync-dp"), host: testnet.NewNS(t, "tapsync-dphost")}
	testnet.Veth(t, s.ns, "eth0", containerMAC, s.host, "host0")
	n, err := datapath.Open(s.ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	s.n = n
	s.eth0 = s.link(t, "eth0")
	return s
}

func (s *sandbox) link(t *testing.T, name string) datapath.Link {
	t.Helper()
	links, err := s.n.ContainerLinks()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if l.Name == name {
			return l
		}
	}
	t.Fatalf("no container link %s in %v", name, links)
	return datapath.Link{}
}

func (s *sandbox) tap(t *testing.T, index int) datapath.Tap {
	t.Helper()
	taps, err := s.n.Taps()
	if err != nil {
		t.Fatal(err)
	}
	for _, tp := range taps {
		if tp.Index == index {
			return tp
		}
	}
	t.Fatalf("no tap %d in %v", index, taps)
	return datapath.Tap{}
}

func (s *sandbox) redirects(t *testing.T) []datapath.Redirect {
	t.Helper()
	rs, err := s.n.Redirects()
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// tcShow is the kernel's own rendering of every filter and qdisc in the
// sandbox, used to prove that a repeated operation changed nothing.
func (s *sandbox) tcShow(t *testing.T) string {
	t.Helper()
	links := testnet.IP(t, "-n", s.ns.Name, "-o", "link", "show")
	out := ""
	for _, l := range []string{"eth0", datapath.TapName(0), datapath.TapName(1)} {
		if !strings.Contains(links, " "+l+":") && !strings.Contains(links, " "+l+"@") {
			continue
		}
		out += testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "show", "dev", l)
		out += testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "show", "dev", l, "ingress")
	}
	return out
}

func TestContainerLinks(t *testing.T) {
	s := newSandbox(t)
	testnet.IP(t, "-n", s.ns.Name, "link", "add", "name", "par0", "type", "veth", "peer", "name", "par1")
	testnet.IP(t, "-n", s.ns.Name, "link", "add", "link", "par0", "name", "net1", "type", "macvlan", "mode", "bridge")
	// ipvlan is not built into every kernel (not this test machine's); macvtap is.
	testnet.IP(t, "-n", s.ns.Name, "link", "add", "link", "par1", "name", "net2", "type", "macvtap", "mode", "bridge")
	testnet.IP(t, "-n", s.ns.Name, "tuntap", "add", "dev", "tap9", "mode", "tap")
	testnet.IP(t, "-n", s.ns.Name, "tuntap", "add", "dev", "tap3_kata", "mode", "tap")
	// Kata's macvtap model: a macvtap named like Kata's taps on top of the
	// container link, carrying the guest NIC's MAC.
	testnet.IP(t, "-n", s.ns.Name, "link", "add", "link", "par0", "name", "tap4_kata", "type", "macvtap", "mode", "bridge")
	testnet.IP(t, "-n", s.ns.Name, "link", "set", "net1", "mtu", "1400")

	links, err := s.n.ContainerLinks()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, l := range links {
		got[l.Name] = l.Kind
	}
	want := map[string]string{"eth0": "veth", "par0": "veth", "par1": "veth", "net1": "macvlan", "net2": "macvtap", "tap9": "tap"}
	if len(got) != len(want) {
		t.Errorf("container links = %v, want %v (no lo, no tap3_kata, no tap4_kata)", got, want)
	}
	for name, kind := range want {
		if got[name] != kind {
			t.Errorf("link %s kind = %q, want %q", name, got[name], kind)
		}
	}
	if l := s.link(t, "net1"); l.MTU != 1400 || l.Ifindex == 0 || len(l.MAC) != 6 {
		t.Errorf("net1 = %+v, want mtu 1400 with ifindex and MAC", l)
	}
	if !bytes.Equal(s.eth0.MAC, containerMAC) || !s.eth0.Up {
		t.Errorf("eth0 = %+v, want MAC %s and up", s.eth0, containerMAC)
	}
	kata, err := s.n.KataLinks()
	if err != nil {
		t.Fatal(err)
	}
	gotKata := map[string]string{}
	for _, l := range kata {
		gotKata[l.Name] = l.Kind
		if l.Name == "tap4_kata" && l.Parent != s.link(t, "par0").Ifindex {
			t.Errorf("tap4_kata parent = %d, want par0 (%d)", l.Parent, s.link(t, "par0").Ifindex)
		}
	}
	if want := map[string]string{"tap3_kata": "tap", "tap4_kata": "macvtap"}; !maps.Equal(gotKata, want) {
		t.Errorf("Kata links = %v, want %v", gotKata, want)
	}
	if taps, err := s.n.Taps(); err != nil || len(taps) != 0 {
		t.Errorf("our taps = %v, %v; want none (tap3_kata is Kata's)", taps, err)
	}
}

func TestOpenRejectsNonNetns(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "notnetns")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := datapath.Open(f.Name()); err == nil || !strings.Contains(err.Error(), f.Name()) {
		t.Fatalf("Open(regular file) = %v, want an error naming the path", err)
	}
}

func TestEnsureTapIdempotent(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	for _, q := range []int{1, 4} {
		idx := q - 1 // tap0 single queue, tap3 multiqueue
		spec := datapath.TapSpec{Index: idx, Queues: q, MTU: 1450}
		first, err := s.n.EnsureTap(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		second, err := s.n.EnsureTap(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		// Operational state settles asynchronously in the kernel
		// (linkwatch); everything else must be identical.
		first.OperState, second.OperState = "", ""
		if !reflect.DeepEqual(first, second) {
			t.Errorf("second EnsureTap changed the tap:\n%+v\n%+v", first, second)
		}
		if second.Kind != "tap" || !second.VnetHdr || !second.NoPI || !second.Persistent ||
			second.MultiQueue != (q > 1) || second.MTU != 1450 || !second.Up {
			t.Errorf("tap %d = %+v, want persistent tap, vnet_hdr, no pi, multiqueue=%v, mtu 1450, up", idx, second, q > 1)
		}
	}
	// MTU is corrected in place, the tap is not re-created.
	tp, err := s.n.EnsureTap(ctx, datapath.TapSpec{Index: 0, Queues: 1, MTU: 1300})
	if err != nil {
		t.Fatal(err)
	}
	if tp.MTU != 1300 || tp.Ifindex != s.tap(t, 0).Ifindex {
		t.Errorf("after MTU change tap = %+v", tp)
	}
}

// TestEnsureTapWithoutIPv6: a tap we create generates no IPv6 address of
// the host, so once QEMU's queue gives it a carrier it gets no link-local
// address (nor its routes, nor their events) and the host sends the guest
// no solicitations of its own.
func TestEnsureTapWithoutIPv6(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	spec := datapath.TapSpec{Index: 0, Queues: 1}
	if _, err := s.n.EnsureTap(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if got := testnet.IP(t, "-n", s.ns.Name, "-d", "link", "show", "tsn0"); !strings.Contains(got, "addrgenmode none") {
		t.Errorf("tap tsn0 generates IPv6 addresses of the host:\n%s", got)
	}
	q, err := s.n.OpenQueues(ctx, spec, datapath.VhostOff)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(q.Close)
	// The kernel acts on the carrier (operstate up, then IPv6's link-local
	// address) in one deferred step: once the state is up, an address
	// would be there.
	deadline := time.Now().Add(10 * time.Second)
	for s.tap(t, 0).OperState != "up" {
		if time.Now().After(deadline) {
			t.Fatalf("tap tsn0 never came up: %+v", s.tap(t, 0))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if addrs := testnet.IP(t, "-n", s.ns.Name, "-6", "address", "show", "dev", "tsn0"); strings.Contains(addrs, "inet6") {
		t.Errorf("tap tsn0 has IPv6 addresses of the host:\n%s", addrs)
	}
	// A tap of ours found down (left by an older tapsync, or set down by
	// hand) gets none either before it comes up.
	testnet.IP(t, "-n", s.ns.Name, "tuntap", "add", "dev", "tsn1", "mode", "tap", "vnet_hdr")
	if _, err := s.n.EnsureTap(ctx, datapath.TapSpec{Index: 1, Queues: 1}); err != nil {
		t.Fatal(err)
	}
	if got := testnet.IP(t, "-n", s.ns.Name, "-d", "link", "show", "tsn1"); !strings.Contains(got, "addrgenmode none") || !strings.Contains(got, ",UP") {
		t.Errorf("tap tsn1, found down: want it up with no IPv6 address of the host:\n%s", got)
	}
}

func TestEnsureTapMismatchLeavesForeignTap(t *testing.T) {
	s := newSandbox(t)
	// A tap of our name without vnet_hdr, as someone else would make it.
	testnet.IP(t, "-n", s.ns.Name, "tuntap", "add", "dev", "tsn5", "mode", "tap")
	before := testnet.IP(t, "-n", s.ns.Name, "-d", "link", "show", "tsn5")
	_, err := s.n.EnsureTap(context.Background(), datapath.TapSpec{Index: 5, Queues: 1})
	if !errors.Is(err, datapath.ErrTapMismatch) || !strings.Contains(err.Error(), "tsn5") {
		t.Fatalf("EnsureTap over a foreign tap = %v, want ErrTapMismatch naming tsn5", err)
	}
	if after := testnet.IP(t, "-n", s.ns.Name, "-d", "link", "show", "tsn5"); after != before {
		t.Errorf("mismatching tap was changed:\n%s\n%s", before, after)
	}
}

func TestEnsureTapBadSpec(t *testing.T) {
	s := newSandbox(t)
	for _, spec := range []datapath.TapSpec{
		{Index: 1234567890123, Queues: 1}, // tsn1234567890123 is 16 bytes: over IFNAMSIZ
		{Index: 1, Queues: 0},
		{Index: -1, Queues: 1},
	} {
		if _, err := s.n.EnsureTap(context.Background(), spec); err == nil || !strings.Contains(err.Error(), s.ns.Path) {
			t.Errorf("EnsureTap(%+v) = %v, want an error naming the netns", spec, err)
		}
	}
}

func TestOpenQueues(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	spec := datapath.TapSpec{Index: 2, Queues: 3}
	if _, err := s.n.EnsureTap(ctx, spec); err != nil {
		t.Fatal(err)
	}
	datapath.VhostNetPath = "/nonexistent/vhost-net"
	t.Cleanup(func() { datapath.VhostNetPath = "/dev/vhost-net" })
	if _, err := s.n.OpenQueues(ctx, spec, datapath.VhostOn); err == nil {
		t.Error("OpenQueues with vhost=on and no vhost-net device succeeded")
	}
	q, err := s.n.OpenQueues(ctx, spec, datapath.VhostAuto)
	if err != nil {
		t.Fatal(err)
	}
	if len(q.Tap) != 3 || len(q.Vhost) != 0 {
		t.Fatalf("got %d tap and %d vhost fds, want 3 and 0", len(q.Tap), len(q.Vhost))
	}
	if got := s.tap(t, 2).Attached; got != 3 {
		t.Errorf("attached queues = %d, want 3", got)
	}
	q.Close()
	if got := s.tap(t, 2).Attached; got != 0 {
		t.Errorf("attached queues after close = %d, want 0 (the tap persists)", got)
	}
	// A single-queue tap reports attachment through its carrier.
	one := datapath.TapSpec{Index: 0, Queues: 1}
	if _, err := s.n.EnsureTap(ctx, one); err != nil {
		t.Fatal(err)
	}
	if got := s.tap(t, 0).Attached; got != 0 {
		t.Errorf("single-queue tap attached = %d before open, want 0", got)
	}
	q1, err := s.n.OpenQueues(ctx, one, datapath.VhostOff)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.tap(t, 0).Attached; got != 1 {
		t.Errorf("single-queue tap attached = %d while open, want 1", got)
	}
	q1.Close()
	if _, err := s.n.OpenQueues(ctx, datapath.TapSpec{Index: 7, Queues: 1}, datapath.VhostOff); err == nil ||
		!strings.Contains(err.Error(), "tsn7") {
		t.Errorf("OpenQueues on a missing tap = %v, want an error naming tsn7", err)
	}
}

func ownedRedirects(rs []datapath.Redirect) []datapath.Redirect {
	return slices.DeleteFunc(slices.Clone(rs), func(r datapath.Redirect) bool { return !r.Owned })
}

func TestRedirectsIdempotentAndRemovable(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	tp, err := s.n.EnsureTap(ctx, datapath.TapSpec{Index: 0, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	// A foreign filter (Kata's style: auto priority 49152) on eth0 must survive everything.
	testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "add", "dev", "eth0", "ingress")
	testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "ip",
		"u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", "eth0")

	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	once := s.tcShow(t)
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	if twice := s.tcShow(t); twice != once {
		t.Errorf("second EnsureRedirects changed tc state:\n--- once\n%s\n--- twice\n%s", once, twice)
	}
	want := []datapath.Redirect{
		{From: s.eth0.Ifindex, To: tp.Ifindex, FromName: "eth0", ToName: "tsn0", Priority: datapath.FilterPriority, Owned: true},
		{From: tp.Ifindex, To: s.eth0.Ifindex, FromName: "tsn0", ToName: "eth0", Priority: datapath.FilterPriority, Owned: true},
	}
	all := s.redirects(t)
	if got := ownedRedirects(all); !slices.Equal(got, want) {
		t.Errorf("owned redirects = %v, want %v", got, want)
	}
	if len(all) != 3 {
		t.Errorf("redirects = %v, want ours plus the foreign one", all)
	}

	// The tap is re-created (new ifindex): our stale filter on eth0 is replaced.
	if err := s.n.RemoveTap(0); err != nil {
		t.Fatal(err)
	}
	tp2, err := s.n.EnsureTap(ctx, datapath.TapSpec{Index: 0, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	if tp2.Ifindex == tp.Ifindex {
		t.Fatalf("re-created tap kept ifindex %d", tp.Ifindex)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp2.Ifindex); err != nil {
		t.Fatal(err)
	}
	for _, r := range ownedRedirects(s.redirects(t)) {
		if (r.From == s.eth0.Ifindex && r.To != tp2.Ifindex) || (r.From == tp2.Ifindex && r.To != s.eth0.Ifindex) {
			t.Errorf("stale redirect survived: %+v", r)
		}
	}
	if got := len(ownedRedirects(s.redirects(t))); got != 2 {
		t.Errorf("owned redirects after re-create = %d, want 2", got)
	}

	// Removing the pair of the replaced tap (tp, gone) spares eth0's
	// filter, which now belongs to tp2.
	if err := s.n.RemoveRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	if got := len(ownedRedirects(s.redirects(t))); got != 2 {
		t.Errorf("removing a replaced pair took the new pair's filters: %d left, want 2", got)
	}

	// Remove twice: both succeed, eth0 is left with no filter of ours, the
	// foreign filter is untouched.
	for i := range 2 {
		if err := s.n.RemoveRedirects(s.eth0.Ifindex, tp2.Ifindex); err != nil {
			t.Fatalf("RemoveRedirects #%d: %v", i+1, err)
		}
		if err := s.n.RemoveTap(0); err != nil {
			t.Fatalf("RemoveTap #%d: %v", i+1, err)
		}
	}
	rs := s.redirects(t)
	if len(rs) != 1 || rs[0].Owned || rs[0].From != s.eth0.Ifindex {
		t.Errorf("after removal redirects = %v, want only the foreign filter on eth0", rs)
	}
	if out := testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "show", "dev", "eth0", "ingress"); strings.Contains(out, "pref 29779") {
		t.Errorf("our filter still on eth0:\n%s", out)
	}
	if taps, _ := s.n.Taps(); len(taps) != 0 {
		t.Errorf("taps after removal: %v", taps)
	}
}

// The hook is added before it is looked for: a link that already has
// one (a clsact, whose ingress parent is another handle; an ingress whose
// filter of ours was deleted by hand) is found through the add's EEXIST
// and repaired in place.
func TestRedirectsOnExistingHooks(t *testing.T) {
	s := newSandbox(t)
	tp, err := s.n.EnsureTap(context.Background(), datapath.TapSpec{Index: 0, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "add", "dev", "eth0", "clsact")
	for i := range 2 {
		if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
			t.Fatalf("EnsureRedirects #%d: %v", i+1, err)
		}
	}
	want := []datapath.Redirect{
		{From: s.eth0.Ifindex, To: tp.Ifindex, FromName: "eth0", ToName: "tsn0", Priority: datapath.FilterPriority, Owned: true},
		{From: tp.Ifindex, To: s.eth0.Ifindex, FromName: "tsn0", ToName: "eth0", Priority: datapath.FilterPriority, Owned: true},
	}
	if got := ownedRedirects(s.redirects(t)); !slices.Equal(got, want) {
		t.Errorf("owned redirects on clsact = %v, want %v", got, want)
	}
	if out := testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "show", "dev", "eth0"); strings.Contains(out, "qdisc ingress") {
		t.Errorf("an ingress qdisc was added beside the clsact:\n%s", out)
	}
	testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "del", "dev", datapath.TapName(0), "ingress", "pref", "29779")
	if got := ownedRedirects(s.redirects(t)); len(got) != 1 {
		t.Fatalf("after deleting the tap's filter: owned redirects %v, want eth0's alone", got)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	if got := ownedRedirects(s.redirects(t)); !slices.Equal(got, want) {
		t.Errorf("owned redirects after repair = %v, want %v", got, want)
	}
}

func TestRemoveAfterTapVanished(t *testing.T) {
	// The tap disappears first (as a non-persistent one does after
	// netdev_del): eth0's filter then redirects to nothing. Removal must
	// still clean eth0, and a new add must work.
	s := newSandbox(t)
	ctx := context.Background()
	tp, err := s.n.EnsureTap(ctx, datapath.TapSpec{Index: 1, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "-n", s.ns.Name, "link", "del", "tsn1")
	if err := s.n.RemoveRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	if rs := s.redirects(t); len(rs) != 0 {
		t.Fatalf("redirects left after removal: %v", rs)
	}
	tp, err = s.n.EnsureTap(ctx, datapath.TapSpec{Index: 1, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatalf("add after a vanished tap: %v", err)
	}
}

// Frames use a local experimental ethertype and a marker payload so that
// kernel chatter (IPv6 neighbour discovery) is told apart.
const etherType = 0x88b5

func frame(src net.HardwareAddr, marker string) []byte {
	f := append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, src...)
	f = append(f, etherType>>8, etherType&0xff)
	return append(f, []byte(marker)...)
}

// packetSocket opens an AF_PACKET socket bound to link ifindex inside ns;
// the socket stays in that netns whatever thread later uses it.
func packetSocket(t *testing.T, ns *datapath.Netns, ifindex int) int {
	t.Helper()
	var fd int
	err := ns.Do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(etherType)))
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(etherType), Ifindex: ifindex})
	})
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	return fd
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// vnetHdrLen is the size of struct virtio_net_hdr, which a vnet_hdr tap
// puts in front of every frame by default.
const vnetHdrLen = 10

func TestRedirectCarriesTraffic(t *testing.T) {
	s := newSandbox(t)
	ctx := context.Background()
	spec := datapath.TapSpec{Index: 0, Queues: 1}
	tp, err := s.n.EnsureTap(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex); err != nil {
		t.Fatal(err)
	}
	q, err := s.n.OpenQueues(ctx, spec, datapath.VhostOff)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(q.Close)
	tapFile := q.Tap[0] // non-blocking, so deadlines work

	host, err := datapath.Open(s.host.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Close() })
	hostLinks, err := host.ContainerLinks()
	if err != nil || len(hostLinks) != 1 {
		t.Fatalf("host links = %v, %v", hostLinks, err)
	}
	host0 := hostLinks[0]
	sock := packetSocket(t, host, host0.Ifindex)

	// host0 → veth → eth0 ingress → redirect → tap → read from the queue fd.
	// The frame is sent again every 200 ms: a link that is still coming
	// up (the veth's carrier, the tap's queue) may drop the first one.
	out := frame(host0.MAC, "tapsync-to-guest")
	send := func() {
		if err := unix.Sendto(sock, out, 0, &unix.SockaddrLinklayer{Protocol: htons(etherType), Ifindex: host0.Ifindex, Halen: 6,
			Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 65536)
	var seen []string
	for deadline := time.Now().Add(10 * time.Second); ; {
		send()
		tapFile.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := tapFile.Read(buf)
		if err == nil && n > vnetHdrLen && bytes.Equal(buf[vnetHdrLen:n], out) {
			break
		}
		if err == nil {
			seen = append(seen, string(buf[:n]))
		}
		if time.Now().After(deadline) {
			t.Fatalf("no frame from eth0 reached the tap within 10 s (saw %d others): %v", len(seen), err)
		}
	}

	// tap queue fd → tap ingress → redirect → eth0 egress → host0.
	in := frame(containerMAC, "tapsync-from-guest")
	if _, err := tapFile.Write(append(make([]byte, vnetHdrLen), in...)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, _, err := unix.Recvfrom(sock, buf, 0)
		if err == nil && bytes.Equal(buf[:n], in) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no frame from the tap reached host0 (last error %v)", err)
		}
	}
}

func TestProbeKernel(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	if err := datapath.ProbeKernel(); err != nil {
		t.Fatalf("ProbeKernel on a kernel that runs the other tests: %v", err)
	}
}

// TestVerifyFollowsThePath keeps a Netns while its path is deleted and
// then names a new namespace: Verify must notice both, and must not
// mistake the new namespace for the old one.
func TestVerifyFollowsThePath(t *testing.T) {
	s := newSandbox(t)
	if err := s.n.Verify(); err != nil {
		t.Fatalf("Verify on a fresh Netns: %v", err)
	}
	testnet.IP(t, "netns", "del", s.ns.Name)
	if err := s.n.Verify(); !errors.Is(err, datapath.ErrNetnsReplaced) {
		t.Fatalf("Verify after the netns was deleted = %v, want ErrNetnsReplaced", err)
	}
	testnet.IP(t, "netns", "add", s.ns.Name)
	if err := s.n.Verify(); !errors.Is(err, datapath.ErrNetnsReplaced) {
		t.Fatalf("Verify after another netns took the path = %v, want ErrNetnsReplaced", err)
	}
	// The kept handle still reads the namespace it was opened in.
	if _, err := s.n.ContainerLinks(); err != nil {
		t.Fatal(err)
	}
	if l := s.link(t, "eth0"); l.Ifindex == 0 {
		t.Fatalf("eth0 of the old namespace not seen through the kept handle")
	}
	fresh, err := datapath.Open(s.ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	if err := fresh.Verify(); err != nil {
		t.Fatalf("Verify on a Netns opened after the replacement: %v", err)
	}
	links, err := fresh.ContainerLinks()
	if err != nil {
		t.Fatal(err)
	}
	if len(links) != 0 {
		t.Fatalf("the new namespace has container links %v, want none", links)
	}
}

// Handle ffff: is where an ingress hook goes (ingress and clsact both
// take it). On a link where another qdisc holds it (here an HTB at the
// root of its egress) EnsureRedirects fails naming the link and the
// qdisc's kind, and leaves the link's qdiscs and filters as they were.
func TestRedirectsIngressHandleTaken(t *testing.T) {
	s := newSandbox(t)
	tp, err := s.n.EnsureTap(context.Background(), datapath.TapSpec{Index: 0, Queues: 1})
	if err != nil {
		t.Fatal(err)
	}
	testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "add", "dev", "eth0", "root", "handle", "ffff:", "htb", "default", "1")
	// Its packet counter aside: the kernel's own IPv6 packets (DAD, router
	// solicitations) may leave through it meanwhile.
	counter := regexp.MustCompile(`direct_packets_stat \d+`)
	show := func() string {
		return counter.ReplaceAllString(testnet.Run(t, "tc", "-n", s.ns.Name, "qdisc", "show", "dev", "eth0"), "direct_packets_stat N") +
			testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "show", "dev", "eth0", "parent", "ffff:") +
			testnet.Run(t, "tc", "-n", s.ns.Name, "filter", "show", "dev", "eth0", "ingress")
	}
	before := show()
	err = s.n.EnsureRedirects(s.eth0.Ifindex, tp.Ifindex)
	if err == nil || !strings.Contains(err.Error(), "eth0") || !strings.Contains(err.Error(), "htb") {
		t.Errorf("EnsureRedirects with ffff: held by an htb = %v, want an error naming eth0 and htb", err)
	}
	if after := show(); after != before {
		t.Errorf("eth0's tc state changed:\n--- before\n%s\n--- after\n%s", before, after)
	}
}
