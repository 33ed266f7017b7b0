package reconcile

import (
	"context"
	"fmt"
	"maps"
	"net"

	"github.com/tapsync/tapsync/agent"
)

// closeAgentLocked closes rt's agent connection; r.mu must be held.
func (rt *sandboxRuntime) closeAgentLocked() {
	if rt.agent != nil {
		rt.agent.Close()
		rt.agent = nil
	}
}

// liveAgent returns sandbox id's agent connection while it lives, else nil.
func (r *Reconciler) liveAgent(id string) *agent.Client {
	var c *agent.Client
	r.mu.Lock()
	if rt := r.sandboxes[id]; rt != nil {
		c = rt.agent
	}
	r.mu.Unlock()
	if c == nil || agentGone(c) {
		return nil
	}
	return c
}

// AgentCalls returns how many agent calls were made, by method name
// (ListInterfaces, ListRoutes to look, UpdateInterface, UpdateRoutes,
// AddARPNeighbors to change the guest).
func (r *Reconciler) AgentCalls() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.agentCalls)
}

// agentClient returns the sandbox's live agent connection, dialling one
// when there is none or the last one died.
func (r *Reconciler) agentClient(ctx context.Context, sb Sandbox) (*agent.Client, error) {
	if c := r.liveAgent(sb.ID); c != nil {
		return c, nil
	}
	c, err := agent.Dial(ctx, sb.Agent, sb.GuestTimeout)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		c.Close() // Close has run: nothing else would
		return nil, fmt.Errorf("sandbox %s: connecting to its agent: %w", sb.ID, net.ErrClosed)
	}
	rt := r.sandboxes[sb.ID]
	if rt == nil || rt.sb.Agent != sb.Agent {
		c.Close()
		return nil, fmt.Errorf("sandbox %s: %w while connecting to its agent", sb.ID, ErrUnknownSandbox)
	}
	if rt.agent != nil && agentGone(rt.agent) {
		// The session ended since the last pass took its events: the
		// next pass must not trust what this one could not see end.
		r.noteLocked(sb.ID, causeAgentLost)
	}
	rt.closeAgentLocked()
	rt.agent = c
	return c, nil
}

// agentGone says whether agent connection c has ended.
func agentGone(c *agent.Client) bool {
	select {
	case <-c.Done():
		return true
	default:
		return false
	}
}

// dropAgent closes c if it is still sandbox id's agent connection: after
// a failed call the next pass dials afresh, and asks what the guest has.
func (r *Reconciler) dropAgent(id string, c *agent.Client) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rt := r.sandboxes[id]; rt != nil && rt.agent == c {
		r.noteLocked(id, causeAgentFailed)
	}
}

// countingGuest counts the calls it passes on.
type countingGuest struct {
	*agent.Client
	r *Reconciler
}

func (g countingGuest) count(method string) {
	g.r.mu.Lock()
	g.r.agentCalls[method]++
	g.r.mu.Unlock()
}

func (g countingGuest) UpdateInterface(ctx context.Context, i agent.Interface) (agent.Interface, error) {
	g.count("UpdateInterface")
	return g.Client.UpdateInterface(ctx, i)
}

func (g countingGuest) UpdateRoutes(ctx context.Context, rs []agent.Route) ([]agent.Route, error) {
	g.count("UpdateRoutes")
	return g.Client.UpdateRoutes(ctx, rs)
}

func (g countingGuest) AddARPNeighbors(ctx context.Context, ns []agent.Neighbor) error {
	g.count("AddARPNeighbors")
	return g.Client.AddARPNeighbors(ctx, ns)
}

// agentForPlan returns the passes' agent connection to sandbox s while
// it works, else a connection of the plan's own (closed by closeSession): a
// plan never replaces or drops theirs, so that the next pass still finds
// a lost connection lost (see takeGuestEvents).
func (r *Reconciler) agentForPlan(ctx context.Context, s *session) (*agent.Client, error) {
	if c := r.liveAgent(s.sb.ID); c != nil {
		return c, nil
	}
	c, err := agent.Dial(ctx, s.sb.Agent, s.sb.GuestTimeout)
	if err != nil {
		return nil, err
	}
	s.ownAgent = c
	return c, nil
}
