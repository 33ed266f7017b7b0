package planner

import (
	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// tapLinkKind is a container link that is a tap (a CNI's,
// state.KindTapLink): the VM's device already, whose queues QEMU gets.
type tapLinkKind struct{ linkIsDevice }

func (tapLinkKind) name() string { return state.KindTapLink }

func (tapLinkKind) claims(l hostnet.Link, _ string) bool { return l.Kind == "tap" }

func (k tapLinkKind) recovered(v view, e state.Endpoint, l hostnet.Link) (state.Endpoint, bool) {
	return k.recoveredAs(v, e, l, "tap", k.name())
}

// What the netns sends the tap link goes to the VM (rx on its egress);
// what the VM writes enters the stack at its ingress (tx).
func (tapLinkKind) rateSites() (rx, tx RateSite) { return SiteLinkEgress, SiteLinkIngress }
