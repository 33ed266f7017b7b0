package planner

import (
	"bytes"
	"fmt"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// tapKind is the tcfilter model (state.KindTap): our tap tsn<N>, joined
// to the container link by redirects both ways. It wires any link no
// other kind claims.
type tapKind struct{}

func (tapKind) name() string { return state.KindTap }

func (tapKind) claims(hostnet.Link, string) bool { return true }

func (tapKind) recovered(_ view, e state.Endpoint, _ hostnet.Link) (state.Endpoint, bool) {
	return e, true
}

func (tapKind) add(_ view, e state.Endpoint, l hostnet.Link, p *Plan) {
	p.Actions = append(p.Actions, Action{Op: OpCreateTap, Endpoint: e, MTU: l.MTU}, Action{Op: OpAddRedirects, Endpoint: e})
}

func (tapKind) broken(v view, e state.Endpoint, l hostnet.Link) string {
	tap, tapOK := v.taps[e.Index]
	nic, nicOK := v.nics[e.Index]
	switch {
	case tapOK && !ourTap(tap):
		return fmt.Sprintf("%s is not a tap tapsync made", tap.Name)
	case tapOK && tap.MultiQueue != (e.Queues > 1):
		return fmt.Sprintf("%s multiqueue=%v does not fit %d queues", tap.Name, tap.MultiQueue, e.Queues)
	case nicOK && !bytes.Equal(nic.MAC, l.MAC):
		return fmt.Sprintf("VM NIC %s has MAC %s, link has %s", nic.ID, nic.MAC, l.MAC)
	case nicOK && !tapOK:
		return fmt.Sprintf("VM NIC %s lost its tap", nic.ID)
	case nicOK && tap.Attached == 0 && (tap.Up || tap.MultiQueue):
		// A single-queue tap shows attachment by its carrier, which an
		// administratively down tap lacks anyway: repair that first.
		return fmt.Sprintf("VM NIC %s is not attached to %s (tap re-created)", nic.ID, tap.Name)
	}
	return ""
}

func (tapKind) repair(v view, e state.Endpoint, l hostnet.Link, p *Plan) {
	tap, tapOK := v.taps[e.Index]
	if !tapOK {
		p.Actions = append(p.Actions, Action{Op: OpCreateTap, Endpoint: e, MTU: l.MTU, Reason: "tap missing"})
	} else if tap.MTU != l.MTU || !tap.Up {
		why := fmt.Sprintf("%s mtu changed from %d", l.Name, tap.MTU)
		if !tap.Up {
			why = tap.Name + " is down"
		}
		p.Actions = append(p.Actions, Action{Op: OpFixTap, Endpoint: e, MTU: l.MTU, Reason: why})
	}
	if !tapOK || !v.ownedRedirect(l.Ifindex, tap.Ifindex) || !v.ownedRedirect(tap.Ifindex, l.Ifindex) {
		p.Actions = append(p.Actions, Action{Op: OpAddRedirects, Endpoint: e, Reason: "redirects missing or stale"})
	}
}

func (tapKind) remove(v view, e state.Endpoint, p *Plan) {
	tap, tapOK := v.taps[e.Index]
	if v.pairLeft(e.LinkIfindex, tap.Ifindex) {
		p.Actions = append(p.Actions, Action{Op: OpRemoveRedirects, Endpoint: e})
	}
	// A burned index's leftover netdev may still hold the tap's first
	// queue: deleting the tap under QEMU is what the order exists to avoid.
	if tapOK && ourTap(tap) && !(e.Burned && v.netdevs[e.Index]) {
		p.Actions = append(p.Actions, Action{Op: OpDeleteTap, Endpoint: e})
	}
}

func (tapKind) device(e state.Endpoint) string { return hostnet.TapName(e.Index) }

// The redirect from the link enqueues rx on the tap; the one from the
// tap enqueues tx on the link.
func (tapKind) rateSites() (rx, tx RateSite) { return SiteTapEgress, SiteLinkEgress }

func (tapKind) borrowsLink() bool { return false }

// ourTap reports whether tsn<N> has the shape tapsync gives its taps
// (persistent, vnet_hdr, no PI); one of another shape was made by someone
// else under our name and is never deleted.
func ourTap(t hostnet.Tap) bool { return t.Persistent && t.VnetHdr && t.NoPI && t.Kind == "tap" }
