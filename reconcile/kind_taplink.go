package reconcile

import (
	"context"
	"errors"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/state"
)

// tapLinkKind is a container link that is a tap (a CNI's,
// state.KindTapLink): the VM's device already, whose queues QEMU gets.
type tapLinkKind struct{ linkIsDevice }

func (tapLinkKind) name() string { return state.KindTapLink }

func (tapLinkKind) claims(l datapath.Link, _ string) bool { return l.Kind == "tap" }

func (k tapLinkKind) recovered(v view, e state.Endpoint, l datapath.Link) (state.Endpoint, bool) {
	return k.recoveredAs(v, e, l, "tap", k.name())
}

func (tapLinkKind) openQueues(ctx context.Context, h Host, vhost datapath.Vhost, e state.Endpoint, spec datapath.TapSpec) (*datapath.Queues, error) {
	_, q, err := h.OpenTapLink(ctx, e.LinkName, spec.Queues, vhost)
	if errors.Is(err, datapath.ErrTapMismatch) && spec.Queues > 1 {
		// The CNI made it single-queue: one queue is what it takes.
		_, q, err = h.OpenTapLink(ctx, e.LinkName, 1, vhost)
	}
	return q, err
}

// What the netns sends the tap link goes to the VM (rx on its egress);
// what the VM writes enters the stack at its ingress (tx).
func (tapLinkKind) rateSites() (rx, tx rateSite) { return siteLinkEgress, siteLinkIngress }
