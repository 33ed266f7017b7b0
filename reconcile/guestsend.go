package reconcile

import (
	"context"
	"fmt"

	"github.com/rs/zerolog"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// Guest steps brought up to date when sent: a pass that plugs a NIC reads
// the netns again before each guest step (see Plan.Refreshed for why).

// refreshGuest returns guest step act of plan p as the netns is now
// (Env.Refresh, Plan.Refreshed); act itself when the netns cannot be read
// again.
func (a *applier) refreshGuest(ctx context.Context, p Plan, act Action) Action {
	parts := datapath.Parts{Addrs: true, Routes: act.Op == planner.OpUpdateGuestRoutes, Neighbors: act.Op == planner.OpAddGuestNeighbors}
	fresh, err := a.Refresh(ctx, parts)
	if err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Str("action", act.Op.String()).Msg("guest step sent as planned: the netns could not be read again")
		return act
	}
	return p.Refreshed(act, fresh, a.configured)
}

// configureAgain sends act's Again, the configure-guest steps that must
// go before it, each settled as a step of its own. err says that one
// failed, so act is not to be sent; stop, that Apply must stop.
func (a *applier) configureAgain(ctx context.Context, act Action, rec *state.Record, out *Outcome, errs *[]error) (err, stop error) {
	for _, c := range act.Again() {
		if a.blocked[c.Endpoint.Index] {
			continue
		}
		logAction(ctx, c)
		cerr := a.do(ctx, c, rec)
		if stop := a.settle(ctx, c, cerr, rec, out, errs); stop != nil {
			return nil, stop
		}
		if cerr != nil && err == nil {
			err = fmt.Errorf("not sent: endpoint %d's interface could not be configured again", c.Endpoint.Index)
		}
	}
	return err, nil
}
