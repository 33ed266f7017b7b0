package watcher

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

// linkEvent matches a KindSandbox from netlink for id whose reason
// mentions link.
func linkEvent(id, link string) func(Event) bool {
	return func(e Event) bool {
		return e.Kind == KindSandbox && e.Source == SourceNetlink && e.ID == id && strings.Contains(e.Why, "link "+link+" ")
	}
}

func forID(id string) func(Event) bool {
	return func(e Event) bool { return e.ID == id }
}

// newNetlinkWatcher returns a NetlinkWatcher whose watches all end before
// the test does. Its socket and nsids live in a throwaway netns standing
// in for the daemon's own, so that nothing other tests do on the host
// reaches it.
func newNetlinkWatcher(t *testing.T) (*NetlinkWatcher, *recorder, context.Context, *logBuf) {
	home := testnet.NewNS(t, "tsw")
	rec := &recorder{}
	w := NewNetlinkWatcher(rec.sink)
	w.home = home.Path
	ctx, lb := testCtx(t)
	t.Cleanup(w.StopAll)
	return w, rec, ctx, lb
}

// ifindexIn is the ifindex of link name in netns nsName.
func ifindexIn(t *testing.T, nsName, name string) int {
	t.Helper()
	out, err := exec.Command("ip", "-n", nsName, "-o", "link", "show", "dev", name).Output()
	if err != nil {
		t.Fatalf("ip -n %s link show %s: %v", nsName, name, err)
	}
	var i int
	if _, err := fmt.Sscanf(string(out), "%d:", &i); err != nil {
		t.Fatalf("ifindex of %s in %q: %v", name, out, err)
	}
	return i
}

