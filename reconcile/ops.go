package reconcile

import (
	"context"
	"fmt"
	"net"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// applyFunc carries act out, saving rec where its op records.
type applyFunc func(a *applier, ctx context.Context, act Action, rec *state.Record) error

// appliers applies each Op (declared in the planner's opSpecs);
// TestAppliers checks that none is missing.
var appliers = [planner.NumOps]applyFunc{
	planner.OpRecord:       applyRecordStep,
	planner.OpMarkRemoving: applyRecordStep,
	planner.OpForget: func(a *applier, _ context.Context, act Action, rec *state.Record) error {
		rec.Forget(act.Endpoint.Index)
		return a.Recorder.Save(*rec)
	},
	planner.OpCreateTap: func(a *applier, ctx context.Context, act Action, _ *state.Record) error {
		t, err := a.Host.EnsureTap(ctx, tapSpec(act))
		if err == nil {
			a.taps[act.Endpoint.Index] = t.Ifindex
		}
		return err
	},
	planner.OpFixTap: func(a *applier, ctx context.Context, act Action, _ *state.Record) error {
		_, err := a.Host.EnsureTap(ctx, tapSpec(act))
		return err
	},
	planner.OpAddRedirects: func(a *applier, _ context.Context, act Action, _ *state.Record) error {
		e := act.Endpoint
		tap, ok := a.taps[e.Index]
		if !ok {
			return fmt.Errorf("%s does not exist", datapath.TapName(e.Index))
		}
		return a.Host.EnsureRedirects(e.LinkIfindex, tap)
	},
	planner.OpPlugNIC: func(a *applier, ctx context.Context, act Action, rec *state.Record) error {
		e := act.Endpoint
		mac, err := net.ParseMAC(e.LinkMAC)
		if err != nil {
			return fmt.Errorf("recorded MAC %q: %w", e.LinkMAC, err)
		}
		if r, ok := rec.Endpoint(e.Index); ok && !act.PlugCounted {
			// Intent first: the plug is counted (guest digests name the
			// plug they were confirmed for, see the planner's nicKey), with
			// the host_mtu that caps the guest's MTU (its brokenReason).
			r.Plugs++
			r.PlugMTU = act.MTU
			rec.Put(r)
			if err := a.Recorder.Save(*rec); err != nil {
				return err
			}
		}
		q, err := queueOpenerOf(e)(ctx, a.Host, a.Vhost, e, tapSpec(act))
		if err != nil {
			return err
		}
		path, err := a.VM.PlugNIC(ctx, e.Index, mac, act.MTU, q)
		if err != nil {
			return err
		}
		a.paths[e.Index] = path
		a.plugs++
		return nil
	},
	// Applied in batches by Apply (see unplugBatch), never one by one.
	planner.OpUnplugNIC: func(_ *applier, _ context.Context, act Action, _ *state.Record) error {
		return fmt.Errorf("%s reached the one-by-one applier: a bug (unplugs go through unplugBatch)", act.Op)
	},
	planner.OpRemoveRedirects: func(a *applier, _ context.Context, act Action, _ *state.Record) error {
		return a.Host.RemoveRedirects(act.Endpoint.LinkIfindex, a.taps[act.Endpoint.Index])
	},
	planner.OpDeleteTap: func(a *applier, _ context.Context, act Action, _ *state.Record) error {
		return a.Host.RemoveTap(act.Endpoint.Index)
	},
	planner.OpResetGuest: func(a *applier, _ context.Context, act Action, rec *state.Record) error {
		a.recordGuest(rec, act.Endpoint.Index, "")
		rec.GuestRoutes, rec.GuestNeighbors = "", ""
		return a.Recorder.Save(*rec)
	},
	planner.OpConfirmGuest: func(a *applier, _ context.Context, act Action, rec *state.Record) error {
		a.recordGuest(rec, act.Endpoint.Index, act.Digest)
		return a.Recorder.Save(*rec)
	},
	planner.OpConfirmGuestRoutes: func(a *applier, _ context.Context, act Action, rec *state.Record) error {
		rec.GuestRoutes = act.Digest
		return a.Recorder.Save(*rec)
	},
	planner.OpConfigureGuest: func(a *applier, ctx context.Context, act Action, rec *state.Record) error {
		n := act.Endpoint.Index
		if err := a.configureGuest(ctx, n, act.Guest); err != nil {
			return err
		}
		a.configured[n] = act.Guest
		a.recordGuest(rec, n, act.Digest)
		return a.Recorder.Save(*rec)
	},
	planner.OpUpdateGuestRoutes: func(a *applier, ctx context.Context, act Action, rec *state.Record) error {
		return a.updateGuestRoutes(ctx, act.Routes, rec)
	},
	planner.OpAddGuestNeighbors: func(a *applier, ctx context.Context, act Action, rec *state.Record) error {
		return a.addGuestNeighbors(ctx, act.Neighbors, rec)
	},
	planner.OpRepairAdopted: func(a *applier, _ context.Context, act Action, _ *state.Record) error {
		// Ours, at our priority: they win over the runtime's dangling
		// filters (lower priority number first) and Kata deletes every u32
		// filter on the link when it detaches it, ours included.
		return a.Host.EnsureRedirects(act.Endpoint.LinkIfindex, act.KataTap.Ifindex)
	},
	planner.OpEnsureMacvtap: func(a *applier, ctx context.Context, act Action, rec *state.Record) error {
		// Intent first: what is taken exists only in the record
		// afterwards, so it is recorded before, as the link has it.
		e := act.Endpoint
		spec := macvtapSpec(e, act.MTU)
		spec.Keep = func(m datapath.Moved) error { return a.recordMoved(rec, e.Index, m) }
		_, moved, err := a.Host.EnsureMacvtap(ctx, spec)
		if err != nil {
			return err
		}
		return a.recordMoved(rec, e.Index, moved)
	},
	planner.OpRemoveMacvtap: func(a *applier, _ context.Context, act Action, _ *state.Record) error {
		return a.Host.RemoveMacvtap(act.Endpoint.Index)
	},
	planner.OpRestoreLink: func(a *applier, _ context.Context, act Action, _ *state.Record) error {
		return a.Host.RestoreContainerLink(act.Endpoint.LinkIfindex, act.Restore)
	},
	planner.OpSetRateLimit: func(a *applier, _ context.Context, act Action, _ *state.Record) error {
		e := act.Endpoint
		if act.Ingress {
			return a.Host.EnsureIngressLimit(act.RateOn, e.Index, act.Rate)
		}
		on := act.RateOn
		if on == 0 {
			tap, ok := a.taps[e.Index]
			if !ok {
				return fmt.Errorf("%s does not exist", datapath.TapName(e.Index))
			}
			on = tap
		}
		return a.Host.EnsureRateLimit(on, act.Rate)
	},
}

// applierOf is how o is applied. An Op outside appliers fails.
func applierOf(o Op) applyFunc {
	if o < 0 || o >= planner.NumOps || appliers[o] == nil {
		return func(_ *applier, _ context.Context, act Action, _ *state.Record) error {
			return fmt.Errorf("unknown action %d", act.Op)
		}
	}
	return appliers[o]
}

// applyRecordStep puts the endpoint of record step act (planner.OpRecord,
// planner.OpMarkRemoving) into rec. Apply saves it before the next step
// that is not a record step (or at the end): consecutive record steps
// are one write.
func applyRecordStep(a *applier, _ context.Context, act Action, rec *state.Record) error {
	recordStep(act, rec)
	a.unsaved = append(a.unsaved, act)
	return nil
}

// isRecordStep says whether o is applied by applyRecordStep.
func isRecordStep(o Op) bool { return o == planner.OpRecord || o == planner.OpMarkRemoving }

// tapSpec is the tap of the endpoint act concerns, at act's MTU.
func tapSpec(act Action) datapath.TapSpec {
	return datapath.TapSpec{Index: act.Endpoint.Index, Queues: max(act.Endpoint.Queues, 1), MTU: act.MTU}
}
