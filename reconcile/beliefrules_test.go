package reconcile

import (
	"bufio"
	"context"
	"go/ast"
	"go/parser"
	"go/token"
	"net"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

// beliefRig is one registered sandbox holding every belief: a known
// model of its VM, a live agent session, and a record whose guest
// interface, routes and neighbours are believed configured.
type beliefRig struct {
	t    *testing.T
	r    *Reconciler
	sb   Sandbox
	m    *vmModel
	l    net.Listener
	conn net.Conn // the agent's end of the session
	// qmpEnds hands over the monitor's end of each QMP connection.
	qmpEnds <-chan net.Conn
	rec     state.Record
}

func newBeliefRig(t *testing.T) *beliefRig {
	t.Helper()
	store, err := state.Open(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	g := &beliefRig{t: t, r: New(store)}
	t.Cleanup(g.r.Close)
	sock := filepath.Join(t.TempDir(), "agent.sock")
	if g.l, err = net.Listen("unix", sock); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.l.Close() })
	g.sb = Sandbox{ID: "sb", Netns: filepath.Join(t.TempDir(), "netns"), QMP: g.monitor(),
		Agent: agent.URL{Scheme: "unix", Path: sock}, GuestTimeout: time.Second}
	if _, err := g.r.Register(g.sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	g.sb, _ = g.r.sandbox("sb")
	// The connection's model, as its first reading would leave it.
	_, m, err := g.r.clientModel(context.Background(), g.sb)
	if err != nil {
		t.Fatal(err)
	}
	g.m = m
	m.mu.Lock()
	m.known, m.read = true, true
	m.nics = []qmp.NICInfo{{ID: qmp.DeviceID(0), Index: 0, Owned: true, QOMPath: "/machine/peripheral/" + qmp.DeviceID(0), Bus: "pci-bridge-0", Addr: "1.0"}}
	m.mu.Unlock()
	if _, err := g.r.agentClient(context.Background(), g.sb); err != nil {
		t.Fatal(err)
	}
	if g.conn, err = g.l.Accept(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.conn.Close() })
	g.rec = state.Record{Sandbox: "sb", Endpoints: []state.Endpoint{{Index: 0, Guest: "confirmed", Plugs: 1}},
		GuestRoutes: "confirmed", GuestNeighbors: "confirmed"}
	return g
}

// monitor serves a QMP socket that greets, accepts qmp_capabilities and
// then answers nothing; g.qmpEnd is the monitor's end of the last
// connection. Closing it is QEMU ending the connection.
func (g *beliefRig) monitor() string {
	sock := filepath.Join(g.t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { l.Close() })
	ends := make(chan net.Conn, 4)
	g.qmpEnds = ends
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			g.t.Cleanup(func() { c.Close() })
			_, _ = c.Write([]byte(`{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}` + "\n"))
			if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
				_, _ = c.Write([]byte(`{"return": {}, "id": "0"}` + "\n"))
			}
			ends <- c
		}
	}()
	return sock
}

// held is what the sandbox still believes, as the next pass would find
// it: the guest's beliefs once that pass has taken what was noted.
func (g *beliefRig) held() belief {
	rec := g.rec.Clone()
	dropGuestBeliefs(&rec, g.r.takeGuestEvents("sb"))
	var b belief
	if rec.Endpoints[0].Guest != "" {
		b |= beliefGuestInterface
	}
	if rec.GuestRoutes != "" {
		b |= beliefGuestRoutes
	}
	if rec.GuestNeighbors != "" {
		b |= beliefGuestNeighbors
	}
	withRuntime(g.r, "sb", func(rt *sandboxRuntime) {
		if _, m := rt.liveLocked(); m != nil && m.usable() {
			b |= beliefVMModel
		}
		if rt.agent != nil && !agentGone(rt.agent) {
			b |= beliefAgentSession
		}
		if !rt.filtersAll {
			b |= beliefHostFilters // what the next pass's netns reads again: the links noted only
		}
	})
	return b
}

