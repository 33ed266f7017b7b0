package reconcile

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/state"
)

// A belief is a fact tapsync holds between passes without observing it
// each pass. Each is keyed by the identity of what it describes, so that a
// new key (a replug, a new connection) outdates it without anyone
// dropping it; what no key can see is a cause below, and beliefRules says
// what each cause drops. The places where a cause happens call
// noteLocked (for a sandbox) or vmModel.drop (for the model of one
// connection), and both read the table. Two changes of key are made
// where they happen: a replug's plan clears the endpoint's guest digests
// in its reset-guest step before the plug (planner.OpResetGuest; the new
// plug's key, nicKey, would outdate them anyway), and a new connection
// comes with a new model (clientModel) and a new agent session
// (agentClient). A cause noted for a sandbox that changes a key (another
// monitor, another agent) closes the connection holding the old one.
// Not beliefs: an
// endpoint's PlugMTU, the record of our own plug, rewritten at each one;
// the vCPU count, read when an endpoint is made (countQueues).
type belief uint8

const (
	// beliefGuestInterface is Endpoint.Guest: the guest's configuration
	// of an endpoint's NIC, keyed by the NIC plug (index, MAC and plug
	// count; planner's nicKey).
	beliefGuestInterface belief = 1 << iota
	// beliefGuestRoutes is Record.GuestRoutes, keyed by the NIC plugs the
	// routes go through.
	beliefGuestRoutes
	// beliefGuestNeighbors is Record.GuestNeighbors, keyed likewise.
	beliefGuestNeighbors
	// beliefVMModel is the model of the VM (model.go): its NICs, netdevs
	// and slots, keyed by the QMP connection it was read through.
	beliefVMModel
	// beliefAgentSession is the agent connection kept between passes,
	// keyed by the agent's address: the guest's configuration is trusted
	// while that session lasts.
	beliefAgentSession
	// beliefHostFilters is what the netns kept of its links' ingress
	// filters (datapath.Netns.KeepFilters), keyed by the open netns (one
	// opened anew keeps nothing) and, link by link, by the link and tc
	// messages about it (NoteNetlink).
	beliefHostFilters

	beliefsGuest = beliefGuestInterface | beliefGuestRoutes | beliefGuestNeighbors
)

var beliefNames = map[belief]string{
	beliefGuestInterface: "guest interfaces", beliefGuestRoutes: "guest routes", beliefGuestNeighbors: "guest neighbours",
	beliefVMModel: "model of the VM", beliefAgentSession: "agent session", beliefHostFilters: "the netns's filters",
}

func (b belief) String() string {
	var names []string
	for bit := belief(1); bit != 0 && bit <= b; bit <<= 1 {
		if b&bit != 0 {
			names = append(names, beliefNames[bit])
		}
	}
	return strings.Join(names, ", ")
}

// cause is something that may outdate beliefs; its text says what
// happened, in logs and in an endpoint's guest status.
type cause string

const (
	causeReplug         cause = "the NIC was plugged again"
	causeReconnect      cause = "a new QMP connection"
	causeReset          cause = "guest reset (QMP RESET)"
	causeAgentLost      cause = "agent connection lost (the agent may have restarted)"
	causeAgentFailed    cause = "an agent call failed"
	causeVerify         cause = "periodic verify"
	causeQMPFailed      cause = "a QMP command failed or timed out"
	causeQMPEvent       cause = "QEMU reported an event the model does not follow"
	causeContradicted   cause = "QEMU's answer contradicted the model"
	causeRaced          cause = "the VM changed while it was read"
	causePartialPlug    cause = "a plug into a VM whose slots were not read yet"
	causeUnplugUnheard  cause = "an unplug whose end QEMU will not report"
	causeKata           cause = "Kata's links changed, or Kata may have plugged what the pass acts on"
	causeTeardown       cause = "a teardown unplugs without the model"
	causeCutShort       cause = "a pass was cut short (its QMP commands may not have ended)"
	causeMonitorChanged cause = "registered again with another monitor"
	causeAgentChanged   cause = "registered again with another agent"
	causeTCAll          cause = "a netlink message about any link's tc (an action, a shared block), or messages lost"
)

// beliefRule is what one cause does: the beliefs it drops, and those it
// outdates by giving them a new key (nothing to drop: what was believed
// names the old one).
type beliefRule struct{ drops, byKey belief }

