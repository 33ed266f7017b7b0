package reconcile

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testagent"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/vishvananda/netns"
)

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	accepted atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

// startTestAgent serves the test agent on a unix socket for a "guest"
// that is a throwaway netns holding a link with mac, and returns its
// address and listener.
func startTestAgent(t *testing.T, mac net.HardwareAddr) (agent.URL, *countingListener) {
	t.Helper()
	guest := testnet.NewNS(t, "tapsync-guest")
	testnet.IP(t, "-n", guest.Name, "link", "add", "g0", "address", mac.String(), "type", "veth", "peer", "name", "g1")
	h, err := netns.GetFromPath(guest.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	srv, err := testagent.NewServerAt(h)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: l}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, cl) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("agent: %v", err)
		}
		srv.Close()
	})
	return agent.URL{Scheme: agent.SchemeUnix, Path: path}, cl
}

// passState is what passes keep of a sandbox between them and a plan
// must leave alone: the kept netns, the agent connection, the Kata links
// the model last saw.
type passState struct {
	host      *datapath.Netns
	agent     *agent.Client
	kataLinks string
}

func (g *modelRig) passState() passState {
	var st passState
	var m *vmModel
	withRuntime(g.r, g.sb.ID, func(rt *sandboxRuntime) {
		if rt != nil {
			st.host, st.agent, m = rt.host, rt.agent, rt.model
		}
	})
	if m != nil {
		m.mu.Lock()
		st.kataLinks = m.kataLinks
		m.mu.Unlock()
	}
	return st
}

// `tapsync plan` while a pass runs waits for it, and leaves what passes
// keep as it found it. Mid-pass, Kata plugs a link (a tap0_kata appears),
// the pod's link gets an address and the agent's connection drops. A plan
// that ran beside the pass kept a netns of its own (the pass's was then
// closed), recorded the Kata links (the next pass saw no change and
// trusted a model Kata had gone around) and dialled the agent in place of
// the dropped connection (the pass never learnt that it was lost).
func TestPlanWaitsForThePass(t *testing.T) {
	g := newModelRig(t, 1)
	url, agentConns := startTestAgent(t, macN(1))
	g.sb.Agent = url
	if _, err := g.r.Register(g.sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	converge(t, g.ctx, g.r, g.sb.ID)
	before := g.passState()
	if before.host == nil || before.agent == nil {
		t.Fatalf("after a pass with the guest side: kept netns %v, agent %v; want both", before.host, before.agent)
	}
	dials := agentConns.accepted.Load()

	planned := make(chan Plan, 1)
	waiting := make(chan struct{}, 1)
	g.r.passWait = func(string) {
		select {
		case waiting <- struct{}{}:
		default:
		}
	}
	t.Cleanup(func() { g.r.passWait = nil })
	g.r.afterObserve = func(id string) {
		g.r.afterObserve = nil
		inPass := g.passState()
		testnet.IP(t, "-n", g.ns.Name, "tuntap", "add", "dev", "tap0_kata", "mode", "tap")
		testnet.IP(t, "-n", g.ns.Name, "addr", "add", "10.9.0.5/24", "dev", "net0")
		before.agent.Close()
		select { // Done follows Close from the connection's reader
		case <-before.agent.Done():
		case <-time.After(time.Minute):
			t.Error("the agent connection closed is not done within a minute")
		}
		go func() {
			p, err := g.r.Plan(g.ctx, id)
			if err != nil {
				t.Errorf("plan: %v", err)
			}
			planned <- p
		}()
		select {
		case <-waiting:
		case p := <-planned:
			planned <- p
			t.Error("the plan ran while a pass was under way")
		case <-time.After(time.Minute):
			t.Error("the plan neither ran nor waited for the pass within a minute")
		}
		if during := g.passState(); during != inPass {
			t.Errorf("a plan during a pass changed what the pass keeps:\n in pass %+v\n after   %+v", inPass, during)
		}
	}
	t.Cleanup(func() { g.r.afterObserve = nil })
	if _, err := g.pass(t); err != nil {
		t.Fatalf("pass: %v\n%s", err, g.log)
	}
	afterPass := g.passState()
	var p Plan
	select {
	case p = <-planned:
	case <-time.After(time.Minute):
		t.Fatal("the plan did not end within a minute of the pass")
	}
	if !strings.Contains(p.String(), "configure guest interface net0") || !strings.Contains(p.String(), "10.9.0.5/24") {
		t.Errorf("the plan after the pass does not configure the new address:\n%s", p)
	}
	after := g.passState()
	switch {
	case after.host != before.host:
		t.Errorf("kept netns %p after the pass and the plan, want %p, the one the passes use", after.host, before.host)
	case after.kataLinks != before.kataLinks:
		t.Errorf("the model remembers Kata links %q after the plan, want %q (what the pass saw)", after.kataLinks, before.kataLinks)
	case after.agent == nil || after.agent == before.agent:
		t.Errorf("agent connection %p after the pass, want a new one (the old one %p dropped)", after.agent, before.agent)
	}
	if afterPass.agent != nil && after.agent != afterPass.agent {
		t.Errorf("the plan replaced the pass's agent connection %p by %p", afterPass.agent, after.agent)
	}
	// One dial: the pass's, for the connection found lost. The plan used it.
	if n := agentConns.accepted.Load() - dials; n != 1 {
		t.Errorf("%d agent connections since the first pass, want 1 (the pass's)", n)
	}
	// The next pass sees the Kata link as new, and reads QEMU again.
	if cmds, err := g.pass(t); err != nil || cmds == 0 {
		t.Errorf("pass after Kata's link appeared: %d QMP commands, %v; want a full observation", cmds, err)
	}

	// Between passes alike: Kata plugs another link, the pod's link gets
	// another address, the agent's connection drops, and a plan leaves it
	// all for the next pass to find.
	between := g.passState()
	testnet.IP(t, "-n", g.ns.Name, "tuntap", "add", "dev", "tap1_kata", "mode", "tap")
	testnet.IP(t, "-n", g.ns.Name, "addr", "add", "10.9.1.5/24", "dev", "net0")
	between.agent.Close()
	<-between.agent.Done()
	dials = agentConns.accepted.Load()
	if _, err := g.r.Plan(g.ctx, g.sb.ID); err != nil {
		t.Fatal(err)
	}
	if st := g.passState(); st != between {
		t.Errorf("a plan between passes changed what they keep:\n before %+v\n after  %+v", between, st)
	}
	if n := agentConns.accepted.Load() - dials; n != 1 {
		t.Errorf("the plan made %d agent connections, want 1 of its own", n)
	}
}
