package reconcile

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/state"
)

// Endpoint kinds beyond the tcfilter tap. Which one a new endpoint gets
// depends on its container link and the sandbox's model:
//
//   - a tap link (a CNI's tap) is the VM's device already: QEMU gets its
//     queues, nothing is redirected, nothing of it is ever deleted;
//   - a macvtap link likewise, through its /dev/tap<ifindex> queues;
//   - in the macvtap model, a veth, macvlan or vlan link gets a macvtap
//     tsm<N> on top that carries the link's MAC; the link carries
//     datapath.HostMAC meanwhile and gives up its addresses, which the
//     record keeps (they are the guest's) and the removal gives back;
//   - everything else (ipvlan included, whose MAC is its parent's and
//     cannot be lent) is wired by the tcfilter model.

// macvtapKinds are the links the macvtap model puts a macvtap on.
var macvtapKinds = map[string]bool{"veth": true, "macvlan": true, "vlan": true}

// kindFor is the kind of a new endpoint for link l under model.
func kindFor(l datapath.Link, model string) string {
	switch {
	case l.Kind == "tap":
		return state.KindTapLink
	case l.Kind == "macvtap":
		return state.KindMacvtapLink
	case model == ModelMacvtap && macvtapKinds[l.Kind] && l.MAC[0]&1 == 0:
		return state.KindMacvtap
	}
	return state.KindTap
}

// add plans the steps of a new endpoint after its record step.
func add(v view, e state.Endpoint, l datapath.Link, opts Options, p *Plan) {
	switch e.Kind {
	case state.KindMacvtap:
		p.Actions = append(p.Actions, Action{Op: OpEnsureMacvtap, Endpoint: e, MTU: l.MTU})
	case state.KindTapLink, state.KindMacvtapLink:
	default:
		p.Actions = append(p.Actions, Action{Op: OpCreateTap, Endpoint: e, MTU: l.MTU}, Action{Op: OpAddRedirects, Endpoint: e})
	}
	planLimits(v, e, l, opts, p)
	p.Actions = append(p.Actions, Action{Op: OpPlugNIC, Endpoint: e, MTU: l.MTU})
}

// DeviceName names the device whose queues endpoint e's NIC uses: our
// tap or macvtap, or the container link itself.
func DeviceName(e state.Endpoint) string {
	switch e.Kind {
	case state.KindMacvtap:
		return datapath.MacvtapName(e.Index)
	case state.KindTapLink, state.KindMacvtapLink:
		return e.LinkName
	}
	return datapath.TapName(e.Index)
}

// guestMAC is the MAC endpoint e's NIC gets.
func guestMAC(e state.Endpoint) net.HardwareAddr {
	mac, _ := net.ParseMAC(e.LinkMAC)
	return mac
}

// hostMAC is what the container link of macvtap endpoint e carries.
func hostMAC(e state.Endpoint) net.HardwareAddr {
	mac := guestMAC(e)
	if len(mac) != 6 {
		return nil
	}
	return datapath.HostMAC(mac, e.Index)
}

