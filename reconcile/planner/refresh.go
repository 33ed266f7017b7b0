package planner

import (
	"strings"

	"github.com/tapsync/tapsync/agent/guestnet"
	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// Guest steps brought up to date when sent: a pass that plugs a NIC reads
// the netns's links, routes and neighbours again before each guest step
// and sends what it finds then. A routes or neighbours step first
// configures again an interface whose link changed after it was
// configured. docs/reconcile.md ("Guest steps refreshed") says why.

// guestInputs is what a plan's guest steps were computed from.
type guestInputs struct {
	wired []wiredLink
}

// current is the wired links with each link as fresh shows it now, where
// it is still the same link (ifindex, name and MAC). A macvtap
// endpoint's guest link is made of what the record moved, and stays.
func (in *guestInputs) current(fresh []hostnet.Link) []wiredLink {
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

// RefreshesGuest reports whether the plan's guest steps are brought up to
// date as they are sent (see Refreshed): it plugs a NIC.
func (p Plan) RefreshesGuest() bool { return p.guest != nil }

// Refreshed is guest step act, with its digest, as fresh (the netns read
// again as act is sent) shows it; a plan that plugs no NIC returns act as
// it is. sent are the interfaces this pass has configured, by endpoint: a
// routes or neighbours step gets in Again a configure step for each whose
// link has changed since.
func (p Plan) Refreshed(act Action, fresh Observed, sent map[int]guestnet.Interface) Action {
	in := p.guest
	if in == nil {
		return act
	}
	wired := in.current(fresh.Links)
	switch act.Op {
	case OpConfigureGuest:
		for _, w := range wired {
			if !w.adopted && w.endpoint.Index == act.Endpoint.Index && !kindOf(w.endpoint).borrowsLink() {
				act.Guest = DesiredInterface(w.link)
				act.Digest = endpointDigest(deviceOf(w).nic, act.Guest)
			}
		}
	case OpUpdateGuestRoutes:
		act.again = changedSinceConfigured(wired, sent)
		if !in.moved() {
			act.Routes = guestRoutes(fresh.Routes, guestDevices(wired))
			act.Digest = RoutesDigest(act.Routes)
		}
	case OpAddGuestNeighbors:
		act.again = changedSinceConfigured(wired, sent)
		act.Neighbors = guestNeighbors(fresh.Neighbors, guestDevices(wired))
		act.Digest = NeighborsDigest(act.Neighbors)
	}
	return act
}

// changedSinceConfigured are configure-guest steps for the interfaces sent
// in this pass whose link has changed since.
func changedSinceConfigured(wired []wiredLink, sent map[int]guestnet.Interface) []Action {
	var again []Action
	for _, w := range wired {
		i, ok := sent[w.endpoint.Index]
		if w.adopted || !ok || kindOf(w.endpoint).borrowsLink() {
			continue
		}
		if want := DesiredInterface(w.link); interfaceText(want) != interfaceText(i) {
			again = append(again, Action{Op: OpConfigureGuest, Endpoint: w.endpoint, Guest: want,
				Digest: endpointDigest(deviceOf(w).nic, want), Reason: w.link.Name + " changed while it was configured"})
		}
	}
	return again
}

// Again are the configure-guest steps that go before guest step a (see
// Refreshed).
func (a Action) Again() []Action { return a.again }

// NothingNew reports whether guest step a, as it is about to be sent, has
// nothing the guest lacks: a routes step of a plan that plugs a NIC whose
// routes are still the record's, or a neighbours step left with none; and
// no interface to configure again before it.
func (a Action) NothingNew(rec state.Record) bool {
	return len(a.again) == 0 && ((a.ifChanged && a.Digest == rec.GuestRoutes) || (a.Op == OpAddGuestNeighbors && len(a.Neighbors) == 0))
}
