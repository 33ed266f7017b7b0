package reconcile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/state"
)

// endpointKind is how one kind of endpoint (state.Endpoint.Kind) is
// planned: what its host side is made of, how it is repaired and removed
// and where its rate limits sit. Each kind is one type in a kind_*.go
// file, listed in kinds; where its NIC's queues come from is its
// queueOpeners entry.
type endpointKind interface {
	// name is the kind as the record keeps it.
	name() string
	// claims reports whether a new endpoint on link l under interworking
	// model is of this kind.
	claims(l datapath.Link, model string) bool
	// recovered reports whether the objects observed for the index of
	// unrecorded endpoint e (serving link l; zero if none) show this
	// kind, and returns e as one.
	recovered(v view, e state.Endpoint, l datapath.Link) (state.Endpoint, bool)
	// add plans the host-side steps of new endpoint e on link l.
	add(v view, e state.Endpoint, l datapath.Link, p *Plan)
	// broken says why live endpoint e on link l must be re-made rather
	// than repaired in place ("" if it can be repaired).
	broken(v view, e state.Endpoint, l datapath.Link) string
	// repair plans the missing host-side steps of live endpoint e, in
	// add order.
	repair(v view, e state.Endpoint, l datapath.Link, p *Plan)
	// remove plans the host side of e's removal, once QEMU has let go.
	remove(v view, e state.Endpoint, p *Plan)
	// device names the device whose queues e's NIC uses.
	device(e state.Endpoint) string
	// rateSites says where the kind's rx and tx limits go.
	rateSites() (rx, tx rateSite)
	// borrowsLink reports whether the endpoint takes its container link's
	// MAC, addresses and routes for the guest while it lives and gives
	// them back on removal: its guest interface is made of what the
	// record keeps, not of the link as it is.
	borrowsLink() bool
}

// kinds are the endpoint kinds in the order they are tried: the first
// that claims a new link, or recognises recovered objects, is the
// endpoint's kind. tapKind, last, takes any link.
var kinds = []endpointKind{macvtapKind{}, tapLinkKind{}, macvtapLinkKind{}, tapKind{}}

// kindOf is endpoint e's kind.
func kindOf(e state.Endpoint) endpointKind {
	for _, k := range kinds {
		if k.name() == e.Kind {
			return k
		}
	}
	return unknownKind{kind: e.Kind}
}

// kindFor is the kind of a new endpoint for link l under model.
func kindFor(l datapath.Link, model string) string {
	for _, k := range kinds {
		if k.claims(l, model) {
			return k.name()
		}
	}
	return state.KindTap
}

// recoveredKind is endpoint e, recovered from the objects of its index,
// with the kind those objects show on link l (zero: none found).
func recoveredKind(v view, e state.Endpoint, l datapath.Link) state.Endpoint {
	for _, k := range kinds {
		if r, ok := k.recovered(v, e, l); ok {
			return r
		}
	}
	return e
}

// unknownKind is a kind this build does not know (a record written by a
// newer tapsync): its endpoint is repaired and removed as a tcfilter
// tap is, and carries no rate limit. It is never in kinds, so no new endpoint gets it.
type unknownKind struct {
	tapKind
	kind string
}

func (k unknownKind) name() string { return k.kind }

func (unknownKind) rateSites() (rx, tx rateSite) { return siteNone, siteNone }

// linkIsDevice is the part of a kind whose container link is the VM's
// device already: there is nothing of ours on the host side to add,
// repair or remove, and the link itself is never changed or deleted.
type linkIsDevice struct{}

func (linkIsDevice) add(view, state.Endpoint, datapath.Link, *Plan) {}

func (linkIsDevice) repair(view, state.Endpoint, datapath.Link, *Plan) {}

func (linkIsDevice) remove(view, state.Endpoint, *Plan) {}

func (linkIsDevice) device(e state.Endpoint) string { return e.LinkName }

func (linkIsDevice) borrowsLink() bool { return false }

// recoveredAs is unrecorded endpoint e as kind, if the link its objects
// serve is of link kind linkKind and no tap of ours has its index.
func (linkIsDevice) recoveredAs(v view, e state.Endpoint, l datapath.Link, linkKind, kind string) (state.Endpoint, bool) {
	if v.taps[e.Index].Ifindex != 0 || l.Kind != linkKind {
		return e, false
	}
	e.Kind = kind
	return e, true
}

