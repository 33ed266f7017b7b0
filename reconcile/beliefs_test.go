package reconcile

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

// neighWorld is podWorld with a permanent neighbour on eth0.
func neighWorld() *world {
	w := podWorld()
	w.neighbors = []datapath.Neighbor{{IP: netip.MustParseAddr("10.1.0.9"), MAC: macN(9), LinkIndex: w.links[0].Ifindex, State: 0x80}}
	return w
}

// A NIC made again under a new endpoint is a new netdevice to the guest:
// the old one left with its routes and neighbours, which the new one must
// get again although the device name, and so the routes' text, is the same.
func TestReplacementNICKeepsGuestRoutesAndNeighbours(t *testing.T) {
	for _, tc := range []struct {
		name   string
		remake func(w *world)
	}{
		{"MAC changed", func(w *world) { w.setMAC("eth0", macN(7)) }},
		{"MTU raised above the NIC's host_mtu", func(w *world) { w.links[0].MTU = 9000 }},
		{"link re-created with the same MAC", func(w *world) {
			old := w.link("eth0")
			routes := slices.DeleteFunc(slices.Clone(w.routes), func(r datapath.Route) bool { return r.LinkIndex != old.Ifindex })
			neigh := slices.Clone(w.neighbors)
			w.delLink("eth0")
			i := w.addLink("eth0", "veth", old.MAC, old.MTU)
			w.links[len(w.links)-1].Addrs = old.Addrs
			for _, r := range routes {
				r.LinkIndex = i
				w.routes = append(w.routes, r)
			}
			for _, n := range neigh {
				n.LinkIndex = i
				w.neighbors = append(w.neighbors, n)
			}
		}},
		{"NIC unplugged behind tapsync's back", func(w *world) {
			w.nics = slices.DeleteFunc(w.nics, func(n NIC) bool { return n.Owned })
			delete(w.netdevs, 0)
			w.taps[0].Attached = 0
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := neighWorld()
			mustConvergeGuest(t, w)
			tc.remake(w)
			mustConvergeGuest(t, w)
		})
	}
}

// A route whose MTU or source changes in the netns is sent again: the
// guest must not keep the old one while the record says it has the new.
func TestGuestRouteAttributeChangeIsSent(t *testing.T) {
	w := podWorld()
	mustConvergeGuest(t, w)
	w.routes[1].MTU = 1400
	w.routes[0].Src = netip.MustParseAddr("10.1.0.5")
	p, _, err := w.reconcile(guestOn)
	if err != nil || guestOps(p) != "update-guest-routes" {
		t.Errorf("route MTU and source changed: plan %q, %v; want update-guest-routes", guestOps(p), err)
	}
	mustConvergeGuest(t, w)
}

// beliefCase is a way the guest changes behind tapsync's back, and the
// event the reconciler notes for it.
type beliefCase struct {
	name   string
	event  cause
	happen func(t *testing.T, w *world)
}

var beliefCases = []beliefCase{
	{"guest rebooted", causeReset, func(t *testing.T, w *world) { w.guest.reboot() }},
	{"agent restarted, the guest kernel kept its state", causeAgentLost, func(t *testing.T, w *world) {}},
	{"registered again with another monitor: another VM", causeMonitorChanged, func(t *testing.T, w *world) { w.guest.reboot() }},
	{"registered again with another agent", causeAgentChanged, func(t *testing.T, w *world) {}},
	{"agent call cut short after taking the link down", causeAgentFailed, func(t *testing.T, w *world) {
		w.links[0].Addrs = append(w.links[0].Addrs, netip.MustParsePrefix("10.1.0.6/24"))
		w.guest.halfway = true
		if _, out, err := w.reconcile(guestOn); err == nil || !out.GuestFailed {
			t.Fatalf("pass with a call cut short: %v, guest failed %v", err, out.GuestFailed)
		}
	}},
	{"agent call done, its answer lost", causeAgentFailed, func(t *testing.T, w *world) {
		w.links[0].Addrs = append(w.links[0].Addrs, netip.MustParsePrefix("10.1.0.6/24"))
		w.guest.replyLost = true
		if _, out, err := w.reconcile(guestOn); err == nil || !out.GuestFailed {
			t.Fatalf("pass with an answer lost: %v, guest failed %v", err, out.GuestFailed)
		}
	}},
	{"a workload flushed the guest's addresses", causeVerify, func(t *testing.T, w *world) { w.guest.flushAddrs("eth0") }},
	{"PCI rescan in the guest", causeVerify, func(t *testing.T, w *world) {
		// Every device is removed and found again: new netdevices.
		nics := w.nics
		w.nics = nil
		w.guest.sync()
		w.nics = nics
	}},
}