// guestLink is what the guest interface of endpoint e on link l mirrors:
// the link itself, or for the macvtap model the link as it was before it
// lent its MAC and addresses.
func guestLink(e state.Endpoint, l datapath.Link) datapath.Link {
	if e.Kind != state.KindMacvtap {
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

// strayAddrs are the addresses of a link whose addresses the macvtap
// model moved away: ones that appeared since. An IPv6 link-local address
// is the kernel's (derived from the MAC the link carries now), not the
// pod's.
func strayAddrs(l datapath.Link) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range l.Addrs {
		if !(a.Addr().Is6() && a.Addr().IsLinkLocalUnicast()) {
			out = append(out, a)
		}
	}
	return out
}

// macvtapBroken says why macvtap endpoint e must be re-made ("" if it can
// be repaired in place).
func macvtapBroken(v view, e state.Endpoint, l datapath.Link) string {
	m, mOK := v.macvtaps[e.Index]
	nic, nicOK := v.nics[e.Index]
	switch {
	case mOK && (m.Parent != l.Ifindex || m.Mode != "bridge" || !bytes.Equal(m.MAC, guestMAC(e))):
		return fmt.Sprintf("%s is not the macvtap tapsync made (on %d, %s, %s)", m.Name, m.Parent, m.Mode, m.MAC)
	case nicOK && !bytes.Equal(nic.MAC, guestMAC(e)):
		return fmt.Sprintf("VM NIC %s has MAC %s, endpoint has %s", nic.ID, nic.MAC, e.LinkMAC)
	case nicOK && !mOK:
		return fmt.Sprintf("VM NIC %s lost its macvtap", nic.ID)
	}
	return ""
}

// repairMacvtap plans the missing host-side steps of a macvtap endpoint:
// one idempotent ensure-macvtap, which records addresses that appeared on
// the link since before it takes them (they must come back on removal).
func repairMacvtap(v view, e state.Endpoint, l datapath.Link, p *Plan) {
	m, ok := v.macvtaps[e.Index]
	stray := strayAddrs(l)
	why := ""
	switch {
	case !ok:
		why = "macvtap missing"
	case !lentMAC(e, l):
		why = l.Name + " still carries the guest's MAC"
	case len(stray) > 0:
		why = fmt.Sprintf("%s has addresses again (%v)", l.Name, stray)
	case m.MTU != l.MTU:
		why = fmt.Sprintf("%s mtu changed from %d", l.Name, m.MTU)
	case !m.Up:
		why = m.Name + " is down"
	}
	if why == "" {
		return
	}
	p.Actions = append(p.Actions, Action{Op: OpEnsureMacvtap, Endpoint: e, MTU: l.MTU, Reason: why})
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

// removeMacvtap plans the host side of a macvtap endpoint's removal:
// the macvtap goes (QEMU has let go of its queues), then the link gets
// back what it lent. A link whose MAC someone changed meanwhile keeps
// that MAC: it is the link's new identity, not ours to undo.
func removeMacvtap(v view, e state.Endpoint, p *Plan) {
	if _, ok := v.macvtaps[e.Index]; ok && !(e.Burned && v.netdevs[e.Index]) {
		p.Actions = append(p.Actions, Action{Op: OpRemoveMacvtap, Endpoint: e})
	}
	l, ok := v.links[e.LinkIfindex]
	if !ok || !needsRestore(v, e, l) {
		return
	}
	// A record entry that does not parse (edited by hand) cannot be given
	// back; the rest is.
	r, _ := movedOf(e)
	if !lentMAC(e, l) && !bytes.Equal(l.MAC, r.MAC) {
		r.MAC = l.MAC
	}
	p.Actions = append(p.Actions, Action{Op: OpRestoreLink, Endpoint: e, Restore: r})
}

// beingRestored says why link l must wait before it gets a new endpoint
// ("" if it need not): a macvtap endpoint of it is being removed and has
// not given it back its MAC and addresses yet. Wired now, the new endpoint
// would record the borrowed MAC and miss the addresses.
func beingRestored(v view, rec state.Record, removing map[int]bool, l datapath.Link) string {
	for _, e := range rec.Endpoints {
		if e.Kind == state.KindMacvtap && e.LinkIfindex == l.Ifindex && (e.Removing || removing[e.Index]) && needsRestore(v, e, l) {
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
		if w.adopted || w.endpoint.Kind != state.KindMacvtap {
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
// ifb tsi<N> that the link's ingress is redirected to:
//   - tcfilter: rx on the tap (the redirect from the link enqueues there),
//     tx on the container link (the redirect from the tap);
//   - tap link: rx on the tap link's egress (what the netns sends it goes
//     to the VM), tx on its ingress (what the VM writes enters the stack
//     there);
//   - macvtap model: rx on the container link's ingress (frames for the
//     macvtap arrive there and go to its queues from the receive path,
//     past no egress), tx on the container link's egress (what the guest
//     writes is sent by the macvtap through its lower device);
//   - macvtap link: the same on the macvtap link itself (its frames come
//     from the receive path too; what the guest writes leaves through
//     the macvtap's own egress).
// e2e TestMacvtapRateLimits measures the macvtap model with a guest.

// rateSite is where one direction's limit of an endpoint goes.
type rateSite int

const (
	siteNone        rateSite = iota
	siteTapEgress            // our tap's egress
	siteLinkEgress           // the container link's egress
	siteLinkIngress          // the container link's ingress, through tsi<N>
)

// rateSites says where kind's rx and tx limits go.
func rateSites(kind string) (rx, tx rateSite) {
	switch kind {
	case state.KindTap:
		return siteTapEgress, siteLinkEgress
	case state.KindTapLink:
		return siteLinkEgress, siteLinkIngress
	case state.KindMacvtap, state.KindMacvtapLink:
		return siteLinkIngress, siteLinkEgress
	}
	return siteNone, siteNone
}

// siteRates is what endpoint kind wants at each site of its link: the
// limit (0: none) and its direction.
func siteRates(kind string, opts Options) (egress, ingress uint64, egressDir, ingressDir string) {
	rx, tx := rateSites(kind)
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
	rx, _ := rateSites(e.Kind)
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
	egress, ingress, egressDir, ingressDir := siteRates(e.Kind, opts)
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
		rx, tx := rateSites(w.endpoint.Kind)
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