// broken: only a NIC whose MAC is no longer the link's.
func (linkIsDevice) broken(v view, e state.Endpoint, l datapath.Link) string {
	if nic, ok := v.nics[e.Index]; ok && !bytes.Equal(nic.MAC, l.MAC) {
		return fmt.Sprintf("VM NIC %s has MAC %s, link has %s", nic.ID, nic.MAC, l.MAC)
	}
	return ""
}

// add plans the steps of a new endpoint after its record step.
func add(v view, e state.Endpoint, l datapath.Link, opts Options, p *Plan) {
	kindOf(e).add(v, e, l, p)
	planLimits(v, e, l, opts, p)
	p.Actions = append(p.Actions, Action{Op: OpPlugNIC, Endpoint: e, MTU: l.MTU})
}

// DeviceName names the device whose queues endpoint e's NIC uses: our
// tap or macvtap, or the container link itself.
func DeviceName(e state.Endpoint) string { return kindOf(e).device(e) }

// guestMAC is the MAC endpoint e's NIC gets.
func guestMAC(e state.Endpoint) net.HardwareAddr {
	mac, _ := net.ParseMAC(e.LinkMAC)
	return mac
}

// guestLink is what the guest interface of endpoint e on link l mirrors:
// the link itself, or for the macvtap model the link as it was before it
// lent its MAC and addresses.
func guestLink(e state.Endpoint, l datapath.Link) datapath.Link {
	if !kindOf(e).borrowsLink() {
		return l
	}
	g := l
	g.MAC = guestMAC(e)
	g.Addrs = movedAddrs(e)
	for _, a := range l.Addrs {
		if !slices.Contains(g.Addrs, a) {
			g.Addrs = append(g.Addrs, a)
		}
	}
	return g
}

// needsRestore says whether link l may still lack what macvtap endpoint
// e took from it: its MAC, an address, a route the observation shows
// missing; or a route the observation cannot show (another table,
// another link), which only the give-back itself can check.
func needsRestore(v view, e state.Endpoint, l datapath.Link) bool {
	if lentMAC(e, l) || unobservable(e) {
		return true
	}
	for _, a := range movedAddrs(e) {
		if !slices.Contains(l.Addrs, a) {
			return true
		}
	}
	for _, r := range movedRoutes(e) {
		if !slices.Contains(v.routes, r) {
			return true
		}
	}
	return false
}

// sameGuestRoute reports whether a and b are one route to the guest.
func sameGuestRoute(a, b datapath.Route) bool {
	return a.LinkIndex == b.LinkIndex && a.Dst == b.Dst && a.Gateway == b.Gateway && a.IPv6 == b.IPv6 && a.Metric == b.Metric
}

// beingRestored says why link l must wait before it gets a new endpoint
// ("" if it need not): a macvtap endpoint of it is being removed and has
// not given it back its MAC and addresses yet. Wired now, the new endpoint
// would record the borrowed MAC and miss the addresses.
func beingRestored(v view, rec state.Record, removing map[int]bool, l datapath.Link) string {
	for _, e := range rec.Endpoints {
		if kindOf(e).borrowsLink() && e.LinkIfindex == l.Ifindex && (e.Removing || removing[e.Index]) && needsRestore(v, e, l) {
			return fmt.Sprintf("endpoint %d (macvtap model) is giving %s back its MAC and addresses; wired again once it has", e.Index, l.Name)
		}
	}
	return ""
}

// withMovedRoutes is the sandbox's routes plus those the macvtap model
// took from its links with their addresses: they are the guest's.
func withMovedRoutes(v view, wired []wiredLink) []datapath.Route {
	out := slices.Clone(v.routes)
	for _, w := range wired {
		if w.adopted || !kindOf(w.endpoint).borrowsLink() {
			continue
		}
		for _, r := range movedRoutes(w.endpoint) {
			if !slices.ContainsFunc(out, func(o datapath.Route) bool { return sameGuestRoute(o, r) }) {
				out = append(out, r)
			}
		}
	}
	return out
}

// Rate limits. Kata's semantics: rx is traffic into the VM, tx out of
// it. A limit is an HTB on the egress the traffic is queued on, or, where
// the traffic passes no egress qdisc of the netns, on the egress of an
// ifb tsi<N> that the link's ingress is redirected to. Each kind says
// where its limits go (endpointKind.rateSites).

// rateSite is where one direction's limit of an endpoint goes.
type rateSite int

const (
	siteNone        rateSite = iota
	siteTapEgress            // our tap's egress
	siteLinkEgress           // the container link's egress
	siteLinkIngress          // the container link's ingress, through tsi<N>
)

