package reconcile

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
)

// planWithGuest computes the plan, asking the agent for the guest's state
// only when the record cannot show the guest converged. It returns the
// agent to apply the plan with (nil when the plan needs none), and the
// reason the guest side could not be reached: then the plan has no guest
// steps and the host side goes ahead alone. known, when not nil, is the
// plan of s as it stands, computed already.
func (r *Reconciler) planWithGuest(ctx context.Context, s *session, known *Plan) (Plan, Guest, *agent.Client, error) {
	opts := s.options()
	var p Plan
	if known != nil {
		p = *known
	} else {
		p = Compute(s.obs, s.rec, opts)
	}
	if !slices.ContainsFunc(p.Actions, func(a Action) bool { return a.Op.Guestward() }) {
		return p, nil, nil, nil
	}
	var c *agent.Client
	var err error
	if s.forPlan {
		c, err = r.agentForPlan(ctx, s)
	} else {
		c, err = r.agentClient(ctx, s.sb)
	}
	if err == nil && p.NeedsGuest() {
		var g GuestState
		cg := countingGuest{Client: c, r: r}
		cg.count("ListInterfaces")
		if g.Interfaces, err = c.ListInterfaces(ctx); err == nil {
			cg.count("ListRoutes")
			g.Routes, err = c.ListRoutes(ctx)
		}
		if err == nil {
			s.obs.Guest = &g
			p = Compute(s.obs, s.rec, opts)
		} else if !s.forPlan {
			r.dropAgent(s.sb.ID, c)
		}
	}
	if err != nil {
		opts.Guest = false
		return Compute(s.obs, s.rec, opts), nil, nil, err
	}
	return p, countingGuest{Client: c, r: r}, c, nil
}

// Plan computes what a reconcile of sandbox id would do now, changing
// nothing. It waits for a pass under way, or for ctx to end, so that it
// never plans from a sandbox half-changed. What passes keep between them
// (the netns, the model of the VM, the agent connection) it reads and
// leaves as it found it, but for a monitor connection it had to dial,
// which it keeps for the passes (a monitor takes one client).
func (r *Reconciler) Plan(ctx context.Context, id string) (Plan, error) {
	_, release, err := r.lockPass(ctx, id)
	if err != nil {
		return Plan{}, err
	}
	defer release()
	s, err := r.open(ctx, id, true)
	if err != nil {
		return Plan{}, err
	}
	defer r.closeSession(s)
	p, _, _, err := r.planWithGuest(ctx, s, nil)
	if err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Str("sandbox", id).Msg("plan without the guest side: agent unreachable")
	}
	return p, nil
}

// maxLinksGone bounds the deletions noted per sandbox between two
// observations; past it the rest are not noted (the queue's re-run after
// the pass still sees them).
const maxLinksGone = 32

// Netlink is what one netlink message about a sandbox's netns tells its
// next observation: a link deleted (LinkGone, its ifindex; 0: none) and
// the links whose tc may have changed (TCStale: a link message or a tc
// message names its link; below 0 every link's, see causeTCAll; 0: none).
type Netlink struct {
	LinkGone int
	TCStale  int
}

// NoteNetlink tells the reconciler what a netlink message about sandbox
// id's netns says; it does not block.
//   - A pass whose observation still lists a deleted link observes again,
//     once, before it acts.
//   - The next observation dumps the ingress filters of a link whose tc
//     may have changed again (see KeepFilters).
func (r *Reconciler) NoteNetlink(id string, m Netlink) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.sandboxes[id]
	if !ok {
		return
	}
	if g := m.LinkGone; g > 0 && len(e.linksGone) < maxLinksGone && !slices.Contains(e.linksGone, g) {
		e.linksGone = append(e.linksGone, g)
	}
	switch c := m.TCStale; {
	case c == 0:
	case c < 0 || len(e.filtersChanged) >= maxLinksGone:
		r.noteLocked(id, causeTCAll)
	case !slices.Contains(e.filtersChanged, c):
		e.filtersChanged = append(e.filtersChanged, c)
	}
}