// beliefRules is the one table of invalidations. Neighbours cannot be
// listed from the guest: they are sent again with the interface they sit
// on, so only what forgets them for sure (a reset, another VM) drops
// them. A verify keeps the model to compare with what it observes, and
// logs what differed.
var beliefRules = map[cause]beliefRule{
	causeReplug:         {byKey: beliefsGuest},
	causeReconnect:      {byKey: beliefVMModel},
	causeReset:          {drops: beliefsGuest | beliefVMModel},
	causeAgentLost:      {drops: beliefGuestInterface | beliefGuestRoutes | beliefAgentSession},
	causeAgentFailed:    {drops: beliefGuestInterface | beliefGuestRoutes | beliefAgentSession},
	causeVerify:         {drops: beliefGuestInterface | beliefGuestRoutes | beliefVMModel | beliefHostFilters},
	causeQMPFailed:      {drops: beliefVMModel},
	causeQMPEvent:       {drops: beliefVMModel},
	causeContradicted:   {drops: beliefVMModel},
	causeRaced:          {drops: beliefVMModel},
	causePartialPlug:    {drops: beliefVMModel},
	causeUnplugUnheard:  {drops: beliefVMModel},
	causeKata:           {drops: beliefVMModel},
	causeTeardown:       {drops: beliefVMModel},
	causeCutShort:       {drops: beliefVMModel},
	causeMonitorChanged: {drops: beliefsGuest | beliefAgentSession, byKey: beliefVMModel},
	causeAgentChanged:   {drops: beliefGuestInterface | beliefGuestRoutes, byKey: beliefAgentSession},
	causeTCAll:          {drops: beliefHostFilters},
}

// note applies cause c to sandbox id (see noteLocked).
func (r *Reconciler) note(id string, c cause) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.noteLocked(id, c)
}

// noteLocked applies cause c to sandbox id: the model and the agent
// session go now, a connection whose key c changes is closed, and what c
// drops of the guest is noted for the next pass, which drops it from the
// record (applyGuestEvents); r.mu must be held.
func (r *Reconciler) noteLocked(id string, c cause) {
	rt := r.sandboxes[id]
	if rt == nil {
		return
	}
	switch byKey := beliefRules[c].byKey; {
	case byKey&beliefVMModel != 0:
		rt.closeVMLocked() // the monitor, its model, and the agent of its VM
	case byKey&beliefAgentSession != 0:
		rt.closeAgentLocked()
	}
	drops := beliefRules[c].drops
	if drops&beliefVMModel != 0 {
		rt.model.drop(c)
	}
	if drops&beliefAgentSession != 0 {
		rt.closeAgentLocked()
	}
	if drops&beliefsGuest != 0 {
		rt.queueGuestLocked(c)
	}
	if drops&beliefHostFilters != 0 {
		rt.filtersAll = true
	}
}

// queueGuestLocked notes c for the next pass's applyGuestEvents; r.mu
// must be held.
func (rt *sandboxRuntime) queueGuestLocked(c cause) {
	if !slices.Contains(rt.guest.events, c) {
		rt.guest.events = append(rt.guest.events, c)
	}
}

// dropGuestBeliefs drops from rec what the causes drop of the guest, and
// returns the live endpoints whose interface belief went.
func dropGuestBeliefs(rec *state.Record, cs []cause) []int {
	var drop belief
	for _, c := range cs {
		drop |= beliefRules[c].drops
	}
	var dropped []int
	if drop&beliefGuestInterface != 0 {
		for i, e := range rec.Endpoints {
			if e.Guest != "" && !e.Removing {
				dropped = append(dropped, e.Index)
				rec.Endpoints[i].Guest = ""
			}
		}
	}
	if drop&beliefGuestRoutes != 0 {
		rec.GuestRoutes = ""
	}
	if drop&beliefGuestNeighbors != 0 {
		rec.GuestNeighbors = ""
	}
	return dropped
}

// guestWatch is what a sandbox's runtime keeps of its guest between passes.
type guestWatch struct {
	events []cause
	// unverified are the endpoints whose belief a cause dropped and no
	// pass has confirmed since, with the cause.
	unverified map[int]cause
}

// noteReset notes a RESET of the sandbox's VM. It is called from the QMP
// reader (vmModel.event), which must not wait for r.mu (Close waits for
// the reader under it): the mark is atomic, and outlives the connection
// that saw it (a connection replaced before the next pass).
func (rt *sandboxRuntime) noteReset() {
	rt.reset.Store(true)
}

// takeGuestEvents returns and clears what happened to sandbox id's guest
// since its last pass: the events noted, a RESET of its VM, an agent
// connection found broken (it is dropped).
func (r *Reconciler) takeGuestEvents(id string) []cause {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.sandboxes[id]
	if e == nil {
		return nil
	}
	if e.reset.Swap(false) {
		r.noteLocked(id, causeReset)
	}
	if c := e.agent; c != nil && agentGone(c) {
		r.noteLocked(id, causeAgentLost)
	}
	evs := e.guest.events
	e.guest.events = nil
	return evs
}