// TestGuestBeliefRules goes through every event that drops beliefs of the
// guest (beliefRules): after what it stands for has happened to the guest
// and the event is noted, one more pass leaves the guest as the netns
// says. A replug needs no event: see TestReplacementNICKeepsGuestRoutesAndNeighbours.
func TestGuestBeliefRules(t *testing.T) {
	for ev, rule := range beliefRules {
		if rule.drops&beliefsGuest == 0 {
			continue
		}
		if !slices.ContainsFunc(beliefCases, func(c beliefCase) bool { return c.event == ev }) {
			t.Errorf("no case for the event %q", ev)
		}
	}
	for _, c := range beliefCases {
		t.Run(c.name, func(t *testing.T) {
			w := neighWorld()
			mustConvergeGuest(t, w)
			changing := w.guest.calls["UpdateInterface"] + w.guest.calls["UpdateRoutes"] + w.guest.calls["AddARPNeighbors"]
			c.happen(t, w)
			lost := len(w.guest.check()) > 0
			if beliefRules[c.event].drops&beliefsGuest == 0 {
				t.Fatalf("cause %q drops no belief of the guest in beliefRules", c.event)
			}
			w.noteGuest(c.event)
			if _, _, err := w.reconcile(guestOn); err != nil {
				t.Fatal(err)
			}
			if bad := w.checkConverged(1); len(bad) > 0 {
				t.Fatalf("one pass after the event:\n%s", joinLines(bad))
			}
			now := w.guest.calls["UpdateInterface"] + w.guest.calls["UpdateRoutes"] + w.guest.calls["AddARPNeighbors"]
			if !lost && c.event != causeAgentFailed && now != changing {
				t.Errorf("the guest had lost nothing, yet %d guest-changing calls were made", now-changing)
			}
		})
	}
}

// The guest state of an endpoint whose belief was dropped is unverified
// until a pass has looked, not configured.
func TestGuestStatusUnverified(t *testing.T) {
	w := podWorld()
	mustConvergeGuest(t, w)
	sb := Sandbox{Agent: agent.URL{Scheme: "unix", Path: "/run/agent.sock"}}
	errAgentDown := errors.New("dial agent unix:///run/agent.sock: connection refused")
	_, eps := guestStatus(sb, w.rec, Outcome{}, nil, nil)
	if eps[0] != GuestConfigured {
		t.Fatalf("converged: guest %q", eps[0])
	}
	dropped := dropGuestBeliefs(&w.rec, []cause{causeReset})
	if !slices.Equal(dropped, []int{0}) {
		t.Errorf("dropped %v, want endpoint 0", dropped)
	}
	unverified := map[int]cause{0: causeReset}
	_, eps = guestStatus(sb, w.rec, Outcome{}, nil, unverified)
	if !strings.HasPrefix(eps[0], GuestUnverified) || !strings.Contains(eps[0], string(causeReset)) {
		t.Errorf("after a reset: guest %q, want %s naming the reset", eps[0], GuestUnverified)
	}
	_, eps = guestStatus(sb, w.rec, Outcome{}, errAgentDown, unverified)
	if !strings.HasPrefix(eps[0], GuestUnverified) || !strings.Contains(eps[0], errAgentDown.Error()) {
		t.Errorf("after a reset, agent unreachable: guest %q, want %s and why", eps[0], GuestUnverified)
	}
}

