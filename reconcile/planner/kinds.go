package planner

import (
	"bytes"
	"fmt"
	"net"
	"slices"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// endpointKind is how one kind of endpoint (state.Endpoint.Kind) is
// planned: what its host side is made of, how it is repaired and removed
// and where its rate limits sit. Each kind is one type in a kind_*.go
// file, listed in kinds; where its NIC's queues come from is its entry
// in reconcile's queueOpeners.
type endpointKind interface {
	// name is the kind as the record keeps it.
	name() string
	// claims reports whether a new endpoint on link l under interworking
	// model is of this kind.
	claims(l hostnet.Link, model string) bool
	// recovered reports whether the objects observed for the index of
	// unrecorded endpoint e (serving link l; zero if none) show this
	// kind, and returns e as one.
	recovered(v view, e state.Endpoint, l hostnet.Link) (state.Endpoint, bool)
	// add plans the host-side steps of new endpoint e on link l.
	add(v view, e state.Endpoint, l hostnet.Link, p *Plan)
	// broken says why live endpoint e on link l must be re-made rather
	// than repaired in place ("" if it can be repaired).
	broken(v view, e state.Endpoint, l hostnet.Link) string
	// repair plans the missing host-side steps of live endpoint e, in
	// add order.
	repair(v view, e state.Endpoint, l hostnet.Link, p *Plan)
	// remove plans the host side of e's removal, once QEMU has let go.
	remove(v view, e state.Endpoint, p *Plan)
	// device names the device whose queues e's NIC uses.
	device(e state.Endpoint) string
	// rateSites says where the kind's rx and tx limits go.
	rateSites() (rx, tx RateSite)
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
func kindFor(l hostnet.Link, model string) string {
	for _, k := range kinds {
		if k.claims(l, model) {
			return k.name()
		}
	}
	return state.KindTap
}

// Kinds are the names of the endpoint kinds this build makes, in the order
// they are tried for a new link.
func Kinds() []string {
	names := make([]string, len(kinds))
	for i, k := range kinds {
		names[i] = k.name()
	}
	return names
}

// BorrowsLink reports whether endpoint e takes its container link's MAC,
// addresses and routes for the guest while it lives, and gives them back
// when it is removed (the macvtap model).
func BorrowsLink(e state.Endpoint) bool { return kindOf(e).borrowsLink() }

// recoveredKind is endpoint e, recovered from the objects of its index,
// with the kind those objects show on link l (zero: none found).
func recoveredKind(v view, e state.Endpoint, l hostnet.Link) state.Endpoint {
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

func (unknownKind) rateSites() (rx, tx RateSite) { return SiteNone, SiteNone }

// linkIsDevice is the part of a kind whose container link is the VM's
// device already: there is nothing of ours on the host side to add,
// repair or remove, and the link itself is never changed or deleted.
type linkIsDevice struct{}

func (linkIsDevice) add(view, state.Endpoint, hostnet.Link, *Plan) {}

func (linkIsDevice) repair(view, state.Endpoint, hostnet.Link, *Plan) {}

func (linkIsDevice) remove(view, state.Endpoint, *Plan) {}

func (linkIsDevice) device(e state.Endpoint) string { return e.LinkName }

func (linkIsDevice) borrowsLink() bool { return false }

// recoveredAs is unrecorded endpoint e as kind, if the link its objects
// serve is of link kind linkKind and no tap of ours has its index.
func (linkIsDevice) recoveredAs(v view, e state.Endpoint, l hostnet.Link, linkKind, kind string) (state.Endpoint, bool) {
	if v.taps[e.Index].Ifindex != 0 || l.Kind != linkKind {
		return e, false
	}
	e.Kind = kind
	return e, true
}

// broken: only a NIC whose MAC is no longer the link's.
func (linkIsDevice) broken(v view, e state.Endpoint, l hostnet.Link) string {
	if nic, ok := v.nics[e.Index]; ok && !bytes.Equal(nic.MAC, l.MAC) {
		return fmt.Sprintf("VM NIC %s has MAC %s, link has %s", nic.ID, nic.MAC, l.MAC)
	}
	return ""
}

// add plans the steps of a new endpoint after its record step.
func add(v view, e state.Endpoint, l hostnet.Link, opts Options, p *Plan) {
	kindOf(e).add(v, e, l, p)
	planLimits(v, e, l, opts, p)
	p.Actions = append(p.Actions, Action{Op: OpPlugNIC, Endpoint: e, MTU: l.MTU})
}

// DeviceName names the device whose queues endpoint e's NIC uses: our
// tap or macvtap, or the container link itself.
func DeviceName(e state.Endpoint) string { return kindOf(e).device(e) }

// GuestMAC is the MAC endpoint e's NIC gets.
func GuestMAC(e state.Endpoint) net.HardwareAddr {
	mac, _ := net.ParseMAC(e.LinkMAC)
	return mac
}

// GuestLink is what the guest interface of endpoint e on link l mirrors:
// the link itself, or for the macvtap model the link as it was before it
// lent its MAC and addresses.
func GuestLink(e state.Endpoint, l hostnet.Link) hostnet.Link {
	if !kindOf(e).borrowsLink() {
		return l
	}
	g := l
	g.MAC = GuestMAC(e)
	g.Addrs = MovedAddrs(e)
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
func needsRestore(v view, e state.Endpoint, l hostnet.Link) bool {
	if lentMAC(e, l) || unobservable(e) {
		return true
	}
	for _, a := range MovedAddrs(e) {
		if !slices.Contains(l.Addrs, a) {
			return true
		}
	}
	for _, r := range MovedRoutes(e) {
		if !slices.Contains(v.routes, r) {
			return true
		}
	}
	return false
}

// sameGuestRoute reports whether a and b are one route to the guest.
func sameGuestRoute(a, b hostnet.Route) bool {
	return a.LinkIndex == b.LinkIndex && a.Dst == b.Dst && a.Gateway == b.Gateway && a.IPv6 == b.IPv6 && a.Metric == b.Metric
}

// beingRestored says why link l must wait before it gets a new endpoint
// ("" if it need not): a macvtap endpoint of it is being removed and has
// not given it back its MAC and addresses yet. Wired now, the new endpoint
// would record the borrowed MAC and miss the addresses.
func beingRestored(v view, rec state.Record, removing map[int]bool, l hostnet.Link) string {
	for _, e := range rec.Endpoints {
		if kindOf(e).borrowsLink() && e.LinkIfindex == l.Ifindex && (e.Removing || removing[e.Index]) && needsRestore(v, e, l) {
			return fmt.Sprintf("endpoint %d (macvtap model) is giving %s back its MAC and addresses; wired again once it has", e.Index, l.Name)
		}
	}
	return ""
}

// withMovedRoutes is the sandbox's routes plus those the macvtap model
// took from its links with their addresses: they are the guest's.
func withMovedRoutes(v view, wired []wiredLink) []hostnet.Route {
	out := slices.Clone(v.routes)
	for _, w := range wired {
		if w.adopted || !kindOf(w.endpoint).borrowsLink() {
			continue
		}
		for _, r := range MovedRoutes(w.endpoint) {
			if !slices.ContainsFunc(out, func(o hostnet.Route) bool { return sameGuestRoute(o, r) }) {
				out = append(out, r)
			}
		}
	}
	return out
}
