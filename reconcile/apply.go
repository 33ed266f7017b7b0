package reconcile

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// ErrUnplugPending is returned by VM.UnplugNICs when the guest has not yet
// acknowledged the removal; the device is still plugged and the caller
// retries later.
var ErrUnplugPending = errors.New("unplug pending: guest has not acknowledged")

// ErrIndexBurned is returned by VM.PlugNIC and VM.UnplugNICs when QEMU
// holds the endpoint's ids in a state it cannot undo; the endpoint must
// move to a new index, and the old one stays reserved.
var ErrIndexBurned = errors.New("endpoint index unusable in this VM")

// Host is the host side of one sandbox (implemented by *datapath.Netns).
type Host interface {
	EnsureTap(ctx context.Context, spec datapath.TapSpec) (datapath.Tap, error)
	EnsureRedirects(container, tap int) error
	OpenQueues(ctx context.Context, spec datapath.TapSpec, vhost datapath.Vhost) (*datapath.Queues, error)
	RemoveRedirects(container, tap int) error
	RemoveTap(index int) error

	// The macvtap model: see datapath.EnsureMacvtap.
	EnsureMacvtap(ctx context.Context, spec datapath.MacvtapSpec) (datapath.Macvtap, datapath.Moved, error)
	OpenMacvtapQueues(ctx context.Context, spec datapath.MacvtapSpec, vhost datapath.Vhost) (*datapath.Queues, error)
	RemoveMacvtap(index int) error
	RestoreContainerLink(ifindex int, m datapath.Moved) error
	// Links that are the VM's device already.
	OpenTapLink(ctx context.Context, name string, queues int, vhost datapath.Vhost) (datapath.TapLink, *datapath.Queues, error)
	OpenMacvtapLinkQueues(ctx context.Context, name string, queues int, vhost datapath.Vhost) (*datapath.Queues, error)
	// EnsureRateLimit limits ifindex's egress to bps bit/s; 0 removes it.
	EnsureRateLimit(ifindex int, bps uint64) error
	// EnsureIngressLimit limits ifindex's ingress to bps bit/s through
	// endpoint index's ifb; 0 removes the limit and the ifb.
	EnsureIngressLimit(ifindex, index int, bps uint64) error
}

// VM is the QEMU side of one sandbox.
type VM interface {
	// NICs lists the VM's virtio-net devices and the indexes of the
	// netdevs with our ids.
	NICs(ctx context.Context) ([]NIC, []int, error)
	// PlugNIC hot-adds endpoint index's NIC on the given queues, offering
	// the guest mtu, and returns where the guest finds it (the agent's
	// devicePath, "" if unknown). It owns q from the call on, whatever the
	// outcome; a half-made NIC is rolled back.
	PlugNIC(ctx context.Context, index int, mac net.HardwareAddr, mtu int, q *datapath.Queues) (pciPath string, err error)
	// UnplugNICs hot-removes the NICs of several endpoints, and the netdev
	// of each NIC that went, returning one error per request in order: nil
	// when gone (gone already included), ErrUnplugPending while the guest
	// has not acknowledged, ErrIndexBurned for a netdev QEMU cannot delete.
	// Every request goes out before any wait; with wait the call waits
	// once, up to the unplug timeout, for the NICs asked for the first time.
	// A request asked before (Requested) is only checked, and not repeated
	// within qmp.DefaultUnplugResend.
	UnplugNICs(ctx context.Context, reqs []Unplug, wait bool) []error
}

// Unplug is one NIC for VM.UnplugNICs.
type Unplug struct {
	Index int
	// Requested: the record says QEMU was asked before
	// (state.Endpoint.UnplugRequested).
	Requested bool
}

// Guest is the agent inside the VM (implemented by *agent.Client).
type Guest interface {
	ListInterfaces(ctx context.Context) ([]agent.Interface, error)
	ListRoutes(ctx context.Context) ([]agent.Route, error)
	UpdateInterface(ctx context.Context, i agent.Interface) (agent.Interface, error)
	UpdateRoutes(ctx context.Context, rs []agent.Route) ([]agent.Route, error)
	AddARPNeighbors(ctx context.Context, ns []agent.Neighbor) error
}

// ErrGuestLinkMissing is returned for a configure-guest step when the
// agent still has no link with the NIC's MAC after waiting for it.
var ErrGuestLinkMissing = errors.New("the guest has no link with this MAC yet")