// applyGuestEvents drops, at the start of a pass, what the events since
// the last pass void of sandbox s's guest, and records it before the pass
// goes on (a crash then leaves no belief that should have gone).
func (r *Reconciler) applyGuestEvents(ctx context.Context, s *session) error {
	evs := r.takeGuestEvents(s.sb.ID)
	if len(evs) == 0 || !s.sb.guestOn() {
		return nil // with the guest off, tapsync keeps no belief of it
	}
	before := s.rec.Clone()
	dropped := dropGuestBeliefs(&s.rec, evs)
	why := make([]string, len(evs))
	for i, ev := range evs {
		why[i] = string(ev)
	}
	joined := cause(strings.Join(why, "; "))
	r.mu.Lock()
	if e := r.sandboxes[s.sb.ID]; e != nil && len(dropped) > 0 {
		if e.guest.unverified == nil {
			e.guest.unverified = map[int]cause{}
		}
		// Status says so now, not when the pass ends: the agent may take
		// its timeout to answer (a guest still booting).
		st := e.status
		st.GuestEndpoints = maps.Clone(st.GuestEndpoints)
		if st.GuestEndpoints == nil {
			st.GuestEndpoints = map[int]string{}
		}
		for _, n := range dropped {
			e.guest.unverified[n] = joined
			st.GuestEndpoints[n] = fmt.Sprintf("%s: %s", GuestUnverified, joined)
		}
		e.status = st
	}
	r.mu.Unlock()
	if before.GuestRoutes == s.rec.GuestRoutes && before.GuestNeighbors == s.rec.GuestNeighbors && len(dropped) == 0 {
		return nil
	}
	ev := zerolog.Ctx(ctx).Info()
	if slices.Equal(evs, []cause{causeVerify}) {
		ev = zerolog.Ctx(ctx).Debug() // routine
	}
	ev.Str("cause", string(joined)).Ints("endpoints", dropped).Msg("what tapsync knew of the guest is unverified: asking its agent again")
	if err := r.store.Save(s.rec); err != nil {
		r.mu.Lock()
		if e := r.sandboxes[s.sb.ID]; e != nil { // for the next pass: the record still has the beliefs
			for _, c := range evs {
				e.queueGuestLocked(c)
			}
		}
		r.mu.Unlock()
		return fmt.Errorf("sandbox %s: record the guest unverified: %w", s.sb.ID, err)
	}
	return nil
}

// guestStatus describes the guest side of a sandbox after a pass, and
// forgets the unverified marks of the endpoints the pass confirmed.
func (r *Reconciler) guestStatus(id string, sb Sandbox, rec state.Record, out Outcome, guestErr error) (string, map[int]string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var unverified map[int]cause
	if e := r.sandboxes[id]; e != nil {
		for n := range e.guest.unverified {
			if ep, ok := rec.Endpoint(n); !ok || ep.Removing || ep.Guest != "" {
				delete(e.guest.unverified, n)
			}
		}
		unverified = maps.Clone(e.guest.unverified)
	}
	return guestStatus(sb, rec, out, guestErr, unverified)
}

// guestStatus describes the guest side of a sandbox after a pass, given
// the endpoints whose belief was dropped and not confirmed since.
func guestStatus(sb Sandbox, rec state.Record, out Outcome, guestErr error, unverified map[int]cause) (string, map[int]string) {
	sandbox := ""
	switch {
	case !sb.guestOn():
		sandbox = "off: " + sb.GuestOff
	case guestErr != nil:
		sandbox = "agent unreachable: " + guestErr.Error()
	}
	eps := map[int]string{}
	for _, e := range rec.Endpoints {
		if e.Removing {
			continue
		}
		err, failed := out.Failed[e.Index]
		cause, dropped := unverified[e.Index]
		switch {
		case !sb.guestOn():
			eps[e.Index] = "off"
		case failed && errors.Is(err, ErrGuestLinkMissing):
			eps[e.Index] = "waiting for the link: " + err.Error()
		case failed:
			eps[e.Index] = "failed: " + err.Error()
		case e.Guest != "" && guestErr == nil:
			eps[e.Index] = GuestConfigured
		case dropped && e.Guest == "" && guestErr != nil:
			eps[e.Index] = fmt.Sprintf("%s: %s; %s", GuestUnverified, cause, sandbox)
		case dropped && e.Guest == "":
			eps[e.Index] = fmt.Sprintf("%s: %s", GuestUnverified, cause)
		case guestErr != nil:
			eps[e.Index] = sandbox
		default:
			eps[e.Index] = GuestPending
		}
	}
	return sandbox, eps
}
