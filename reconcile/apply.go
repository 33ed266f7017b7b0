package reconcile

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/state"
)

// ErrUnplugPending is returned by VM.UnplugNIC when the guest has not yet
// acknowledged the removal; the device is still plugged and the caller
// retries later.
var ErrUnplugPending = errors.New("unplug pending: guest has not acknowledged")

// ErrIndexBurned is returned by VM.PlugNIC and VM.UnplugNIC when QEMU
// holds the endpoint's ids in a state it cannot undo; the endpoint must
// move to a new index, and the old one stays reserved.
var ErrIndexBurned = errors.New("endpoint index unusable in this VM")

// Host is the host side of one sandbox (implemented by *datapath.Netns).
type Host interface {
	Observe() (datapath.State, error)
	EnsureTap(ctx context.Context, spec datapath.TapSpec) (datapath.Tap, error)
	EnsureRedirects(container, tap int) error
	OpenQueues(ctx context.Context, spec datapath.TapSpec, vhost datapath.Vhost) (*datapath.Queues, error)
	RemoveRedirects(container, tap int) error
	RemoveTap(index int) error
}

// VM is the QEMU side of one sandbox.
type VM interface {
	// NICs lists the VM's virtio-net devices and the indexes of the
	// netdevs with our ids.
	NICs(ctx context.Context) ([]NIC, []int, error)
	// PlugNIC hot-adds endpoint index's NIC on the given queues. It owns
	// q from the call on, whatever the outcome; a half-made NIC is
	// rolled back.
	PlugNIC(ctx context.Context, index int, mac net.HardwareAddr, q *datapath.Queues) error
	// UnplugNIC hot-removes endpoint index's NIC and then its netdev;
	// gone is success, no acknowledgement in time is ErrUnplugPending, a
	// netdev QEMU cannot delete is ErrIndexBurned.
	// With wait false it asks again and only checks whether the device
	// has gone, without waiting for the guest.
	UnplugNIC(ctx context.Context, index int, wait bool) error
}

// Recorder persists a sandbox's record (implemented by *state.Store).
type Recorder interface {
	Save(state.Record) error
}

// Outcome summarises one apply.
type Outcome struct {
	Mutations int   // kernel or QEMU changes made
	Pending   []int // endpoints whose unplug QEMU left pending
}

// Env is what a plan is applied to.
type Env struct {
	Host     Host
	VM       VM
	Recorder Recorder
	Vhost    datapath.Vhost
	// AfterAction, if set, is called after each action that completed
	// without error. It exists for fault injection: crash tests kill the
	// process here to prove that every intermediate state is repaired.
	AfterAction func(Action)
}

// applier runs one plan against one sandbox.
type applier struct {
	Env
	taps map[int]int // endpoint index → tap ifindex, as observed or created
}

// Apply executes p in order. The record is saved at every record step,
// so intent is on disk before the mutations that follow it. An endpoint
// whose step fails, or whose unplug stays pending, skips its remaining
// steps; other endpoints carry on. Failing to save the record stops
// everything: nothing is changed without its intent on disk.
func Apply(ctx context.Context, p Plan, rec state.Record, obs Observed, env Env) (state.Record, Outcome, error) {
	a := &applier{Env: env, taps: map[int]int{}}
	for _, t := range obs.Taps {
		a.taps[t.Index] = t.Ifindex
	}
	rec = rec.Clone()
	var (
		out     Outcome
		errs    []error
		blocked = map[int]bool{}
	)
	log := zerolog.Ctx(ctx)
	for _, act := range p.Actions {
		n := act.Endpoint.Index
		if blocked[n] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return rec, out, errors.Join(append(errs, err)...)
		}
		ev := log.Info()
		if !act.Op.Mutates() {
			ev = log.Debug()
		}
		ev = ev.Int("endpoint", n).Str("action", act.Op.String()).Str("link", act.Endpoint.LinkName)
		if act.Reason != "" {
			ev = ev.Str("reason", act.Reason)
		}
		ev.Msg(act.String())
		err := a.do(ctx, act, &rec)
		switch {
		case errors.Is(err, ErrUnplugPending):
			blocked[n] = true
			out.Pending = append(out.Pending, n)
			if e := act.Endpoint; !e.UnplugRequested {
				e.Removing, e.UnplugRequested = true, true
				rec.Put(e)
				if err := a.Recorder.Save(rec); err != nil {
					return rec, out, errors.Join(append(errs, fmt.Errorf("endpoint %d: record pending unplug: %w", n, err))...)
				}
			}
			log.Warn().Int("endpoint", n).Str("action", act.Op.String()).Msg("unplug pending: the guest has not acknowledged yet; the endpoint stays recorded and its index reserved")
		case errors.Is(err, ErrIndexBurned):
			blocked[n] = true
			errs = append(errs, fmt.Errorf("endpoint %d: %s: %w", n, act, err))
			e := act.Endpoint
			e.Removing, e.Burned = true, true
			rec.Put(e)
			if err := a.Recorder.Save(rec); err != nil {
				return rec, out, errors.Join(append(errs, fmt.Errorf("endpoint %d: record burned index: %w", n, err))...)
			}
			log.Warn().Int("endpoint", n).Msg("QEMU cannot reuse this endpoint's ids; the link moves to a new index on the next pass")
		case err != nil && !act.Op.Mutates():
			return rec, out, errors.Join(append(errs, fmt.Errorf("endpoint %d: %s: %w", n, act.Op, err))...)
		case err != nil:
			blocked[n] = true
			errs = append(errs, fmt.Errorf("endpoint %d: %s: %w", n, act, err))
		default:
			if act.Op.Mutates() {
				out.Mutations++
			}
			if a.AfterAction != nil {
				a.AfterAction(act)
			}
		}
	}
	return rec, out, errors.Join(errs...)
}

func (a *applier) do(ctx context.Context, act Action, rec *state.Record) error {
	e := act.Endpoint
	spec := datapath.TapSpec{Index: e.Index, Queues: max(e.Queues, 1), MTU: act.MTU}
	switch act.Op {
	case OpRecord, OpMarkRemoving:
		if act.Op == OpMarkRemoving {
			e.Removing = true
		}
		rec.Put(e)
		return a.Recorder.Save(*rec)
	case OpForget:
		rec.Forget(e.Index)
		return a.Recorder.Save(*rec)
	case OpCreateTap:
		t, err := a.Host.EnsureTap(ctx, spec)
		if err == nil {
			a.taps[e.Index] = t.Ifindex
		}
		return err
	case OpFixTap:
		_, err := a.Host.EnsureTap(ctx, spec)
		return err
	case OpAddRedirects:
		tap, ok := a.taps[e.Index]
		if !ok {
			return fmt.Errorf("%s does not exist", datapath.TapName(e.Index))
		}
		return a.Host.EnsureRedirects(e.LinkIfindex, tap)
	case OpPlugNIC:
		mac, err := net.ParseMAC(e.LinkMAC)
		if err != nil {
			return fmt.Errorf("recorded MAC %q: %w", e.LinkMAC, err)
		}
		q, err := a.Host.OpenQueues(ctx, spec, a.Vhost)
		if err != nil {
			return err
		}
		return a.VM.PlugNIC(ctx, e.Index, mac, q)
	case OpUnplugNIC:
		return a.VM.UnplugNIC(ctx, e.Index, !e.UnplugRequested)
	case OpRemoveRedirects:
		return a.Host.RemoveRedirects(e.LinkIfindex, a.taps[e.Index])
	case OpDeleteTap:
		return a.Host.RemoveTap(e.Index)
	}
	return fmt.Errorf("unknown action %d", act.Op)
}