// passFiltersChanged hands what was noted of sandbox id's tc since its
// last observation to h, which is about to observe.
func (r *Reconciler) passFiltersChanged(id string, h *datapath.Netns) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.sandboxes[id]
	if !ok {
		h.ForgetFilters()
		return
	}
	if e.filtersAll {
		h.ForgetFilters()
	}
	for _, i := range e.filtersChanged {
		h.FiltersChanged(i)
	}
	e.filtersChanged, e.filtersAll = e.filtersChanged[:0], false
}

// takeLinksGone returns and clears the deletions noted for sandbox id.
func (r *Reconciler) takeLinksGone(id string) []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.sandboxes[id]
	if !ok {
		return nil
	}
	gone := e.linksGone
	e.linksGone = nil
	return gone
}

// Reconcile runs one observe → plan → apply → record pass over sandbox
// id.
func (r *Reconciler) Reconcile(ctx context.Context, id string) (err error) {
	log := zerolog.Ctx(ctx).With().Str("sandbox", id).Logger()
	ctx = log.WithContext(ctx)
	release, err := r.beginPass(ctx, id)
	if err != nil {
		return err
	}
	defer release()
	var st Status
	waiting := false // the pass ended waiting for the guest or QEMU, not failed
	defer func() {
		st.LastReconcile = time.Now()
		if err != nil {
			st.LastError = err.Error()
			switch {
			case waiting:
			case ctx.Err() != nil:
				r.note(id, causeCutShort)
			case isQMP(err):
				// A failed QMP command drops the model itself (qmpVM);
				// this is the safety net for what failed around one.
				r.note(id, causeQMPFailed)
			}
		}
		r.mu.Lock()
		if rt := r.sandboxes[id]; rt != nil {
			if errors.Is(err, ErrConnecting) {
				// Nothing was observed: what the last pass found stands.
				last := rt.status
				last.LastReconcile, last.LastError = st.LastReconcile, st.LastError
				st = last
			}
			rt.status = st
		}
		r.mu.Unlock()
	}()
	r.takeLinksGone(id) // the observation below sees the deletions before it
	s, err := r.open(ctx, id, false)
	if err != nil {
		// Its QMP failures say so themselves (CauseOf looks first).
		return WithCause(CauseNetns, err)
	}
	defer func() { r.keepHost(id, s.host, keepable(err)) }()
	if r.afterObserve != nil {
		r.afterObserve(id)
	}
	if err := r.applyGuestEvents(ctx, s); err != nil {
		return err
	}
	var first *Plan // the plan readFully computed, while the observation stands
	read, err := s.readFully(ctx, func() Plan {
		p := Compute(s.obs, s.rec, s.options())
		first = &p
		return p
	})
	if err != nil {
		return WithCause(CauseNetns, fmt.Errorf("sandbox %s: observe: %w", id, err))
	}
	if read {
		first = nil
	}
	p, guest, client, guestErr := r.planWithGuest(ctx, s, first)
	if gone := r.takeLinksGone(id); s.obs.Lists(gone) {
		// Once: a netns whose links keep going is left to the queue's
		// re-run.
		log.Debug().Ints("links_gone", gone).Msg("a link observed has been deleted since: observing again before acting")
		if err := s.observe(ctx); err != nil {
			return WithCause(CauseNetns, fmt.Errorf("sandbox %s: observe: %w", id, err))
		}
		p, guest, client, guestErr = r.planWithGuest(ctx, s, nil)
	}
	if again, err := s.readFully(ctx, func() Plan { return p }); err != nil {
		return WithCause(CauseNetns, fmt.Errorf("sandbox %s: observe: %w", id, err))
	} else if again {
		p, guest, client, guestErr = r.planWithGuest(ctx, s, nil)
	}
	st.Skipped, st.Notes = p.Skipped, p.Notes
	r.logSkipped(log, id, p.Skipped)
	env := Env{Host: s.host, VM: s.vm, Guest: guest, Recorder: r.store, Vhost: s.sb.Vhost, AfterAction: r.AfterAction,
		GuestLinkWait: s.sb.GuestTimeout, Refresh: s.refresh}
	rec, out, err := Apply(ctx, p, s.rec, s.obs, env)
	st.Mutations, st.Pending, st.Held, st.Endpoints = out.Mutations, out.Pending, out.Held, rec.Endpoints
	if client != nil && out.GuestFailed {
		r.dropAgent(id, client) // a call failed or timed out: dial afresh next time
	}
	st.Guest, st.GuestEndpoints = r.guestStatus(id, s.sb, rec, out, guestErr)
	r.logGuest(log, id, guestErr)
	switch {
	case !p.Empty() && err == nil:
		log.Info().Int("actions", len(p.Actions)).Int("mutations", out.Mutations).Ints("pending", out.Pending).Msg("reconciled")
	case !p.Empty():
		// The queue's work function logs failures, once per distinct error
		// rather than per pass (see FailureLog).
		log.Debug().Int("actions", len(p.Actions)).Int("mutations", out.Mutations).Ints("pending", out.Pending).Err(err).Msg("pass failed")
	}
	if err != nil {
		cause := CauseNetns
		if linkVanished(err) {
			cause = CauseChanged
		}
		return WithCause(cause, fmt.Errorf("sandbox %s: %w", id, errors.Join(err, guestErr)))
	}
	if guestErr != nil {
		// The host side is done; the guest's is retried with backoff.
		return WithCause(CauseAgent, fmt.Errorf("sandbox %s: guest agent at %s: %w", id, s.sb.Agent, guestErr))
	}
	waiting = true // the model followed every unplug's outcome
	if len(out.Pending) > 0 {
		// Not a failure, but not done: come back (with backoff) until the
		// guest acknowledges, in case its DEVICE_DELETED is missed.
		return WithCause(CauseWaiting, fmt.Errorf("sandbox %s: unplug of endpoints %v pending", id, out.Pending))
	}
	if len(out.Held) > 0 {
		return WithCause(CauseWaiting, fmt.Errorf("sandbox %s: plug of endpoints %v held until the NICs they replace are gone", id, out.Held))
	}
	return nil
}