// DefaultGuestLinkWait is how long a configure-guest step retries while
// the guest has not yet found its new NIC.
const DefaultGuestLinkWait = 5 * time.Second

// Recorder persists a sandbox's record (implemented by *state.Store).
type Recorder interface {
	Save(state.Record) error
}

// Outcome summarises one apply.
type Outcome struct {
	Mutations   int           // kernel, QEMU or guest changes made
	Pending     []int         // endpoints whose unplug QEMU left pending
	Held        []int         // endpoints whose plug waits for an old NIC with their MAC to go
	Failed      map[int]error // endpoints whose step failed, and why
	GuestFailed bool          // an agent call failed
}

// Env is what a plan is applied to.
type Env struct {
	Host     Host
	VM       VM
	Guest    Guest // nil: no guest steps can be applied
	Recorder Recorder
	Vhost    datapath.Vhost
	// GuestLinkWait bounds the retries of a configure-guest step whose
	// link the guest has not found yet (0: DefaultGuestLinkWait).
	GuestLinkWait time.Duration
	// AfterAction, if set, is called after each action that completed
	// without error; a record step, once the record holding it is
	// written. It exists for fault injection: crash tests kill the
	// process here to prove that every intermediate state is repaired.
	AfterAction func(Action)
	// Refresh, if set, reads the sandbox's container links (with their
	// addresses) again, and its routes and permanent neighbours as parts
	// asks. A pass that plugs a NIC sends its guest steps with what it
	// reads then (see Plan.Refreshed).
	Refresh func(ctx context.Context, parts datapath.Parts) (Observed, error)
}

// applier runs one plan against one sandbox.
type applier struct {
	Env
	taps      map[int]int    // endpoint index → tap ifindex, as observed or created
	paths     map[int]string // endpoint index → the NIC's PCI path, as observed or plugged
	blocked   map[int]bool   // endpoints whose remaining steps are skipped
	unplugged map[int]bool   // endpoints whose NIC was unplugged in this pass
	ahead     map[int]bool   // plan positions applied ahead of their turn (see unplugBatch)
	unplugs   map[int]error  // plan position of an unplug asked in a batch → its outcome
	waited    bool           // an unplug batch of this pass has had its wait
	plugs     int            // NICs plugged in this pass
	// configured is what this pass's configure-guest steps sent, by
	// endpoint (see Plan.Refreshed).
	configured map[int]agent.Interface
	// unsaved are the record steps applied to the record since it was
	// last saved (see applyRecordStep, saveRecordSteps).
	unsaved []Action
}

// saveRecordSteps saves the record steps applied since the last save, if
// any: before any step that is not one, and at the end. Only then are
// they reported (AfterAction): a step reported is a step done, and a
// record step is done once it is on disk.
func (a *applier) saveRecordSteps(rec state.Record) error {
	if len(a.unsaved) == 0 {
		return nil
	}
	steps := a.unsaved
	a.unsaved = nil
	if err := a.Recorder.Save(rec); err != nil {
		return fmt.Errorf("save the record: %w", err)
	}
	if a.AfterAction != nil {
		for _, act := range steps {
			a.AfterAction(act)
		}
	}
	return nil
}

