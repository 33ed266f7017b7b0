package reconcile

import (
	"context"
	"fmt"
	"strings"

	"github.com/rs/zerolog"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/state"
)

// Guest steps brought up to date when sent. CNI makes a link first and
// gives it its addresses and routes a few milliseconds later, while
// tapsync is already plugging the link's NIC; and the agent answers the
// configure step of a new NIC only once the guest has found the device,
// a hundred milliseconds and more later under TCG. A pass that plugs a
// NIC therefore reads the netns's links, routes and neighbours again
// before each guest step and sends what it finds then: the guest gets
// the address and routes CNI set in that same pass, instead of an
// interface without address now and a second pass to configure it again.
// When CNI is slower than the guest and sets the address after the
// interface was configured, the routes and neighbours step configures it
// again first, in the same pass: a route via the new link's gateway is
// unreachable until the guest link has its address.

// guestInputs is what a plan's guest steps were computed from.
type guestInputs struct {
	wired []wiredLink
}

// current is the wired links with each link as fresh shows it now, where
// it is still the same link (ifindex, name and MAC). A macvtap
// endpoint's guest link is made of what the record moved, and stays.
func (in *guestInputs) current(fresh []datapath.Link) []wiredLink {
	out := make([]wiredLink, len(in.wired))
	for i, w := range in.wired {
		out[i] = w
		if w.adopted || kindOf(w.endpoint).borrowsLink() {
			continue
		}
		for _, l := range fresh {
			if l.Ifindex == w.link.Ifindex && l.Name == w.link.Name && strings.EqualFold(l.MAC.String(), w.link.MAC.String()) {
				out[i].link = l
				break
			}
		}
	}
	return out
}

// moved says whether a wired link is a macvtap endpoint's: its routes
// are the record's (withMovedRoutes), not the netns's.
func (in *guestInputs) moved() bool {
	for _, w := range in.wired {
		if !w.adopted && kindOf(w.endpoint).borrowsLink() {
			return true
		}
	}
	return false
}

// refreshGuest returns guest step act as the netns is now (Env.Refresh),
// with its digest; act itself when the netns cannot be read again.
func (a *applier) refreshGuest(ctx context.Context, in *guestInputs, act Action) Action {
	parts := datapath.Parts{Addrs: true, Routes: act.Op == OpUpdateGuestRoutes, Neighbors: act.Op == OpAddGuestNeighbors}
	fresh, err := a.Refresh(ctx, parts)
	if err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Str("action", act.Op.String()).Msg("guest step sent as planned: the netns could not be read again")
		return act
	}
	wired := in.current(fresh.Links)
	switch act.Op {
	case OpConfigureGuest:
		for _, w := range wired {
			if !w.adopted && w.endpoint.Index == act.Endpoint.Index && !kindOf(w.endpoint).borrowsLink() {
				act.Guest = desiredInterface(w.link)
				act.Digest = endpointDigest(deviceOf(w).nic, act.Guest)
			}
		}
	case OpUpdateGuestRoutes:
		act.again = a.changedSinceConfigured(wired)
		if !in.moved() {
			act.Routes = guestRoutes(fresh.Routes, guestDevices(wired))
			act.Digest = routesDigest(act.Routes)
		}
	case OpAddGuestNeighbors:
		act.again = a.changedSinceConfigured(wired)
		act.Neighbors = guestNeighbors(fresh.Neighbors, guestDevices(wired))
		act.Digest = neighborsDigest(act.Neighbors)
	}
	return act
}

// changedSinceConfigured are configure-guest steps for the interfaces this
// pass configured whose link has changed since.
func (a *applier) changedSinceConfigured(wired []wiredLink) []Action {
	var again []Action
	for _, w := range wired {
		sent, ok := a.configured[w.endpoint.Index]
		if w.adopted || !ok || kindOf(w.endpoint).borrowsLink() {
			continue
		}
		if want := desiredInterface(w.link); interfaceText(want) != interfaceText(sent) {
			again = append(again, Action{Op: OpConfigureGuest, Endpoint: w.endpoint, Guest: want,
				Digest: endpointDigest(deviceOf(w).nic, want), Reason: w.link.Name + " changed while it was configured"})
		}
	}
	return again
}

// configureAgain sends act.again, the configure-guest steps that must go
// before act (see changedSinceConfigured).
func (a *applier) configureAgain(ctx context.Context, act Action, rec *state.Record) error {
	for _, c := range act.again {
		if a.blocked[c.Endpoint.Index] {
			continue
		}
		logAction(ctx, c)
		if err := a.do(ctx, c, rec); err != nil {
			return fmt.Errorf("endpoint %d: %s: %w", c.Endpoint.Index, c, err)
		}
		a.extra++
	}
	return nil
}
