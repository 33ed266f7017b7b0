package reconcile

import (
	"context"
	"errors"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// openQueuesFunc opens the queues endpoint e's NIC is plugged on.
type openQueuesFunc func(ctx context.Context, h Host, vhost datapath.Vhost, e state.Endpoint, spec datapath.TapSpec) (*datapath.Queues, error)

// queueOpeners opens the queues of each endpoint kind (planned by the
// planner's endpointKind), by its name; TestQueueOpeners checks that
// every kind has its entry.
var queueOpeners = map[string]openQueuesFunc{
	state.KindTap:         openTapQueues,
	state.KindTapLink:     openTapLinkQueues,
	state.KindMacvtap:     openMacvtapQueues,
	state.KindMacvtapLink: openMacvtapLinkQueues,
}

// queueOpenerOf is how endpoint e's queues are opened. A kind this build
// does not know opens as a tcfilter tap, as the planner repairs it.
func queueOpenerOf(e state.Endpoint) openQueuesFunc {
	if f, ok := queueOpeners[e.Kind]; ok {
		return f
	}
	return openTapQueues
}

// openTapQueues attaches new queues to our tap tsn<N>.
func openTapQueues(ctx context.Context, h Host, vhost datapath.Vhost, _ state.Endpoint, spec datapath.TapSpec) (*datapath.Queues, error) {
	return h.OpenQueues(ctx, spec, vhost)
}

// openTapLinkQueues opens the queues of a tap link a CNI made.
func openTapLinkQueues(ctx context.Context, h Host, vhost datapath.Vhost, e state.Endpoint, spec datapath.TapSpec) (*datapath.Queues, error) {
	_, q, err := h.OpenTapLink(ctx, e.LinkName, spec.Queues, vhost)
	if errors.Is(err, datapath.ErrTapMismatch) && spec.Queues > 1 {
		// The CNI made it single-queue: one queue is what it takes.
		_, q, err = h.OpenTapLink(ctx, e.LinkName, 1, vhost)
	}
	return q, err
}

// openMacvtapQueues opens the queues of our macvtap tsm<N>.
func openMacvtapQueues(ctx context.Context, h Host, vhost datapath.Vhost, e state.Endpoint, spec datapath.TapSpec) (*datapath.Queues, error) {
	return h.OpenMacvtapQueues(ctx, macvtapSpec(e, spec.MTU), vhost)
}

// openMacvtapLinkQueues opens the /dev/tap<ifindex> queues of a macvtap
// link.
func openMacvtapLinkQueues(ctx context.Context, h Host, vhost datapath.Vhost, e state.Endpoint, spec datapath.TapSpec) (*datapath.Queues, error) {
	return h.OpenMacvtapLinkQueues(ctx, e.LinkName, spec.Queues, vhost)
}

// macvtapSpec is the macvtap of macvtap endpoint e.
func macvtapSpec(e state.Endpoint, mtu int) datapath.MacvtapSpec {
	return datapath.MacvtapSpec{Index: e.Index, Container: e.LinkIfindex, MAC: planner.GuestMAC(e), Queues: max(e.Queues, 1), MTU: mtu}
}