// Apply executes p in order, saving the record at every record step
// before the mutations that follow it; failing to save stops everything.
// An endpoint whose step fails, or whose unplug stays pending, skips its
// remaining steps while the others carry on. Unplugs are the exception to
// the order: a plan's unplugs are asked for together and waited for once
// (see unplugBatch).
func Apply(ctx context.Context, p Plan, rec state.Record, obs Observed, env Env) (state.Record, Outcome, error) {
	a := &applier{Env: env, taps: map[int]int{}, paths: map[int]string{}, blocked: map[int]bool{}, unplugged: map[int]bool{},
		ahead: map[int]bool{}, unplugs: map[int]error{}, configured: map[int]agent.Interface{}}
	for _, t := range obs.Taps {
		a.taps[t.Index] = t.Ifindex
	}
	for _, n := range obs.NICs {
		if n.Owned {
			a.paths[n.Index] = n.PCIPath
		}
	}
	rec = rec.Clone()
	var (
		out     Outcome
		errs    []error
		blocked = a.blocked
	)
	log := zerolog.Ctx(ctx)
	for i, act := range p.Actions {
		n := act.Endpoint.Index
		if a.ahead[i] || (n >= 0 && blocked[n]) || foldsIntoUnplug(p, i) {
			continue
		}
		if err := ctx.Err(); err != nil {
			// The record steps applied so far are kept: nothing after
			// them was done, as after a crash there.
			return rec, out, errors.Join(append(errs, err, a.saveRecordSteps(rec))...)
		}
		if k := slices.IndexFunc(act.AwaitUnplug, func(k int) bool { return !a.unplugged[k] }); k >= 0 {
			blocked[n] = true
			out.Held = append(out.Held, n)
			log.Info().Int("endpoint", n).Int("awaits", act.AwaitUnplug[k]).Str("link", act.Endpoint.LinkName).
				Msg("NIC plug held: the NIC it replaces, with the same MAC, is still in the VM")
			continue
		}
		if !isRecordStep(act.Op) {
			// What the record steps so far recorded is saved before
			// anything that follows them is done.
			if err := a.saveRecordSteps(rec); err != nil {
				return rec, out, errors.Join(append(errs, err)...)
			}
		}
		var err error
		if act.Op == planner.OpUnplugNIC {
			if _, asked := a.unplugs[i]; !asked {
				if err := a.unplugBatch(ctx, p, i, &rec); err != nil {
					return rec, out, errors.Join(append(errs, err)...)
				}
			}
			err = a.unplugs[i]
			a.unplugged[n] = err == nil
		} else {
			if act.Op.Guestward() && p.RefreshesGuest() && a.plugs > 0 && a.Refresh != nil {
				act = a.refreshGuest(ctx, p, act)
			}
			if act.NothingNew(rec) {
				log.Debug().Str("action", act.Op.String()).Msg("guest step not sent: nothing has changed")
				continue
			}
			var stop error
			if err, stop = a.configureAgain(ctx, act, &rec, &out, &errs); stop != nil {
				return rec, out, stop
			}
			if err == nil {
				logAction(ctx, act)
				err = a.do(ctx, act, &rec)
			}
		}
		if stop := a.settle(ctx, act, err, &rec, &out, &errs); stop != nil {
			return rec, out, stop
		}
	}
	if err := a.saveRecordSteps(rec); err != nil {
		return rec, out, errors.Join(append(errs, err)...)
	}
	return rec, out, errors.Join(errs...)
}

// settle takes the outcome err of action act (planned, or sent again
// before one: Action.Again) into the record, the outcome and errs: an
// endpoint that failed or waits skips its remaining steps, a step done
// is counted and reported (AfterAction). A non-nil result stops Apply.
func (a *applier) settle(ctx context.Context, act Action, err error, rec *state.Record, out *Outcome, errs *[]error) error {
	n := act.Endpoint.Index
	log := zerolog.Ctx(ctx)
	switch {
	case errors.Is(err, ErrUnplugPending):
		a.blocked[n] = true
		out.Pending = append(out.Pending, n)
		if e, ok := rec.Endpoint(n); !ok || !e.UnplugRequested || !e.Removing {
			// An unplug asked outside a removal (a leftover netdev):
			// from now on it is one.
			if !ok {
				e = act.Endpoint
			}
			e.Removing, e.UnplugRequested = true, true
			rec.Put(e)
			if err := a.Recorder.Save(*rec); err != nil {
				return errors.Join(append(*errs, fmt.Errorf("endpoint %d: record pending unplug: %w", n, err))...)
			}
		}
		log.Warn().Int("endpoint", n).Str("action", act.Op.String()).Msg("unplug pending: the guest has not acknowledged yet; the endpoint stays recorded and its index reserved")
	case errors.Is(err, ErrIndexBurned):
		a.blocked[n] = true
		*errs = append(*errs, fmt.Errorf("endpoint %d: %s: %w", n, act, err))
		e := act.Endpoint
		e.Removing, e.Burned = true, true
		rec.Put(e)
		if err := a.Recorder.Save(*rec); err != nil {
			return errors.Join(append(*errs, fmt.Errorf("endpoint %d: record burned index: %w", n, err))...)
		}
		log.Warn().Int("endpoint", n).Msg("QEMU cannot reuse this endpoint's ids; the link moves to a new index on the next pass")
	case err != nil && !act.Op.Mutates():
		return errors.Join(append(*errs, fmt.Errorf("endpoint %d: %s: %w", n, act.Op, err))...)
	case err != nil && n < 0:
		out.GuestFailed = out.GuestFailed || act.Op.Guestward()
		*errs = append(*errs, fmt.Errorf("%s: %w", act.Op, err))
	case err != nil:
		a.blocked[n] = true
		// A guest still looking for its new NIC is no fault of the connection.
		out.GuestFailed = out.GuestFailed || (act.Op.Guestward() && !errors.Is(err, ErrGuestLinkMissing))
		if out.Failed == nil {
			out.Failed = map[int]error{}
		}
		out.Failed[n] = err
		*errs = append(*errs, fmt.Errorf("endpoint %d: %s: %w", n, act, err))
	default:
		if act.Op.Mutates() {
			out.Mutations++
		}
		if a.AfterAction != nil && !isRecordStep(act.Op) { // record steps: once saved
			a.AfterAction(act)
		}
	}
	return nil
}

