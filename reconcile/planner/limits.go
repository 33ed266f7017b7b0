package planner

import (
	"fmt"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// Rate limits. Kata's semantics: rx is traffic into the VM, tx out of
// it. A limit is an HTB on the egress the traffic is queued on, or, where
// the traffic passes no egress qdisc of the netns, on the egress of an
// ifb tsi<N> that the link's ingress is redirected to. Each kind says
// where its limits go (endpointKind.rateSites).

// RateSite is where one direction's limit of an endpoint goes.
type RateSite int

// Rate sites.
const (
	SiteNone        RateSite = iota // the kind cannot carry the limit
	SiteTapEgress                   // our tap's egress
	SiteLinkEgress                  // the container link's egress
	SiteLinkIngress                 // the container link's ingress, through tsi<N>
)

// RateSites says where endpoint e's rx and tx limits go.
func RateSites(e state.Endpoint) (rx, tx RateSite) { return kindOf(e).rateSites() }

// siteRates is what endpoint kind k wants at each site of its link: the
// limit (0: none) and its direction.
func siteRates(k endpointKind, opts Options) (egress, ingress uint64, egressDir, ingressDir string) {
	rx, tx := k.rateSites()
	egressDir, ingressDir = "tx", "rx"
	switch {
	case rx == SiteLinkEgress:
		egress, egressDir = opts.RxRate, "rx"
	case tx == SiteLinkEgress:
		egress = opts.TxRate
	}
	switch {
	case rx == SiteLinkIngress:
		ingress = opts.RxRate
	case tx == SiteLinkIngress:
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
func planLimits(v view, e state.Endpoint, l hostnet.Link, opts Options, p *Plan) {
	k := kindOf(e)
	rx, _ := k.rateSites()
	if rx == SiteTapEgress {
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
		if opts.RxRate > 0 && rx == SiteNone {
			notes = append(notes, fmt.Sprintf("%s (%s): rx_rate not applied: this kind cannot carry one", w.link.Name, kind))
		}
		if opts.TxRate > 0 && tx == SiteNone {
			notes = append(notes, fmt.Sprintf("%s (%s): tx_rate not applied: this kind cannot carry one", w.link.Name, kind))
		}
	}
	return notes
}