// siteRates is what endpoint kind k wants at each site of its link: the
// limit (0: none) and its direction.
func siteRates(k endpointKind, opts Options) (egress, ingress uint64, egressDir, ingressDir string) {
	rx, tx := k.rateSites()
	egressDir, ingressDir = "tx", "rx"
	switch {
	case rx == siteLinkEgress:
		egress, egressDir = opts.RxRate, "rx"
	case tx == siteLinkEgress:
		egress = opts.TxRate
	}
	switch {
	case rx == siteLinkIngress:
		ingress = opts.RxRate
	case tx == siteLinkIngress:
		ingress, ingressDir = opts.TxRate, "tx"
	}
	return egress, ingress, egressDir, ingressDir
}

// applied is the limit EnsureRateLimit sets for bps (whole bytes per
// second), as observed back.
func applied(bps uint64) uint64 { return bps / 8 * 8 }

// ingressLimit is endpoint index's limit on link ifindex's ingress as
// observed: its ifb's, if that ifb is fed by the link.
func (v view) ingressLimit(index, ifindex int) uint64 {
	if r, ok := v.ifbs[index]; ok && r.Ifindex == ifindex {
		return r.BPS
	}
	return 0
}

// planLimits plans the rate limits of live endpoint e on link l.
func planLimits(v view, e state.Endpoint, l datapath.Link, opts Options, p *Plan) {
	k := kindOf(e)
	rx, _ := k.rateSites()
	if rx == siteTapEgress {
		have := uint64(0)
		if t, ok := v.taps[e.Index]; ok {
			have = v.limits[t.Ifindex]
		}
		if have != applied(opts.RxRate) {
			p.Actions = append(p.Actions, Action{Op: OpSetRateLimit, Endpoint: e, Rate: opts.RxRate, RateDir: "rx",
				Reason: fmt.Sprintf("limit is %d bit/s", have)})
		}
	}
	egress, ingress, egressDir, ingressDir := siteRates(k, opts)
	if have := v.limits[l.Ifindex]; have != applied(egress) {
		p.Actions = append(p.Actions, Action{Op: OpSetRateLimit, Endpoint: e, Rate: egress, RateDir: egressDir, RateOn: l.Ifindex,
			Reason: fmt.Sprintf("limit is %d bit/s", have)})
	}
	_, hasIfb := v.ifbs[e.Index]
	if have := v.ingressLimit(e.Index, l.Ifindex); have != applied(ingress) || (ingress == 0 && hasIfb) {
		p.Actions = append(p.Actions, Action{Op: OpSetRateLimit, Endpoint: e, Rate: ingress, RateDir: ingressDir, RateOn: l.Ifindex, Ingress: true,
			Reason: fmt.Sprintf("limit is %d bit/s", have)})
	}
}

// rateNotes names the limits asked for that the endpoints' kinds cannot
// carry.
func rateNotes(wired []wiredLink, opts Options) []string {
	if opts.RxRate == 0 && opts.TxRate == 0 {
		return nil
	}
	var notes []string
	for _, w := range wired {
		if w.adopted {
			continue
		}
		rx, tx := kindOf(w.endpoint).rateSites()
		kind := w.endpoint.Kind
		if kind == state.KindTap {
			kind = ModelTCFilter
		}
		if opts.RxRate > 0 && rx == siteNone {
			notes = append(notes, fmt.Sprintf("%s (%s): rx_rate not applied: this kind cannot carry one", w.link.Name, kind))
		}
		if opts.TxRate > 0 && tx == siteNone {
			notes = append(notes, fmt.Sprintf("%s (%s): tx_rate not applied: this kind cannot carry one", w.link.Name, kind))
		}
	}
	return notes
}

// openQueuesFunc opens the queues endpoint e's NIC is plugged on.
type openQueuesFunc func(ctx context.Context, h Host, vhost datapath.Vhost, e state.Endpoint, spec datapath.TapSpec) (*datapath.Queues, error)

// queueOpeners opens the queues of each endpoint kind, by its name;
// TestQueueOpeners checks that every kind has its entry.
var queueOpeners = map[string]openQueuesFunc{
	state.KindTap:         openTapQueues,
	state.KindTapLink:     openTapLinkQueues,
	state.KindMacvtap:     openMacvtapQueues,
	state.KindMacvtapLink: openMacvtapLinkQueues,
}

// queueOpenerOf is how endpoint e's queues are opened. A kind this build
// does not know opens as a tcfilter tap, as it is repaired (unknownKind).
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
	return datapath.MacvtapSpec{Index: e.Index, Container: e.LinkIfindex, MAC: guestMAC(e), Queues: max(e.Queues, 1), MTU: mtu}
}
