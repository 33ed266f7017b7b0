package reconcile

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
)

// ErrTeardownWaiting is returned by Teardown while it cannot finish
// safely yet: the guest has not released a NIC, or QEMU neither answers
// nor has provably exited. The caller retries (with backoff).
var ErrTeardownWaiting = errors.New("teardown waiting for QEMU")

// Teardown ends sandbox id whose pod is going away (task exit or delete):
// every endpoint is removed through the planner in the safe order (a tap
// only once QEMU has let go of it or exited), then the record and the
// registration go; a netns already gone took everything with it. It
// returns ErrTeardownWaiting while it cannot finish safely yet.
func (r *Reconciler) Teardown(ctx context.Context, id string) error {
	sb, err := r.sandbox(id)
	if err != nil {
		return nil // unknown or already unregistered: nothing of ours to remove
	}
	log := zerolog.Ctx(ctx).With().Str("sandbox", id).Logger()
	ctx = log.WithContext(ctx)
	release, err := r.beginPass(ctx, id)
	if errors.Is(err, ErrUnknownSandbox) {
		return nil // unregistered meanwhile
	}
	if err != nil {
		return err // the record it was taking over, or ctx: tried again
	}
	defer release()
	r.note(id, causeTeardown) // its unplugs go through a VM without the model
	host, _, err := r.openHost(id, sb.Netns)
	if err != nil {
		if _, statErr := os.Stat(sb.Netns); statErr == nil {
			return fmt.Errorf("sandbox %s: %w", id, err)
		}
		log.Info().Msg("sandbox gone with its netns; record deleted")
		return r.endSandbox(id)
	}
	defer host.Close()
	host.ForgetFilters() // a teardown reads the kernel, whatever was noted
	rec, err := r.store.Load(ctx, id)
	if err != nil {
		return err
	}
	// Addresses and routes: what the macvtap model took goes back.
	hs, err := host.Observe(datapath.Parts{Addrs: true, Routes: true})
	if err != nil {
		return fmt.Errorf("sandbox %s: observe: %w", id, err)
	}
	// The links stay: they get back what the macvtap model took, and our
	// limits on them go.
	obs := Observed{Links: hs.Links, Taps: hs.Taps, Macvtaps: hs.Macvtaps, RateLimits: hs.RateLimits, KataLinks: hs.KataLinks,
		Redirects: hs.Redirects, Routes: hs.Routes}
	env := Env{Host: host, Recorder: r.store, Vhost: sb.Vhost, AfterAction: r.AfterAction}
	gone := false
	for attempt := 1; ; attempt++ {
		var c *qmp.Client
		if c, gone, err = r.vmForTeardown(ctx, sb); err != nil {
			return err
		}
		if gone {
			break
		}
		vm := qmpVM{c: c, unplugWait: sb.UnplugTimeout, placement: sb.Placement}
		obs.NICs, obs.Netdevs, err = vm.NICs(ctx)
		if err == nil {
			env.VM = vm
			break
		}
		if attempt == 1 && endedByQEMU(c.Err()) {
			// QEMU ended the connection under the reading (exiting, with
			// a connection kept from before whose reader was yet to hear
			// it): a dial of its own says whether QEMU is gone. A command
			// that timed out is no such sign: QEMU may be hung.
			continue
		}
		return fmt.Errorf("sandbox %s: %w: list NICs: %w", id, ErrTeardownWaiting, err)
	}
	p := ComputeTeardown(obs, rec, gone)
	_, out, err := Apply(ctx, p, rec, obs, env)
	if err != nil {
		return fmt.Errorf("sandbox %s: teardown: %w", id, err)
	}
	if len(out.Pending) > 0 {
		return fmt.Errorf("sandbox %s: %w: the guest has not released endpoints %v (their taps stay until it does or QEMU exits)",
			id, ErrTeardownWaiting, out.Pending)
	}
	log.Info().Int("mutations", out.Mutations).Bool("qemu_gone", gone).Msg("sandbox gone; its NICs, taps and redirects removed, record deleted")
	return r.endSandbox(id)
}

// endSandbox deletes the record of a sandbox that is gone, then
// unregisters it (a failed delete leaves it registered, to be retried).
func (r *Reconciler) endSandbox(id string) error {
	if err := r.store.Delete(id); err != nil {
		return err
	}
	r.Unregister(id)
	return nil
}

// vmForTeardown decides whether QEMU still runs: alive, it answers on its
// QMP socket (the connection is returned); gone (true), the socket refuses
// connections or no longer exists. Anything else, a dial that times out
// among them, is no evidence either way and returns ErrTeardownWaiting (or
// ErrConnecting while a background dial is under way).
func (r *Reconciler) vmForTeardown(ctx context.Context, sb Sandbox) (*qmp.Client, bool, error) {
	c, _, err := r.passClient(ctx, sb)
	switch {
	case err == nil:
		return c, false, nil
	case errors.Is(err, ErrConnecting):
		return nil, false, err
	case errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, fs.ErrNotExist):
		r.mu.Lock()
		if rt := r.sandboxes[sb.ID]; rt != nil {
			rt.closeLocked()
		}
		r.mu.Unlock()
		return nil, true, nil
	}
	return nil, false, fmt.Errorf("sandbox %s: %w: QEMU neither answers on %s nor has left it: %w", sb.ID, ErrTeardownWaiting, sb.QMP, err)
}

// CollectGarbage deletes the records of sandboxes whose netns no longer
// exists and that are not registered, and returns their ids.
func (r *Reconciler) CollectGarbage(ctx context.Context) ([]string, error) {
	ids, err := r.store.List()
	if err != nil {
		return nil, err
	}
	var gone []string
	for _, id := range ids {
		r.mu.Lock()
		_, registered := r.sandboxes[id]
		r.mu.Unlock()
		if registered {
			continue
		}
		rec, err := r.store.Load(ctx, id)
		if err != nil {
			return gone, err
		}
		if rec.Netns != "" {
			if _, err := os.Stat(rec.Netns); err == nil {
				continue
			}
		}
		if err := r.store.Delete(id); err != nil {
			return gone, err
		}
		zerolog.Ctx(ctx).Info().Str("sandbox", id).Str("netns", rec.Netns).Msg("netns gone; record garbage-collected")
		gone = append(gone, id)
	}
	return gone, nil
}