// TestGuestEventsNoted: each event is noted where it happens — a RESET on
// the VM's monitor, the periodic verify, a failed agent call, an agent
// connection found broken — taken once by the next pass, which drops the
// beliefs, records it, and shows the endpoints unverified until a pass
// confirms them.
func TestGuestEventsNoted(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	store, err := state.Open(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	r := New(store)
	defer r.Close()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	sb := Sandbox{ID: "sb", Netns: filepath.Join(t.TempDir(), "netns"), QMP: "/nonexistent.sock",
		Agent: agent.URL{Scheme: "unix", Path: sock}, GuestTimeout: time.Second}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	sb, _ = r.sandbox("sb")
	var m *vmModel
	withRuntime(r, "sb", func(rt *sandboxRuntime) {
		m = &vmModel{onReset: rt.noteReset}
		rt.model = m
	})
	ctx := context.Background()
	take := func() []cause { return r.takeGuestEvents("sb") }

	if evs := take(); len(evs) != 0 {
		t.Fatalf("nothing happened, yet %v", evs)
	}
	m.event(qmp.Event{Name: "RESET"})
	if evs := take(); !slices.Equal(evs, []cause{causeReset}) {
		t.Errorf("after RESET: %v", evs)
	}
	// A RESET outlives the connection that saw it (replaced before the
	// next pass: a command's timeout, the monitor closed).
	m.event(qmp.Event{Name: "RESET"})
	r.note("sb", causeQMPFailed)
	withRuntime(r, "sb", func(rt *sandboxRuntime) { rt.model = nil })
	if evs := take(); !slices.Equal(evs, []cause{causeReset}) {
		t.Errorf("after RESET and a new connection: %v", evs)
	}
	r.VerifyAll()
	if evs := take(); !slices.Equal(evs, []cause{causeVerify}) {
		t.Errorf("after VerifyAll: %v", evs)
	}
	c, err := r.agentClient(ctx, sb)
	if err != nil {
		t.Fatal(err)
	}
	first, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	r.dropAgent("sb", c)
	if evs := take(); !slices.Equal(evs, []cause{causeAgentFailed}) {
		t.Errorf("after a failed call: %v", evs)
	}
	// The agent goes away (restarts): its end of the connection closes.
	if _, err := r.agentClient(ctx, sb); err != nil {
		t.Fatal(err)
	}
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	deadline := time.Now().Add(10 * time.Second)
	var evs []cause
	for len(evs) == 0 && time.Now().Before(deadline) {
		evs = take()
		time.Sleep(10 * time.Millisecond) // polling for the client to see the close, bounded
	}
	if !slices.Equal(evs, []cause{causeAgentLost}) {
		t.Errorf("after the agent closed the connection: %v", evs)
	}
	// It goes away again, and a pass dials anew before its events are
	// taken: the session's end is noted all the same.
	c, err = r.agentClient(ctx, sb)
	if err != nil {
		t.Fatal(err)
	}
	if conn, err = l.Accept(); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not see the agent close the connection")
	}
	if _, err := r.agentClient(ctx, sb); err != nil {
		t.Fatal(err)
	}
	last, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer last.Close()
	if evs := take(); !slices.Equal(evs, []cause{causeAgentLost}) {
		t.Errorf("after the agent closed the connection and a pass dialled again: %v", evs)
	}

	// A pass takes a noted event once: the beliefs go, on disk too, and the
	// endpoint is unverified until a pass confirms it.
	w := podWorld()
	mustConvergeGuest(t, w)
	rec := w.rec.Clone()
	rec.Sandbox = "sb"
	m.event(qmp.Event{Name: "RESET"})
	s := &session{sb: sb, rec: rec, vm: qmpVM{model: m}}
	if err := r.applyGuestEvents(ctx, s); err != nil {
		t.Fatal(err)
	}
	onDisk, err := store.Load(ctx, "sb")
	if err != nil {
		t.Fatal(err)
	}
	if e, _ := onDisk.Endpoint(0); e.Guest != "" || onDisk.GuestRoutes != "" || onDisk.GuestNeighbors != "" {
		t.Errorf("record after a reset: %+v; want no guest digest left", onDisk)
	}
	if st, _ := r.StatusOf("sb"); !strings.HasPrefix(st.GuestEndpoints[0], GuestUnverified) {
		t.Errorf("status during the pass that took the reset: guest %q, want %s at once", st.GuestEndpoints[0], GuestUnverified)
	}
	if _, eps := r.guestStatus("sb", sb, s.rec, Outcome{}, nil); !strings.HasPrefix(eps[0], GuestUnverified) {
		t.Errorf("after a reset: guest %q, want %s", eps[0], GuestUnverified)
	}
	if err := r.applyGuestEvents(ctx, s); err != nil {
		t.Fatal(err)
	}
	if _, eps := r.guestStatus("sb", sb, s.rec, Outcome{}, nil); !strings.HasPrefix(eps[0], GuestUnverified) {
		t.Errorf("a pass without events, nothing confirmed: guest %q, want still %s", eps[0], GuestUnverified)
	}
	if _, eps := r.guestStatus("sb", sb, w.rec, Outcome{}, nil); eps[0] != GuestConfigured {
		t.Errorf("confirmed again: guest %q, want %s", eps[0], GuestConfigured)
	}
	if _, eps := r.guestStatus("sb", sb, s.rec, Outcome{}, nil); eps[0] != GuestPending {
		t.Errorf("once confirmed, the mark is gone: guest %q, want %s", eps[0], GuestPending)
	}

	// A drop that cannot be recorded stays for the next pass.
	if err := os.RemoveAll(stateDir); err != nil {
		t.Fatal(err)
	}
	m.event(qmp.Event{Name: "RESET"})
	s = &session{sb: sb, rec: w.rec.Clone(), vm: qmpVM{model: m}}
	if err := r.applyGuestEvents(ctx, s); !errors.Is(err, state.ErrStore) {
		t.Errorf("dropping into a state dir that is gone: %v, want state.ErrStore", err)
	}
	if evs := take(); !slices.Equal(evs, []cause{causeReset}) {
		t.Errorf("after a drop that could not be recorded: %v, want the reset again", evs)
	}
}

// A sandbox re-registered with another monitor (another VM) or another
// agent drops what was believed of its guest, as a reset or a lost agent
// session would.
func TestReRegisteredElsewhereDropsBeliefs(t *testing.T) {
	r := newTestReconciler(t)
	sb := Sandbox{ID: "sb", Netns: filepath.Join(t.TempDir(), "netns"), QMP: "/run/vm1/qmp.sock",
		Agent: agent.URL{Scheme: "unix", Path: "/run/vm1/agent.sock"}}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if evs := r.takeGuestEvents("sb"); len(evs) != 0 {
		t.Errorf("registered again unchanged: %v", evs)
	}
	sb.QMP = "/run/vm2/qmp.sock"
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if evs := r.takeGuestEvents("sb"); !slices.Equal(evs, []cause{causeMonitorChanged}) {
		t.Errorf("another monitor: %v, want %q", evs, causeMonitorChanged)
	}
	sb.Agent.Path = "/run/vm2/agent.sock"
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if evs := r.takeGuestEvents("sb"); !slices.Equal(evs, []cause{causeAgentChanged}) {
		t.Errorf("another agent: %v, want %q", evs, causeAgentChanged)
	}
}