// do applies one action other than an unplug (see unplugBatch).
func (a *applier) do(ctx context.Context, act Action, rec *state.Record) error {
	return applierOf(act.Op)(a, ctx, act, rec)
}

// recordMoved adds to endpoint n's record what EnsureMacvtap takes or
// took that the record lacks.
func (a *applier) recordMoved(rec *state.Record, n int, m datapath.Moved) error {
	e, ok := rec.Endpoint(n)
	if !ok {
		return nil
	}
	moved, changed := planner.MergeMoved(e.Moved, m)
	if !changed {
		return nil
	}
	e.Moved = &moved
	rec.Put(e)
	return a.Recorder.Save(*rec)
}

// logAction logs one step as it is applied.
func logAction(ctx context.Context, act Action) {
	log := zerolog.Ctx(ctx)
	ev := log.Info()
	if !act.Op.Mutates() {
		ev = log.Debug()
	}
	ev = ev.Int("endpoint", act.Endpoint.Index).Str("action", act.Op.String()).Str("link", act.Endpoint.LinkName)
	if act.Reason != "" {
		ev = ev.Str("reason", act.Reason)
	}
	ev.Msg(act.String())
}

// recordStep applies record step act (planner.OpRecord,
// planner.OpMarkRemoving) to rec, without saving it.
func recordStep(act Action, rec *state.Record) {
	e := act.Endpoint
	if act.Op == planner.OpMarkRemoving {
		e.Removing = true
	}
	rec.Put(e)
}

// foldsIntoUnplug says whether plan step i is a removal's record step
// that its fresh unplug follows at once: the unplug batch then writes it
// together with the request (see unplugBatch), one record write before
// device_del instead of two.
func foldsIntoUnplug(p Plan, i int) bool {
	if i < 0 || i+1 >= len(p.Actions) || p.Actions[i].Op != planner.OpMarkRemoving {
		return false
	}
	next := p.Actions[i+1]
	return next.Op == planner.OpUnplugNIC && next.Endpoint.Index == p.Actions[i].Endpoint.Index &&
		next.Endpoint.Index >= 0 && !next.Endpoint.UnplugRequested
}

// unplugBatch asks for the unplug at plan position i together with the
// plan's later unplugs that only record steps precede (a fresh unplug only
// with fresh ones), and stores each outcome in a.unplugs for Apply's loop;
// only the pass's first batch waits. Before asking it saves, in one write,
// the batch's record steps (taken ahead of their turn, and passed to
// AfterAction once the requests are out) and each endpoint's
// UnplugRequested. It returns an error only when the record cannot be saved.
func (a *applier) unplugBatch(ctx context.Context, p Plan, i int, rec *state.Record) error {
	batch := []int{i}
	var early []int
	if foldsIntoUnplug(p, i-1) && !a.ahead[i-1] {
		early = append(early, i-1)
	}
	fresh := !p.Actions[i].Endpoint.UnplugRequested
	for j := i + 1; j < len(p.Actions); j++ {
		b := p.Actions[j]
		n := b.Endpoint.Index
		if b.Op != planner.OpUnplugNIC || n < 0 || a.blocked[n] || (fresh && b.Endpoint.UnplugRequested) {
			continue
		}
		var pre []int
		ready := true
		for k := i + 1; k < j && ready; k++ {
			c := p.Actions[k]
			switch {
			case c.Endpoint.Index != n || a.ahead[k]:
			case isRecordStep(c.Op):
				pre = append(pre, k)
			default:
				ready = false
			}
		}
		if ready {
			early = append(early, pre...)
			batch = append(batch, j)
		}
	}
	slices.Sort(early)
	save := len(early) > 0
	for _, k := range early {
		act := p.Actions[k]
		logAction(ctx, act)
		recordStep(act, rec)
		a.ahead[k] = true
	}

	reqs := make([]Unplug, len(batch))
	anyFresh := false
	for q, j := range batch {
		act := p.Actions[j]
		n := act.Endpoint.Index
		reqs[q] = Unplug{Index: n, Requested: act.Endpoint.UnplugRequested}
		anyFresh = anyFresh || !reqs[q].Requested
		if e, ok := rec.Endpoint(n); ok && e.Removing && !e.UnplugRequested {
			e.UnplugRequested = true
			rec.Put(e)
			save = true
		}
		logAction(ctx, act)
	}
	if save {
		if err := a.Recorder.Save(*rec); err != nil {
			return fmt.Errorf("record removals and their unplug requests: %w", err)
		}
	}
	wait := !a.waited
	errs := a.VM.UnplugNICs(ctx, reqs, wait)
	a.waited = a.waited || (wait && anyFresh)
	if a.AfterAction != nil {
		for _, k := range early {
			a.AfterAction(p.Actions[k])
		}
	}
	for q, j := range batch {
		var err error
		if q < len(errs) {
			err = errs[q]
		} else {
			err = fmt.Errorf("no outcome for the unplug of NIC %d", reqs[q].Index)
		}
		a.unplugs[j] = err
	}
	return nil
}