// logGuest logs an unreachable agent once per distinct error, and its
// recovery.
func (r *Reconciler) logGuest(log zerolog.Logger, id string, guestErr error) {
	msg := ""
	if guestErr != nil {
		msg = guestErr.Error()
	}
	prev := ""
	r.mu.Lock()
	if rt := r.sandboxes[id]; rt != nil {
		prev, rt.guestLog = rt.guestLog, msg
	}
	r.mu.Unlock()
	switch {
	case msg == prev:
	case msg != "":
		log.Warn().Err(guestErr).Msg("guest agent unreachable: the host side is wired, the guest's is retried with backoff")
	default:
		log.Info().Msg("guest agent reachable again")
	}
}

// logSkipped explains skipped links once, when the set changes.
func (r *Reconciler) logSkipped(log zerolog.Logger, id string, skipped []Skipped) {
	var prev []Skipped
	r.mu.Lock()
	if rt := r.sandboxes[id]; rt != nil {
		prev = rt.status.Skipped
	}
	r.mu.Unlock()
	for _, s := range skipped {
		if slices.ContainsFunc(prev, func(p Skipped) bool { return p.Link.Ifindex == s.Link.Ifindex && p.Reason == s.Reason }) {
			continue
		}
		ev := log.Warn()
		if s.Adopted && !s.Broken {
			ev = log.Info()
		}
		ev.Str("link", s.Link.Name).Str("kind", s.Link.Kind).Bool("adopted", s.Adopted).Bool("broken", s.Broken).
			Str("reason", s.Reason).Msg("container link not wired by tapsync")
	}
}
