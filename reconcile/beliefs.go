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

// What tapsync believes of the guest without looking (the digests of
// planner/guest.go) names the NIC plugs it describes, so a replug outdates it by
// key. What no key can see is an event below: noted when it happens,
// applied at the start of the next pass by dropGuestBeliefs, the one place
// where beliefs of the guest are dropped. That pass asks the agent what
// the guest has and confirms or repairs it; until one has, the endpoint's
// guest is unverified.

// guestEvent is something that may have changed the guest behind
// tapsync's back.
type guestEvent string

const (
	eventReset       guestEvent = "guest reset (QMP RESET)"
	eventAgentLost   guestEvent = "agent connection lost (the agent may have restarted)"
	eventAgentFailed guestEvent = "an agent call failed"
	eventVerify      guestEvent = "periodic verify"
)

// guestBelief is a kind of fact kept of the guest.
type guestBelief uint8

const (
	beliefInterfaces guestBelief = 1 << iota // Endpoint.Guest
	beliefRoutes                             // Record.GuestRoutes
	beliefNeighbors                          // Record.GuestNeighbors
)

// guestDrops is what each event drops. Neighbours cannot be listed: they
// are sent again with the interface they sit on (see the planner's planGuest), so only
// a reset, which forgets them for sure, drops them outright. A replug
// needs no entry (keys), nor does a new QMP connection: the guest does not
// change with it (a RESET seen on the old one is kept: noteReset).
var guestDrops = map[guestEvent]guestBelief{
	eventReset:       beliefInterfaces | beliefRoutes | beliefNeighbors,
	eventAgentLost:   beliefInterfaces | beliefRoutes,
	eventAgentFailed: beliefInterfaces | beliefRoutes,
	eventVerify:      beliefInterfaces | beliefRoutes,
}

// dropGuestBeliefs drops from rec what the events void, and returns the
// live endpoints whose interface belief went.
func dropGuestBeliefs(rec *state.Record, evs []guestEvent) []int {
	var drop guestBelief
	for _, ev := range evs {
		drop |= guestDrops[ev]
	}
	var dropped []int
	if drop&beliefInterfaces != 0 {
		for i, e := range rec.Endpoints {
			if e.Guest != "" && !e.Removing {
				dropped = append(dropped, e.Index)
				rec.Endpoints[i].Guest = ""
			}
		}
	}
	if drop&beliefRoutes != 0 {
		rec.GuestRoutes = ""
	}
	if drop&beliefNeighbors != 0 {
		rec.GuestNeighbors = ""
	}
	return dropped
}

// guestWatch is what a sandbox's runtime keeps of its guest between passes.
type guestWatch struct {
	events []guestEvent
	// unverified are the endpoints whose belief an event dropped and no
	// pass has confirmed since, with the event.
	unverified map[int]guestEvent
}

// noteGuestLocked notes ev for sandbox id's next pass; r.mu must be held.
func (r *Reconciler) noteGuestLocked(id string, ev guestEvent) {
	if e := r.sandboxes[id]; e != nil && !slices.Contains(e.guest.events, ev) {
		e.guest.events = append(e.guest.events, ev)
	}
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
func (r *Reconciler) takeGuestEvents(id string) []guestEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.sandboxes[id]
	if e == nil {
		return nil
	}
	if e.reset.Swap(false) {
		r.noteGuestLocked(id, eventReset)
	}
	if c := e.agent; c != nil && agentGone(c) {
		e.closeAgentLocked()
		r.noteGuestLocked(id, eventAgentLost)
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
		return nil
	}
	before := s.rec.Clone()
	dropped := dropGuestBeliefs(&s.rec, evs)
	why := make([]string, len(evs))
	for i, ev := range evs {
		why[i] = string(ev)
	}
	cause := guestEvent(strings.Join(why, "; "))
	r.mu.Lock()
	if e := r.sandboxes[s.sb.ID]; e != nil && len(dropped) > 0 {
		if e.guest.unverified == nil {
			e.guest.unverified = map[int]guestEvent{}
		}
		// Status says so now, not when the pass ends: the agent may take
		// its timeout to answer (a guest still booting).
		st := e.status
		st.GuestEndpoints = maps.Clone(st.GuestEndpoints)
		if st.GuestEndpoints == nil {
			st.GuestEndpoints = map[int]string{}
		}
		for _, n := range dropped {
			e.guest.unverified[n] = cause
			st.GuestEndpoints[n] = fmt.Sprintf("%s: %s", GuestUnverified, cause)
		}
		e.status = st
	}
	r.mu.Unlock()
	if before.GuestRoutes == s.rec.GuestRoutes && before.GuestNeighbors == s.rec.GuestNeighbors && len(dropped) == 0 {
		return nil
	}
	ev := zerolog.Ctx(ctx).Info()
	if slices.Equal(evs, []guestEvent{eventVerify}) {
		ev = zerolog.Ctx(ctx).Debug() // routine
	}
	ev.Str("cause", string(cause)).Ints("endpoints", dropped).Msg("what tapsync knew of the guest is unverified: asking its agent again")
	if err := r.store.Save(s.rec); err != nil {
		r.mu.Lock()
		for _, ev := range evs { // for the next pass: the record still has the beliefs
			r.noteGuestLocked(s.sb.ID, ev)
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
	var unverified map[int]guestEvent
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
func guestStatus(sb Sandbox, rec state.Record, out Outcome, guestErr error, unverified map[int]guestEvent) (string, map[int]string) {
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