// recordGuest sets the guest digest of endpoint n in rec.
func (a *applier) recordGuest(rec *state.Record, n int, d string) {
	if e, ok := rec.Endpoint(n); ok {
		e.Guest = d
		rec.Put(e)
	}
}

// configureGuest asks the agent to configure endpoint n's guest NIC. A
// guest that has not found the NIC yet is asked again with backoff, up to
// GuestLinkWait, then the call fails with ErrGuestLinkMissing.
func (a *applier) configureGuest(ctx context.Context, n int, want agent.Interface) error {
	if a.Guest == nil {
		return errors.New("no guest agent")
	}
	want.DevicePath = a.paths[n]
	limit := a.GuestLinkWait
	if limit <= 0 {
		limit = DefaultGuestLinkWait
	}
	deadline := time.Now().Add(limit)
	for wait := 20 * time.Millisecond; ; wait = min(2*wait, 500*time.Millisecond) {
		_, err := a.Guest.UpdateInterface(ctx, want)
		if !errors.Is(err, agent.ErrLinkNotFound) {
			return err
		}
		if time.Now().Add(wait).After(deadline) {
			return fmt.Errorf("%w (MAC %s, device %q, asked for %s): %w", ErrGuestLinkMissing, want.MAC, want.DevicePath, limit, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

// updateGuestRoutes sends the guest its full route set, less the routes of
// endpoints whose guest interface failed in this pass (their device is not
// there to route through); the record keeps what was actually sent, so the
// next pass sends the rest.
func (a *applier) updateGuestRoutes(ctx context.Context, routes []GuestRoute, rec *state.Record) error {
	if a.Guest == nil {
		return errors.New("no guest agent")
	}
	sent := slices.DeleteFunc(slices.Clone(routes), func(r GuestRoute) bool { return r.Endpoint >= 0 && a.blocked[r.Endpoint] })
	rs := make([]agent.Route, len(sent))
	for i, r := range sent {
		rs[i] = r.Route
	}
	if _, err := a.Guest.UpdateRoutes(ctx, rs); err != nil {
		return err
	}
	rec.GuestRoutes = planner.RoutesDigest(sent)
	return a.Recorder.Save(*rec)
}

// addGuestNeighbors adds the permanent neighbours to the guest. An agent
// that does not implement the call is told once: its digest is recorded.
func (a *applier) addGuestNeighbors(ctx context.Context, neigh []GuestNeighbor, rec *state.Record) error {
	if a.Guest == nil {
		return errors.New("no guest agent")
	}
	sent := slices.DeleteFunc(slices.Clone(neigh), func(n GuestNeighbor) bool { return n.Endpoint >= 0 && a.blocked[n.Endpoint] })
	ns := make([]agent.Neighbor, len(sent))
	for i, n := range sent {
		ns[i] = n.Neighbor
	}
	if err := a.Guest.AddARPNeighbors(ctx, ns); agent.IsUnimplemented(err) {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("the guest agent cannot add neighbours; the pod's permanent neighbours are not in the guest")
	} else if err != nil {
		return err
	}
	rec.GuestNeighbors = planner.NeighborsDigest(sent)
	return a.Recorder.Save(*rec)
}