// beliefCauses makes each cause happen through the code where it
// happens: an event from QEMU, an agent call that failed, a registration.
// Where that code needs a running QEMU, the case calls what it calls
// (vmModel.drop with its cause), and the test named there covers the
// site with one.
var beliefCauses = map[cause]func(g *beliefRig){
	causeReset:    func(g *beliefRig) { g.m.event(qmp.Event{Name: "RESET"}) },
	causeQMPEvent: func(g *beliefRig) { g.m.event(qmp.Event{Name: "MEMORY_DEVICE_SIZE_CHANGE"}) },
	causeAgentLost: func(g *beliefRig) {
		g.conn.Close() // the agent restarts: its end closes
		withRuntime(g.r, "sb", func(rt *sandboxRuntime) { g.agentDone(rt.agent) })
	},
	causeAgentFailed: func(g *beliefRig) {
		var c *agent.Client
		withRuntime(g.r, "sb", func(rt *sandboxRuntime) { c = rt.agent })
		g.r.dropAgent("sb", c)
	},
	causeVerify:    func(g *beliefRig) { g.r.Verify("sb") },
	causeTCAll:     func(g *beliefRig) { g.r.NoteNetlink("sb", Netlink{TCStale: -1}) },
	causeQMPFailed: func(g *beliefRig) { g.r.note("sb", causeQMPFailed) }, // vm.go's sites: TestModelErrorObservesFully
	causeTeardown:  func(g *beliefRig) { g.r.note("sb", causeTeardown) },
	causeCutShort: func(g *beliefRig) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := g.r.Reconcile(ctx, "sb"); err == nil {
			g.t.Fatal("a pass with its context ended succeeded")
		}
		if why := g.m.outdated(); why != causeCutShort {
			g.t.Errorf("the model of a pass cut short is outdated by %q", why)
		}
	},
	causeContradicted: func(g *beliefRig) {
		// AddNIC found NIC 0 made already, at another place than the model's.
		g.m.plugged(qmp.NICInfo{ID: qmp.DeviceID(0), Index: 0, Owned: true, QOMPath: "/machine/peripheral/" + qmp.DeviceID(0), Bus: "pci-bridge-0", Addr: "2.0"})
	},
	causePartialPlug: func(g *beliefRig) {
		g.m.mu.Lock()
		g.m.partial = true
		g.m.mu.Unlock()
		g.m.plugged(qmp.NICInfo{ID: qmp.DeviceID(1), Index: 1, Owned: true, Bus: "pci-bridge-0", Addr: "3.0"})
	},
	causeRaced:         func(g *beliefRig) { g.m.drop(causeRaced) },         // complete(): TestRestartPassCommands
	causeUnplugUnheard: func(g *beliefRig) { g.m.drop(causeUnplugUnheard) }, // UnplugNICs over HMP
	causeKata:          func(g *beliefRig) { g.m.drop(causeKata) },          // session.observe: e2e TestKataWiring
	causeMonitorChanged: func(g *beliefRig) {
		sb := g.sb
		sb.QMP = "/run/vm2/qmp.sock"
		if _, err := g.r.Register(sb, SourceConfig); err != nil {
			g.t.Fatal(err)
		}
	},
	causeAgentChanged: func(g *beliefRig) {
		sb := g.sb
		sb.Agent.Path += ".2"
		if _, err := g.r.Register(sb, SourceConfig); err != nil {
			g.t.Fatal(err)
		}
	},
	// Keyed: QEMU ends the connection, and its model goes with it; the
	// next connection's model starts unknown.
	causeReconnect: func(g *beliefRig) {
		var c *qmp.Client
		withRuntime(g.r, "sb", func(rt *sandboxRuntime) { c = rt.conn })
		(<-g.qmpEnds).Close()
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			g.t.Fatal("the QMP connection did not see QEMU's end close")
		}
		if _, _, err := g.r.clientModel(context.Background(), g.sb); err != nil {
			g.t.Fatal(err)
		}
	},
	// Keyed: a replug is seen by the planner, with the world of
	// TestReplacementNICKeepsGuestRoutesAndNeighbours; here nothing
	// happens, and nothing may be dropped.
	causeReplug: func(g *beliefRig) {},
}

// agentDone waits until agent connection c has seen its end.
func (g *beliefRig) agentDone(c *agent.Client) {
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		g.t.Fatal("the agent connection did not see the agent's end close")
	}
}

// TestBeliefRules enumerates the invalidation table: every cause declared
// in beliefs.go has a rule, and, made to happen where it happens, drops
// exactly what its rule says — what it drops or outdates by key goes,
// every other belief stays. A replug's own check is
// TestReplacementNICKeepsGuestRoutesAndNeighbours (the guest is told
// again for the new plug).
func TestBeliefRules(t *testing.T) {
	for _, c := range declaredCauses(t) {
		if _, ok := beliefRules[c]; !ok {
			t.Errorf("cause %q is declared but has no rule in beliefRules", c)
		}
		if _, ok := beliefCauses[c]; !ok {
			t.Errorf("cause %q has no case in beliefCauses", c)
		}
	}
	all := beliefsGuest | beliefVMModel | beliefAgentSession | beliefHostFilters
	for c, happen := range beliefCauses {
		t.Run(string(c), func(t *testing.T) {
			g := newBeliefRig(t)
			if got := g.held(); got != all {
				t.Fatalf("before: held %v, want %v", got, all)
			}
			happen(g)
			// The agent connection goes after a cause has dropped it;
			// to the next pass only, through an agent that closed.
			rule := beliefRules[c]
			gone := rule.drops
			if c == causeReplug {
				gone = 0
			} else {
				gone |= rule.byKey
			}
			want := all &^ gone
			if got := g.held(); got != want {
				t.Errorf("after %q: held %v; want %v (dropped: %v)", c, got, want, all&^got)
			}
		})
	}
}

// declaredCauses lists the constants of type cause declared in
// beliefs.go, so that a cause added without a rule fails the test.
func declaredCauses(t *testing.T) []cause {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "beliefs.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []cause
	for _, d := range f.Decls {
		gd, ok := d.(*ast.GenDecl)
		if !ok || gd.Tok != token.CONST {
			continue
		}
		for _, spec := range gd.Specs {
			vs := spec.(*ast.ValueSpec)
			if id, ok := vs.Type.(*ast.Ident); !ok || id.Name != "cause" {
				continue
			}
			for _, v := range vs.Values {
				lit, ok := v.(*ast.BasicLit)
				if !ok {
					t.Fatalf("a cause that is not a string literal: %v", v)
				}
				s, err := strconv.Unquote(lit.Value)
				if err != nil {
					t.Fatal(err)
				}
				out = append(out, cause(s))
			}
		}
	}
	if len(out) == 0 {
		t.Fatal("no cause declared in beliefs.go")
	}
	return out
}
