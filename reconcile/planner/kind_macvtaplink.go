package planner

import (
	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// macvtapLinkKind is a container link that is a macvtap
// (state.KindMacvtapLink): the VM's device already, whose
// /dev/tap<ifindex> queues QEMU gets.
type macvtapLinkKind struct{ linkIsDevice }

func (macvtapLinkKind) name() string { return state.KindMacvtapLink }

func (macvtapLinkKind) claims(l hostnet.Link, _ string) bool { return l.Kind == "macvtap" }

func (k macvtapLinkKind) recovered(v view, e state.Endpoint, l hostnet.Link) (state.Endpoint, bool) {
	return k.recoveredAs(v, e, l, "macvtap", k.name())
}

// Its frames come from the receive path, past no egress (rx on its
// ingress); what the guest writes leaves through its own egress (tx).
func (macvtapLinkKind) rateSites() (rx, tx RateSite) { return SiteLinkIngress, SiteLinkEgress }