func TestNetlinkWatcher(t *testing.T) {
	ns := testnet.NewNS(t, "tsl")
	peer := testnet.NewNS(t, "tslp")
	w, rec, ctx, _ := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb1", ns.Path); err != nil {
		t.Fatal(err)
	}

	t.Run("link changes make events", func(t *testing.T) {
		testnet.IP(t, "-n", ns.Name, "link", "add", "d0", "type", "bridge")
		rec.wait(t, 0, "event for d0", linkEvent("sb1", "d0"))
		testnet.Veth(t, ns, "eth0", nil, peer, "eth0p")
		rec.wait(t, 0, "event for eth0", linkEvent("sb1", "eth0"))
		// eth0 in the bridge: deleting d0 also takes eth0 out of it,
		// an AF_BRIDGE RTM_DELLINK for eth0 that deletes no link.
		testnet.IP(t, "-n", ns.Name, "link", "set", "eth0", "master", "d0")
		d0, eth0 := ifindexIn(t, ns.Name, "d0"), ifindexIn(t, ns.Name, "eth0")
		testnet.IP(t, "-n", ns.Name, "link", "del", "d0")
		rec.wait(t, 0, "event for d0 removed, with its ifindex", func(e Event) bool {
			return linkEvent("sb1", "d0")(e) && strings.HasSuffix(e.Why, "removed") && e.LinkGone == d0
		})
		rec.none(t, 0, "event from another netns", func(e Event) bool { return strings.Contains(e.Why, "eth0p") })
		rec.none(t, 0, "a deletion reported for a link that stays", func(e Event) bool { return e.LinkGone != 0 && e.LinkGone != d0 })
		if ifindexIn(t, ns.Name, "eth0") != eth0 {
			t.Fatal("eth0 changed its ifindex")
		}
	})

	t.Run("watching again is a no-op", func(t *testing.T) {
		w.mu.Lock()
		before := w.watches["sb1"]
		w.mu.Unlock()
		if err := w.Watch(ctx, "sb1", ns.Path); err != nil {
			t.Fatal(err)
		}
		w.mu.Lock()
		after := w.watches["sb1"]
		w.mu.Unlock()
		if before != after {
			t.Fatal("Watch with the same id and path replaced the running watch")
		}
	})

	t.Run("a new path restarts the watch", func(t *testing.T) {
		if err := w.Watch(ctx, "sb1", peer.Path); err != nil {
			t.Fatal(err)
		}
		from := rec.len()
		testnet.IP(t, "-n", peer.Name, "link", "add", "p1", "type", "bridge")
		rec.wait(t, from, "event for p1 in the new netns", linkEvent("sb1", "p1"))
		// Back to the first netns for the next steps.
		if err := w.Watch(ctx, "sb1", ns.Path); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("Stop stops events", func(t *testing.T) {
		w.Stop("sb1")
		from := rec.len()
		// A second watch of the same netns proves the kernel sent the
		// update: once it has seen it, sb1 would have too.
		if err := w.Watch(ctx, "witness", ns.Path); err != nil {
			t.Fatal(err)
		}
		testnet.IP(t, "-n", ns.Name, "link", "add", "d1", "type", "bridge")
		rec.wait(t, from, "witness event for d1", linkEvent("witness", "d1"))
		rec.none(t, from, "event for the stopped watch", forID("sb1"))
		w.Stop("sb1") // stopping twice is fine
	})
}

func TestNetlinkWatcherNotANetns(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "placeholder")
	if err := os.WriteFile(file, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	w := NewNetlinkWatcher((&recorder{}).sink)
	ctx, _ := testCtx(t)
	t.Cleanup(w.StopAll)
	for _, p := range []string{file, filepath.Join(dir, "missing")} {
		if err := w.Watch(ctx, "sb", p); err == nil || !strings.Contains(err.Error(), p) {
			t.Errorf("Watch(%s) = %v, want an error naming it", p, err)
		}
	}
	if w.Watching("sb") {
		t.Error("a failed Watch left a watch running")
	}
}

// TestNetlinkWatcherOverflow makes the kernel drop link messages (ENOBUFS) on
// a socket with a tiny receive buffer, by holding the reader while links
// are added in bulk in one netns. The socket serves every sandbox, so every
// watched sandbox gets exactly one resync event, the quiet one too.
func TestNetlinkWatcherOverflow(t *testing.T) {
	ns := testnet.NewNS(t, "tsf")
	quiet := testnet.NewNS(t, "tsq")
	w, rec, ctx, _ := newNetlinkWatcher(t)
	var hold sync.Mutex
	w.holdUpdate = func() { hold.Lock(); hold.Unlock() }
	w.rcvBuf.Store(1) // the kernel rounds it up to its minimum, about 2 KiB
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	if err := w.Watch(ctx, "quiet", quiet.Path); err != nil {
		t.Fatal(err)
	}

	hold.Lock()
	batch := filepath.Join(t.TempDir(), "batch")
	var b strings.Builder
	for i := range 100 {
		fmt.Fprintf(&b, "link add f%d type bridge\n", i)
	}
	if err := os.WriteFile(batch, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	// Equivalent to 100 × ip link add fN type bridge (no dummy module here), in one process.
	testnet.IP(t, "-n", ns.Name, "-batch", batch)
	// The drop is already recorded on the old socket; the new one gets the
	// default buffer so that the rest of the test sees every update.
	w.rcvBuf.Store(0)
	hold.Unlock()

	e, _ := rec.wait(t, 0, "resubscribe event", func(e Event) bool {
		return e.Kind == KindSandbox && e.ID == "sb" && strings.HasPrefix(e.Why, "netlink resubscribed: ")
	})
	t.Logf("overflow: %s (events before it: %d)", e.Why, rec.len()-1)
	if !strings.Contains(e.Why, "no buffer space available") {
		t.Errorf("resubscribe reason %q, want ENOBUFS (no buffer space available)", e.Why)
	}
	rec.wait(t, 0, "resubscribe event for the quiet sandbox", func(e Event) bool {
		return e.ID == "quiet" && e.Why == "netlink resubscribed: receive: no buffer space available"
	})
	if n := w.Resubscriptions(); n != 1 {
		t.Errorf("Resubscriptions() = %d, want 1", n)
	}

	from := rec.len()
	testnet.IP(t, "-n", ns.Name, "link", "add", "after", "type", "bridge")
	rec.wait(t, from, "event for a link added after the resubscription", linkEvent("sb", "after"))
	resubs := map[string]int{}
	for _, e := range rec.all() {
		if strings.HasPrefix(e.Why, "netlink resubscribed: ") {
			resubs[e.ID]++
		}
	}
	if resubs["sb"] != 1 || resubs["quiet"] != 1 || len(resubs) != 2 {
		t.Errorf("resync events by sandbox = %v, want exactly one each for sb and quiet", resubs)
	}
}

// TestNetlinkWatcherNetnsDeleted: once the netns file is gone, the watch ends
// by itself and says nothing more.
func TestNetlinkWatcherNetnsDeleted(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	name := "tsd-" + hex.EncodeToString(b)
	testnet.IP(t, "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	path := "/var/run/netns/" + name

	w, rec, ctx, lb := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb", path); err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "-n", name, "link", "add", "d0", "type", "bridge")
	rec.wait(t, 0, "event for d0", linkEvent("sb", "d0"))

	from := rec.len()
	testnet.IP(t, "netns", "del", name)
	lb.waitLine(t, "watch ended", `"sandbox":"sb"`, "netlink watch ended")
	if w.Watching("sb") {
		t.Error("watch still running after it logged its end")
	}
	rec.none(t, from, "event after the netns was deleted", forID("sb"))
	if n := w.Resubscriptions(); n != 0 {
		t.Errorf("Resubscriptions() = %d, want 0", n)
	}

	// The same path, a new netns: watching it again starts a new watch
	// (the daemon's next pass does so when the netns dir reports it).
	testnet.IP(t, "netns", "add", name)
	if err := w.Watch(ctx, "sb", path); err != nil {
		t.Fatal(err)
	}
	from = rec.len()
	testnet.IP(t, "-n", name, "link", "add", "d1", "type", "bridge")
	rec.wait(t, from, "event for d1 in the new netns", linkEvent("sb", "d1"))
}

// TestNetlinkWatcherSamePathNewNetns: a path that names another netns than
// the one watched is watched anew on the next Watch, without waiting for
// the old netns to die (here it stays alive, held open by the test).
func TestNetlinkWatcherSamePathNewNetns(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	name := "tsr-" + hex.EncodeToString(b)
	testnet.IP(t, "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	path := "/var/run/netns/" + name
	old, err := os.Open(path) // keeps the first netns alive after ip netns del
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()

	w, rec, ctx, _ := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb", path); err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "netns", "del", name)
	testnet.IP(t, "netns", "add", name)
	if err := w.Watch(ctx, "sb", path); err != nil {
		t.Fatal(err)
	}
	from := rec.len()
	testnet.IP(t, "-n", name, "link", "add", "n0", "type", "bridge")
	rec.wait(t, from, "event for n0 in the new netns", linkEvent("sb", "n0"))
}

// TestNetlinkWatcherContextEnds: the end of the context given to Watch ends
// the watch, and with the last watch the socket and its reader.
func TestNetlinkWatcherContextEnds(t *testing.T) {
	ns := testnet.NewNS(t, "tsc")
	w, _, ctx, _ := newNetlinkWatcher(t)
	wctx, cancel := context.WithCancel(ctx)
	if err := w.Watch(wctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	l := w.lst
	w.mu.Unlock()
	cancel()
	deadline := time.Now().Add(10 * time.Second)
	for w.Watching("sb") || !isDone(l.done) {
		if time.Now().After(deadline) {
			t.Fatalf("after the context ended: watch running %v, reader done %v", w.Watching("sb"), isDone(l.done))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func isDone(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// TestNetlinkWatcherAddrRouteTC: address, route and tc changes inside the
// watched netns each make an event for the sandbox that names them.
func TestNetlinkWatcherAddrRouteTC(t *testing.T) {
	ns := testnet.NewNS(t, "tsa")
	peer := testnet.NewNS(t, "tsap")
	testnet.Veth(t, ns, "eth0", nil, peer, "eth0p")
	w, rec, ctx, _ := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	// why matches an event for sb whose reason starts with prefix and ends
	// with suffix.
	why := func(prefix, suffix string) func(Event) bool {
		return func(e Event) bool {
			return e.Kind == KindSandbox && e.Source == SourceNetlink && e.ID == "sb" &&
				strings.HasPrefix(e.Why, prefix) && strings.HasSuffix(e.Why, suffix)
		}
	}
	for _, step := range []struct {
		what, prefix, suffix string
		cmd                  []string
	}{
		{"address added", "address 10.40.0.2/24 on link ", " changed", []string{"ip", "-n", ns.Name, "address", "add", "10.40.0.2/24", "dev", "eth0"}},
		{"IPv6 address added", "address fd00:40::2/64 on link ", " changed", []string{"ip", "-n", ns.Name, "address", "add", "fd00:40::2/64", "dev", "eth0", "nodad"}},
		{"route added", "route 10.50.0.0/16", " changed", []string{"ip", "-n", ns.Name, "route", "add", "10.50.0.0/16", "via", "10.40.0.1"}},
		{"default route added", "route default", " changed", []string{"ip", "-n", ns.Name, "route", "add", "default", "via", "10.40.0.1"}},
		{"IPv6 route added", "route default (ipv6)", " changed", []string{"ip", "-n", ns.Name, "-6", "route", "add", "default", "via", "fd00:40::1"}},
		{"ingress qdisc added", "tc qdisc on link ", " changed", []string{"tc", "-n", ns.Name, "qdisc", "add", "dev", "eth0", "ingress"}},
		{"filter added", "tc filter on link ", " changed", []string{"tc", "-n", ns.Name, "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "prio", "7", "u32", "match", "u8", "0", "0", "flowid", "ffff:1"}},
		{"filter removed", "tc filter on link ", " removed", []string{"tc", "-n", ns.Name, "filter", "del", "dev", "eth0", "parent", "ffff:", "prio", "7"}},
		{"ingress qdisc removed", "tc qdisc on link ", " removed", []string{"tc", "-n", ns.Name, "qdisc", "del", "dev", "eth0", "ingress"}},
		{"route removed", "route 10.50.0.0/16", " removed", []string{"ip", "-n", ns.Name, "route", "del", "10.50.0.0/16"}},
		{"address removed", "address 10.40.0.2/24 on link ", " removed", []string{"ip", "-n", ns.Name, "address", "del", "10.40.0.2/24", "dev", "eth0"}},
	} {
		from := rec.len()
		testnet.Run(t, step.cmd[0], step.cmd[1:]...)
		rec.wait(t, from, "event for "+step.what, why(step.prefix, step.suffix))
	}
	if n := w.Resubscriptions(); n != 0 {
		t.Errorf("Resubscriptions() = %d, want 0", n)
	}
}

// TestNetlinkWatcherSkipsUnobservedRoutes: a change of a route no
// reconcile reads (another table, a local or multicast route, the kernel's
// routes of an address or a link coming up) is no event, while the next
// change of a main-table route is: the socket delivers in order, so every
// event before that one was looked at.
func TestNetlinkWatcherSkipsUnobservedRoutes(t *testing.T) {
	ns := testnet.NewNS(t, "tsr")
	peer := testnet.NewNS(t, "tsrp")
	testnet.Veth(t, ns, "eth0", nil, peer, "eth0p")
	testnet.IP(t, "-n", ns.Name, "address", "add", "10.41.0.2/24", "dev", "eth0")
	w, rec, ctx, _ := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	from := rec.len()
	for _, cmd := range [][]string{
		{"route", "add", "10.61.0.0/16", "via", "10.41.0.1", "table", "100"},
		{"route", "add", "local", "10.62.0.1", "dev", "eth0", "table", "main"},
		{"route", "add", "10.63.0.0/16", "dev", "eth0", "proto", "kernel"},
		{"-6", "route", "add", "fd00:64::/64", "dev", "eth0", "table", "local"},
	} {
		testnet.IP(t, append([]string{"-n", ns.Name}, cmd...)...)
	}
	testnet.IP(t, "-n", ns.Name, "route", "add", "10.65.0.0/16", "via", "10.41.0.1")
	rec.wait(t, from, "event for the main table's route", func(e Event) bool {
		return e.ID == "sb" && strings.HasPrefix(e.Why, "route 10.65.0.0/16")
	})
	rec.none(t, from, "event for a route no reconcile reads", func(e Event) bool {
		return strings.HasPrefix(e.Why, "route ") && !strings.HasPrefix(e.Why, "route 10.65.0.0/16")
	})
}

// TestNetlinkWatcherTCStale: an event names the link whose tc its
// message may have changed: a link's own message and a tc message about
// it name its ifindex, a tc action every link, an address none.
func TestNetlinkWatcherTCStale(t *testing.T) {
	ns := testnet.NewNS(t, "tst")
	peer := testnet.NewNS(t, "tstp")
	testnet.Veth(t, ns, "eth0", nil, peer, "eth0p")
	idx := ifindexIn(t, ns.Name, "eth0")
	w, rec, ctx, _ := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		prefix string
		stale  int
		cmd    []string
	}{
		{"address 10.42.0.2/24", 0, []string{"ip", "-n", ns.Name, "address", "add", "10.42.0.2/24", "dev", "eth0"}},
		{"link eth0", idx, []string{"ip", "-n", ns.Name, "link", "set", "eth0", "mtu", "1400"}},
		{"tc qdisc on link ", idx, []string{"tc", "-n", ns.Name, "qdisc", "add", "dev", "eth0", "ingress"}},
		{"tc filter on link ", idx, []string{"tc", "-n", ns.Name, "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "prio", "7", "u32", "match", "u8", "0", "0", "flowid", "ffff:1"}},
		{"tc action", TCStaleAll, []string{"tc", "-n", ns.Name, "actions", "add", "action", "mirred", "egress", "redirect", "dev", "eth0", "index", "7"}},
	} {
		from := rec.len()
		testnet.Run(t, step.cmd[0], step.cmd[1:]...)
		e, _ := rec.wait(t, from, "event "+step.prefix, func(e Event) bool { return e.ID == "sb" && strings.HasPrefix(e.Why, step.prefix) })
		if e.TCStale != step.stale {
			t.Errorf("event %q: TCStale %d, want %d", e.Why, e.TCStale, step.stale)
		}
	}
}

// TestDescribeMessage: truncated or odd messages are described without
// reading past their end.
func TestDescribeMessage(t *testing.T) {
	for _, typ := range []uint16{unix.RTM_NEWLINK, unix.RTM_DELADDR, unix.RTM_NEWROUTE, unix.RTM_NEWQDISC, unix.RTM_DELTFILTER, unix.RTM_NEWACTION} {
		for n := range 40 {
			m := syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: typ}, Data: make([]byte, n)}
			// Attribute lengths that overrun the message.
			for i := range m.Data {
				m.Data[i] = 0xff
			}
			why, ok := describeMessage(m)
			if typ == unix.RTM_NEWROUTE && n >= unix.SizeofRtMsg {
				// Table 255 (local), type 255: a route no reconcile reads.
				if ok {
					t.Errorf("describeMessage(route of table local, %d bytes) = %q, want no event", n, why)
				}
				continue
			}
			if !ok || why == "" {
				t.Errorf("describeMessage(type %d, %d bytes) = %q, %v; want a description", typ, n, why, ok)
			}
		}
	}
	if why, ok := describeMessage(syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: unix.NLMSG_DONE}}); ok {
		t.Errorf("describeMessage(NLMSG_DONE) = %q, want no event", why)
	}
}

// TestNetlinkWatcherStaleDelNsid: an RTM_DELNSID for the nsid a live netns
// holds (a late notice about an earlier holder of the number) ends no
// watch: the path still names the netns, which still has that nsid.
func TestNetlinkWatcherStaleDelNsid(t *testing.T) {
	ns := testnet.NewNS(t, "tss")
	w, rec, ctx, _ := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	nsid := w.watches["sb"].nsid
	w.mu.Unlock()
	w.nsidDeleted(nsid)
	if !w.Watching("sb") {
		t.Fatal("a notice about an nsid the live netns still holds ended its watch")
	}
	testnet.IP(t, "-n", ns.Name, "link", "add", "s0", "type", "bridge")
	rec.wait(t, 0, "event for s0", linkEvent("sb", "s0"))
}

// TestNetlinkWatcherPrivateHome runs the watcher as the daemon does (no
// home set: a private netns of the process) and checks that its socket
// wakes for the sandbox it watches and not for a netns that has an nsid
// in the host's netns (as every pod netns with a veth peer on the host
// has): on a node, that netns's changes and the host's woke the idle
// daemon for nothing.
func TestNetlinkWatcherPrivateHome(t *testing.T) {
	ns := testnet.NewNS(t, "tslh")
	foreign := testnet.NewNS(t, "tslf")
	testnet.IP(t, "netns", "set", foreign.Name, "auto") // an nsid in the host's netns
	rec := &recorder{}
	w := NewNetlinkWatcher(rec.sink)
	ctx, _ := testCtx(t)
	t.Cleanup(w.StopAll)
	if err := w.Watch(ctx, "sb1", ns.Path); err != nil {
		t.Fatal(err)
	}
	home, err := privateHome()
	if err != nil {
		t.Fatalf("no private home: %v", err)
	}
	hid, err := nsIDOf(home)
	if err != nil {
		t.Fatal(err)
	}
	if own, err := nsIDOf("/proc/self/ns/net"); err != nil || own == hid {
		t.Fatalf("home %s is the process's own netns (%v, %v)", home, own, err)
	}
	// The Watch's own nsid assignment is heard in home: wait until it
	// has been read before counting.
	testnet.IP(t, "-n", ns.Name, "link", "add", "d0", "type", "bridge")
	rec.wait(t, 0, "event for d0", linkEvent("sb1", "d0"))
	before := w.wakeups.Load()
	const changes = 5
	for i := range changes {
		testnet.IP(t, "-n", foreign.Name, "link", "add", fmt.Sprintf("f%d", i), "type", "bridge")
	}
	// Multicast delivery is synchronous: by the time the sandbox's event
	// is read, every datagram of the foreign changes made before it
	// would have been read too.
	n := rec.len()
	testnet.IP(t, "-n", ns.Name, "link", "add", "d1", "type", "bridge")
	rec.wait(t, n, "event for d1", linkEvent("sb1", "d1"))
	if woke := w.wakeups.Load() - before; woke >= changes {
		t.Fatalf("the socket woke %d times for %d changes in a foreign netns and one in the sandbox's", woke, changes)
	}
}

// Watches share one netlink handle in home for their nsids, kept while
// something is watched and closed when nothing is.
func TestNetlinkWatcherKeepsNsidHandle(t *testing.T) {
	w, _, ctx, _ := newNetlinkWatcher(t)
	a, b := testnet.NewNS(t, "tswa"), testnet.NewNS(t, "tswb")
	if err := w.Watch(ctx, "a", a.Path); err != nil {
		t.Fatal(err)
	}
	w.nsidMu.Lock()
	first := w.nsidH
	w.nsidMu.Unlock()
	if first == nil {
		t.Fatal("no nsid handle kept after a Watch")
	}
	if err := w.Watch(ctx, "b", b.Path); err != nil {
		t.Fatal(err)
	}
	w.nsidMu.Lock()
	second := w.nsidH
	w.nsidMu.Unlock()
	if second != first {
		t.Error("the second Watch made a handle of its own")
	}
	if w.byNsidOf("a") == w.byNsidOf("b") {
		t.Errorf("two netns got the same nsid %d", w.byNsidOf("a"))
	}
	w.StopAll()
	w.nsidMu.Lock()
	defer w.nsidMu.Unlock()
	if w.nsidH != nil {
		t.Error("nsid handle still open after StopAll")
	}
}

// byNsidOf is the nsid of sandbox id's watch (for tests).
func (w *NetlinkWatcher) byNsidOf(id string) int32 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.watches[id].nsid
}

// A Watch that fails after its netns got an nsid (here its socket cannot
// join its groups) leaves nothing open: with nothing watched, the nsid
// handle it used goes too.
func TestNetlinkWatcherFailedWatchLeavesNoFd(t *testing.T) {
	ns := testnet.NewNS(t, "tswf")
	w, _, ctx, _ := newNetlinkWatcher(t)
	w.groups = []uint{0} // no such group: joining it fails (EINVAL)
	before, _ := openFds(t)
	if err := w.Watch(ctx, "sb", ns.Path); err == nil {
		t.Fatal("Watch succeeded with a socket that cannot join its groups")
	}
	if after, _ := openFds(t); after != before {
		t.Errorf("a failed Watch left %d fds open (%d before, %d after)", after-before, before, after)
	}
	if w.Watching("sb") {
		t.Error("a failed Watch left a watch running")
	}
}

// An RTM_DELNSID read as the last watch is stopped: the reader that
// picked the watch before the Stop asks for its netns's nsid after it
// (stillNamed), and leaves no nsid handle open behind the Stop.
func TestNetlinkWatcherStillNamedAfterStopLeavesNoFd(t *testing.T) {
	ns := testnet.NewNS(t, "tswn")
	w, _, ctx, _ := newNetlinkWatcher(t)
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	nw := w.watches["sb"] // as nsidDeleted picks it
	w.mu.Unlock()
	w.Stop("sb")
	before, _ := openFds(t)
	if !w.stillNamed(nw) {
		t.Error("stillNamed: the live netns lost its nsid")
	}
	if after, _ := openFds(t); after != before {
		t.Errorf("stillNamed after the last Stop left %d fds open (%d before, %d after)", after-before, before, after)
	}
}

// TestNetlinkWatcherSerial: a watch keeps its number while it lasts; one
// begun again, or replacing another, has a new one.
func TestNetlinkWatcherSerial(t *testing.T) {
	ns := testnet.NewNS(t, "tsq")
	other := testnet.NewNS(t, "tsq2")
	w, _, ctx, _ := newNetlinkWatcher(t)
	if s := w.Serial("sb"); s != 0 {
		t.Fatalf("Serial before any watch = %d, want 0", s)
	}
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	first := w.Serial("sb")
	if err := w.Watch(ctx, "sb", ns.Path); err != nil {
		t.Fatal(err)
	}
	if s := w.Serial("sb"); first == 0 || s != first {
		t.Fatalf("Serial %d, then %d after watching the same netns again; want one number, not 0", first, s)
	}
	if err := w.Watch(ctx, "sb", other.Path); err != nil {
		t.Fatal(err)
	}
	replaced := w.Serial("sb")
	if replaced == first || replaced == 0 {
		t.Fatalf("Serial after the watch moved to another netns = %d, want a new number (was %d)", replaced, first)
	}
	w.Stop("sb")
	if s := w.Serial("sb"); s != 0 {
		t.Fatalf("Serial after Stop = %d, want 0", s)
	}
}
