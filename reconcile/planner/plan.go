package planner

import (
	"bytes"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"

	"github.com/tapsync/tapsync/agent/guestnet"
	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// NIC is a virtio-net device as QEMU reports it.
type NIC struct {
	ID      string
	Index   int  // endpoint index, when Owned
	Owned   bool // id tapsync-net<N>
	MAC     net.HardwareAddr
	PCIPath string // where the guest finds it (the agent's devicePath), "" if unknown
}

// Observed is the actual state of one sandbox: the host side from the
// netns, the VM side from QEMU. Plan reads nothing else.
type Observed struct {
	Links     []hostnet.Link    // container links (desired endpoints)
	Taps      []hostnet.Tap     // ours (tsn<N>)
	Macvtaps  []hostnet.Macvtap // ours (tsm<N>, macvtap model)
	KataLinks []hostnet.Link    // Kata's taps and macvtaps (tap<N>_kata)
	Redirects []hostnet.Redirect
	// RateLimits are our egress limits: on taps (rx) and container links
	// (tx, or rx for a tap link).
	RateLimits []hostnet.RateLimitOn
	Routes     []hostnet.Route    // the sandbox's routes (not the kernel's own)
	Neighbors  []hostnet.Neighbor // permanent neighbours
	NICs       []NIC
	Netdevs    []int // indexes of tapsync-netdev<N> present in QEMU
	// Guest is the agent's view of the guest; nil when not asked (the
	// record shows the guest converged) or not reachable.
	Guest *GuestState
}

// Lists reports whether the observation holds a link with one of the
// ifindexes.
func (o Observed) Lists(ifindexes []int) bool {
	if len(ifindexes) == 0 {
		return false
	}
	has := func(l hostnet.Link) bool { return slices.Contains(ifindexes, l.Ifindex) }
	return slices.ContainsFunc(o.Links, has) || slices.ContainsFunc(o.KataLinks, has) ||
		slices.ContainsFunc(o.Taps, func(t hostnet.Tap) bool { return has(t.Link) }) ||
		slices.ContainsFunc(o.Macvtaps, func(m hostnet.Macvtap) bool { return has(m.Link) })
}

// Options are the per-sandbox settings plan needs.
type Options struct {
	// Queues for new endpoints; 0 is taken as 1. An endpoint keeps the
	// count it was made with: a different value here never re-plugs it.
	Queues int
	Guest  bool // configure the guest through its agent
	// RepairAdopted lets tapsync mend a link the runtime wired whose
	// redirect is broken, with redirects of its own between the link and
	// the runtime's tap. Off, the link is only reported.
	RepairAdopted bool
	// Model is the interworking model of new endpoints on links that are
	// not a VM's device already: ModelTCFilter ("" too) or ModelMacvtap.
	// An endpoint keeps the model it was made with.
	Model string
	// RxRate and TxRate limit traffic into and out of the VM, in bits per
	// second, per endpoint; 0: unlimited. A changed value changes only the
	// limit, never the NIC.
	RxRate, TxRate uint64

	teardown bool // the sandbox is going away: remove every endpoint
}

// Interworking models.
const (
	ModelTCFilter = "tcfilter"
	ModelMacvtap  = "macvtap"
)

// Action is one ordered step of a plan.
type Action struct {
	Op       Op
	Endpoint state.Endpoint // index, link identity and queues it concerns; index -1: the whole guest
	MTU      int            // OpCreateTap, OpFixTap, OpPlugNIC
	Reason   string

	Guest     guestnet.Interface // OpConfigureGuest (its DevicePath is filled in when applied)
	Routes    []GuestRoute       // OpUpdateGuestRoutes
	Neighbors []GuestNeighbor    // OpAddGuestNeighbors
	Digest    string             // guest ops: what the record keeps once done
	ifChanged bool               // OpUpdateGuestRoutes: skipped if, when sent, the digest is the record's
	again     []Action           // configure-guest steps sent first: their link changed since (see Refreshed)

	// AwaitUnplug (OpPlugNIC) names endpoints whose NIC has the same MAC
	// and is being removed: the plug waits until their unplug has
	// completed, so the guest never holds two NICs with one MAC.
	AwaitUnplug []int
	// KataTap is the runtime's tap that OpRepairAdopted joins to the
	// link (Endpoint.LinkIfindex).
	KataTap hostnet.Link
	// Restore is what OpRestoreLink gives the container link back.
	Restore hostnet.Moved
	// OpSetRateLimit: Rate bits/s (0 removes the limit) in direction
	// RateDir ("rx": into the VM, "tx": out of it) on RateOn's egress
	// (an ifindex; 0: the endpoint's tap, known once it is made).
	// With Ingress the limit is on RateOn's ingress, through the
	// endpoint's ifb (RateOn 0: only the ifb, which nothing feeds).
	Rate    uint64
	RateDir string
	RateOn  int
	Ingress bool
}

func (a Action) String() string {
	s := a.Op.spec().text(a)
	if a.Reason != "" {
		s += ": " + a.Reason
	}
	return s
}

// Skipped is a container link that plan leaves alone, and why.
type Skipped struct {
	Link    hostnet.Link
	Adopted bool // wired by someone else (Kata): never wired a second time
	// Broken: adopted, but the runtime's wiring lacks what Reason names
	// (traffic does not flow). Repaired only with Options.RepairAdopted.
	Broken bool
	Reason string
}

// Plan is the outcome of planning one sandbox.
type Plan struct {
	Actions []Action
	Skipped []Skipped
	// Notes are what the plan cannot do for wired links (a rate limit
	// their kind cannot carry), for status and logs.
	Notes []string

	askGuest bool         // see NeedsGuest
	guest    *guestInputs // what the guest steps were planned from, when the plan plugs a NIC
}

// Empty reports whether the plan changes nothing.
func (p Plan) Empty() bool { return len(p.Actions) == 0 }

func (p Plan) String() string {
	var b strings.Builder
	for i, a := range p.Actions {
		fmt.Fprintf(&b, "%2d. %s\n", i+1, a)
	}
	for _, s := range p.Skipped {
		fmt.Fprintf(&b, "    skip %s: %s\n", s.Link.Name, s.Reason)
	}
	for _, n := range p.Notes {
		fmt.Fprintf(&b, "    note: %s\n", n)
	}
	return b.String()
}

// Link kinds. A tcfilter redirect joins any Ethernet device to a tap;
// tunnels are the node's plumbing, never a pod's NIC; the rest cannot be
// wired by this model yet and are reported.
var (
	wireableKinds = map[string]bool{"veth": true, "macvlan": true, "macvtap": true, "ipvlan": true, "tap": true, "vlan": true}
	tunnelKinds   = map[string]bool{"ipip": true, "sit": true, "gre": true, "gretap": true, "ip6gre": true, "ip6gretap": true,
		"ip6tnl": true, "vti": true, "vti6": true, "wireguard": true, "erspan": true, "ip6erspan": true}
)

// portMasters are the kinds of device whose ports carry the master's
// frames, not their own: a redirect on a port would take them from it.
var portMasters = map[string]bool{"bridge": true, "bond": true, "team": true, "openvswitch": true}

// Unwireable says why container link l of observation o cannot be an
// endpoint ("" if it can), and whether plans stay silent about it.
func Unwireable(o Observed, l hostnet.Link) (reason string, silent bool) {
	return unwireable(newView(o), l)
}

// unwireable says why link l cannot be an endpoint ("" if it can) and
// whether to stay silent about it. Besides its kind, a link can be the
// pod's own plumbing: a port of a bridge or bond in the netns (a tap
// made a bridge port by a CNI, e.g. the reference tap plugin's bridge
// option, is still the VM's device), or the lower device of a macvtap
// link the VM gets. A redirect on such a link's ingress runs before the
// bridge, bond or macvtap sees a frame, and would take all of them.
func unwireable(v view, l hostnet.Link) (reason string, silent bool) {
	switch {
	case tunnelKinds[l.Kind]:
		return "tunnel device, not a pod NIC", true
	case !wireableKinds[l.Kind]:
		return fmt.Sprintf("kind %q cannot be wired by the tcfilter model", l.Kind), false
	case len(l.MAC) != 6:
		return "no Ethernet address", false
	}
	if m, ok := v.links[l.Master]; ok && portMasters[m.Kind] && l.Kind != "tap" && l.Kind != "macvtap" {
		return fmt.Sprintf("a port of %s %s: its frames are the %s's", m.Kind, m.Name, m.Kind), false
	}
	for _, u := range v.sortedLinks() {
		if u.Kind == "macvtap" && u.Parent == l.Ifindex {
			return fmt.Sprintf("lower device of macvtap link %s: its frames are the macvtap's", u.Name), false
		}
	}
	return "", false
}

// SameLink reports whether l is the link e was made for. A link whose
// MAC the macvtap model lent to the guest carries HostMAC meanwhile.
func SameLink(e state.Endpoint, l hostnet.Link) bool {
	return e.LinkIfindex == l.Ifindex && (strings.EqualFold(e.LinkMAC, l.MAC.String()) || lentMAC(e, l))
}

// lentMAC reports whether l carries the MAC the macvtap model gives a
// link while endpoint e has its own.
func lentMAC(e state.Endpoint, l hostnet.Link) bool {
	return kindOf(e).borrowsLink() && e.LinkIfindex == l.Ifindex && bytes.Equal(l.MAC, hostMAC(e))
}

func endpointFor(index int, l hostnet.Link, queues int) state.Endpoint {
	return state.Endpoint{Index: index, LinkName: l.Name, LinkIfindex: l.Ifindex, LinkMAC: l.MAC.String(), Queues: queues}
}

// view indexes an observation for planning.
type view struct {
	links   map[int]hostnet.Link // by ifindex
	taps    map[int]hostnet.Tap  // by endpoint index
	nics    map[int]NIC          // owned, by endpoint index
	netdevs map[int]bool
	redirs  []hostnet.Redirect
	foreign []NIC          // virtio-net devices without our ids
	kata    []hostnet.Link // Kata's taps and macvtaps
	// macvtaps are ours by endpoint index; limits our rate limits by
	// ifindex, in bit/s.
	macvtaps map[int]hostnet.Macvtap
	limits   map[int]uint64
	// ifbs are our ifbs tsi<N> by N, each with the link whose ingress
	// it limits (Ifindex 0: none) and its limit.
	ifbs   map[int]hostnet.RateLimitOn
	routes []hostnet.Route
}

func newView(o Observed) view {
	v := view{links: map[int]hostnet.Link{}, taps: map[int]hostnet.Tap{}, nics: map[int]NIC{}, netdevs: map[int]bool{},
		redirs: o.Redirects, kata: o.KataLinks, macvtaps: map[int]hostnet.Macvtap{}, limits: map[int]uint64{},
		ifbs: map[int]hostnet.RateLimitOn{}, routes: o.Routes}
	for _, m := range o.Macvtaps {
		if m.Index >= 0 {
			v.macvtaps[m.Index] = m
		}
	}
	for _, r := range o.RateLimits {
		if r.Ingress {
			v.ifbs[r.Ifb] = r
		} else {
			v.limits[r.Ifindex] = r.BPS
		}
	}
	for _, l := range o.Links {
		v.links[l.Ifindex] = l
	}
	for _, t := range o.Taps {
		v.taps[t.Index] = t
	}
	for _, n := range o.NICs {
		if n.Owned {
			v.nics[n.Index] = n
		} else {
			v.foreign = append(v.foreign, n)
		}
	}
	for _, n := range o.Netdevs {
		v.netdevs[n] = true
	}
	return v
}

// ownedRedirect finds our redirect from ifindex from to ifindex to.
func (v view) ownedRedirect(from, to int) bool {
	return slices.ContainsFunc(v.redirs, func(r hostnet.Redirect) bool { return r.Owned && r.From == from && r.To == to })
}

// ownedRedirectsTouch reports whether any of our redirects sits on a link.
func (v view) ownedRedirectsOn(ifindexes ...int) bool {
	return slices.ContainsFunc(v.redirs, func(r hostnet.Redirect) bool { return r.Owned && slices.Contains(ifindexes, r.From) })
}

// pairLeft reports whether any of an endpoint's redirects remain, in the
// terms of reconcile's Host.RemoveRedirects: ours on its tap (tap 0: unknown), or ours
// on its link pointing at its tap or at nothing. A filter of ours on the
// link pointing at another tap belongs to a newer endpoint.
func (v view) pairLeft(link, tap int) bool {
	return slices.ContainsFunc(v.redirs, func(r hostnet.Redirect) bool {
		return r.Owned && ((tap > 0 && r.From == tap) || (r.From == link && ((tap > 0 && r.To == tap) || !v.exists(r.To))))
	})
}

// Compute plans one sandbox: what to do so that the VM mirrors the
// container links, given what is observed and what the record says. It is
// pure: same inputs, same plan; applying the plan and planning again
// yields an empty plan.
func Compute(obs Observed, rec state.Record, opts Options) Plan {
	queues := max(opts.Queues, 1)
	v := newView(obs)
	rec = rec.Clone()
	// Order: new removals free PCI slots and taps before adds; adds and
	// repairs come before retries of removals the guest has left pending,
	// so a slow guest never holds up a new NIC.
	var p, adds, retries Plan

	recoverOrphans(v, &rec, &p)

	// Each recorded endpoint: keep and repair it, or remove it.
	claimed := map[int]bool{}       // link ifindexes served by a live endpoint
	macOwner := map[string]string{} // guest MAC → the container link whose NIC carries it (see sharesMAC)
	removing := map[int]bool{}      // endpoints on their way out
	limitWanted := map[int]bool{}   // container links whose limit a live endpoint decides
	var wired []wiredLink           // live endpoints and adopted links, for the guest
	for _, e := range rec.Endpoints {
		l, linkOK := v.links[e.LinkIfindex]
		why := ""
		switch {
		case e.Removing:
		case opts.teardown:
			why = "the sandbox is going away"
		case !linkOK:
			why = fmt.Sprintf("container link %s (ifindex %d) is gone", e.LinkName, e.LinkIfindex)
		case !SameLink(e, l):
			why = fmt.Sprintf("container link %s was re-created (MAC %s, was %s)", l.Name, l.MAC, e.LinkMAC)
		case claimed[l.Ifindex]:
			why = fmt.Sprintf("container link %s already has an endpoint", l.Name)
		case macOwner[GuestMAC(e).String()] != "":
			// Wired twice before this rule: the first endpoint keeps the NIC.
			why = sharesMAC(GuestMAC(e), macOwner[GuestMAC(e).String()])
		default:
			if r, _ := unwireable(v, l); r != "" {
				why = r
			} else {
				why = brokenReason(v, e, l)
			}
		}
		if !e.Removing && why == "" {
			claimed[l.Ifindex] = true
			macOwner[GuestMAC(e).String()] = l.Name
			if e.LinkName != l.Name {
				// Renamed in place (same ifindex and MAC): the same
				// endpoint, under its new name in the record (status,
				// logs); the guest interface follows by the guest steps.
				old := e.LinkName
				e.LinkName = l.Name
				adds.Actions = append(adds.Actions, Action{Op: OpRecord, Endpoint: e, Reason: fmt.Sprintf("container link %s renamed to %s", old, l.Name)})
			}
			_, nicOK := v.nics[e.Index]
			wired = append(wired, wiredLink{link: GuestLink(e, l), endpoint: e, plugged: !nicOK})
			repair(v, e, l, opts, &adds)
			limitWanted[l.Ifindex] = true
			continue
		}
		removing[e.Index] = true
		if e.UnplugRequested {
			remove(v, e, why, &retries)
		} else {
			remove(v, e, why, &p)
		}
	}

	// Container links nobody serves yet: adopt what the runtime wired, or
	// add new endpoints. Links whose runtime wiring is intact choose
	// first, so that of two links sharing a MAC the one the runtime
	// really wired is adopted.
	taken := map[int]bool{} // foreign NICs already matched to a link
	adoptions := map[int]adoption{}
	for _, intactFirst := range []bool{true, false} {
		for _, l := range v.sortedLinks() {
			if opts.teardown {
				break
			}
			if _, done := adoptions[l.Ifindex]; done || claimed[l.Ifindex] {
				continue
			}
			if r, _ := unwireable(v, l); r != "" {
				continue
			}
			if a, ok := v.runtimeWiring(l, taken); ok && (len(a.missing) == 0 || !intactFirst) {
				if a.nic != nil {
					taken[*a.nic] = true
				}
				adoptions[l.Ifindex] = a
			}
		}
	}
	used := usedIndexes(v, rec)
	for _, l := range v.sortedLinks() {
		if claimed[l.Ifindex] || opts.teardown {
			continue
		}
		if reason, silent := unwireable(v, l); reason != "" {
			if !silent {
				p.Skipped = append(p.Skipped, Skipped{Link: l, Reason: reason})
			}
			continue
		}
		if a, ok := adoptions[l.Ifindex]; ok {
			wired = append(wired, wiredLink{link: l, adopted: true})
			p.Skipped = append(p.Skipped, adopt(v, l, a, opts.RepairAdopted, &adds))
			continue
		}
		if other := v.foreignWithMAC(l.MAC); other != "" {
			// Someone else's NIC already carries this MAC (adopted for a
			// link sharing it): a second one would leave the guest with
			// two NICs it cannot tell apart.
			p.Skipped = append(p.Skipped, Skipped{Link: l,
				Reason: fmt.Sprintf("the VM already has a NIC with MAC %s (%s), adopted for another link; not plugging a second", l.MAC, other)})
			continue
		}
		if owner := macOwner[l.MAC.String()]; owner != "" {
			p.Skipped = append(p.Skipped, Skipped{Link: l, Reason: sharesMAC(l.MAC, owner)})
			continue
		}
		if why := beingRestored(v, rec, removing, l); why != "" {
			p.Skipped = append(p.Skipped, Skipped{Link: l, Reason: why})
			continue
		}
		macOwner[l.MAC.String()] = l.Name
		idx := lowestFree(used)
		used[idx] = true
		e := endpointFor(idx, l, queues)
		e.Kind = kindFor(l, opts.Model)
		adds.Actions = append(adds.Actions, Action{Op: OpRecord, Endpoint: e, Reason: "new container link " + l.Name})
		add(v, e, l, opts, &adds)
		limitWanted[l.Ifindex] = true
		wired = append(wired, wiredLink{link: l, endpoint: e, plugged: true})
	}
	// Our limits on links no live endpoint wants limited (its endpoint
	// went, the kind changed, a record lost) go; the kernel drops the
	// ones on our taps and macvtaps with them.
	for _, l := range v.sortedLinks() {
		if v.limits[l.Ifindex] > 0 && !limitWanted[l.Ifindex] {
			e := state.Endpoint{Index: sandboxWide.Index, LinkName: l.Name, LinkIfindex: l.Ifindex, LinkMAC: l.MAC.String()}
			adds.Actions = append(adds.Actions, Action{Op: OpSetRateLimit, Endpoint: e, RateOn: l.Ifindex, RateDir: "any",
				Reason: "no endpoint limits this link"})
		}
	}
	// Our ifbs that no live endpoint of their index feeds (its endpoint
	// went, a crash came between making it and redirecting to it, the
	// link went with the filter) go, after their filter.
	for _, n := range slices.Sorted(maps.Keys(v.ifbs)) {
		if live := slices.ContainsFunc(wired, func(w wiredLink) bool { return !w.adopted && w.endpoint.Index == n }); !live {
			r := v.ifbs[n]
			e := state.Endpoint{Index: n, LinkName: r.Name, LinkIfindex: r.Ifindex}
			adds.Actions = append(adds.Actions, Action{Op: OpSetRateLimit, Endpoint: e, RateOn: r.Ifindex, Ingress: true, RateDir: "any",
				Reason: "no endpoint limits through " + hostnet.IfbName(n)})
		}
	}
	p.Notes = rateNotes(wired, opts)
	// A NIC that replaces one of ours with the same MAC waits for the old
	// one to leave. A removal it waits for that the guest left pending is
	// checked back before the adds, so that a completed unplug lets the
	// plug go ahead in the same pass.
	awaited := map[int]bool{}
	for i, a := range adds.Actions {
		if a.Op != OpPlugNIC {
			continue
		}
		for _, n := range slices.Sorted(maps.Keys(removing)) {
			if nic, ok := v.nics[n]; ok && n != a.Endpoint.Index && strings.EqualFold(nic.MAC.String(), a.Endpoint.LinkMAC) {
				adds.Actions[i].AwaitUnplug = append(adds.Actions[i].AwaitUnplug, n)
				awaited[n] = true
			}
		}
	}
	var later []Action
	for _, a := range retries.Actions {
		if awaited[a.Endpoint.Index] {
			p.Actions = append(p.Actions, a)
		} else {
			later = append(later, a)
		}
	}
	retries.Actions = later
	p.Actions = append(p.Actions, adds.Actions...)
	if opts.Guest && !opts.teardown {
		obs.Routes = withMovedRoutes(v, wired)
		planGuest(obs, rec, wired, &p)
	}
	p.Actions = append(p.Actions, retries.Actions...)
	return p
}

// sharesMAC is why a container link with mac gets no NIC: container link
// owner's NIC carries that MAC, and the guest never holds two NICs with
// one MAC (the agent finds a guest link by its MAC). Of the links sharing
// a MAC (ipvlan slaves carry their parent's), the one wired keeps the
// NIC, else the one with the lowest ifindex gets it.
func sharesMAC(mac net.HardwareAddr, owner string) string {
	return fmt.Sprintf("shares MAC %s with %s, wired; the agent finds guest links by MAC", mac, owner)
}

// ComputeTeardown plans the end of a sandbox whose pod is going away:
// every endpoint is removed, in the same safe order as a link that went
// away. While QEMU runs, its NICs are unplugged before their taps and
// redirects go. vmGone says QEMU has exited: it holds nothing any more,
// so nothing is unplugged and the host objects go at once. Kata's own
// objects are never touched, and the guest is not asked for anything.
// The container links stay in the observation: they say which link an
// unrecorded tap of ours served, so its filter there goes too.
func ComputeTeardown(obs Observed, rec state.Record, vmGone bool) Plan {
	obs.Guest = nil
	if vmGone {
		obs.NICs, obs.Netdevs = nil, nil
	}
	return Compute(obs, rec, Options{teardown: true})
}

// brokenReason says why a live endpoint must be re-made rather than
// repaired in place ("" if it can be repaired). The queue count is not a
// reason: it was decided when the endpoint was made (recorded), and a
// default that moved since (queues = 0 follows the vCPUs, which Kata
// hot-adds) must not re-plug every NIC of the sandbox.
func brokenReason(v view, e state.Endpoint, l hostnet.Link) string {
	if nic, ok := v.nics[e.Index]; ok && e.PlugMTU > 0 && l.MTU > e.PlugMTU {
		// QEMU's host_mtu is the guest driver's max_mtu, and a realized
		// device's host_mtu cannot be changed: only a new NIC goes higher.
		return fmt.Sprintf("mtu %d is above the %d VM NIC %s was plugged with (the guest driver's maximum)", l.MTU, e.PlugMTU, nic.ID)
	}
	return kindOf(e).broken(v, e, l)
}

// repair plans the missing steps of a live endpoint, in add order.
func repair(v view, e state.Endpoint, l hostnet.Link, opts Options, p *Plan) {
	kindOf(e).repair(v, e, l, p)
	planLimits(v, e, l, opts, p)
	if _, ok := v.nics[e.Index]; !ok {
		if v.netdevs[e.Index] {
			// A netdev left without its device (unplugged behind our back,
			// or a crash between netdev_add and device_add) still holds
			// the tap's queues: delete it before opening them again.
			p.Actions = append(p.Actions, Action{Op: OpUnplugNIC, Endpoint: e, Reason: "netdev left without its device"})
		}
		if e.Guest != "" {
			p.Actions = append(p.Actions, Action{Op: OpResetGuest, Endpoint: e, Reason: "a new NIC starts unconfigured"})
		}
		p.Actions = append(p.Actions, Action{Op: OpPlugNIC, Endpoint: e, MTU: l.MTU, Reason: "NIC not in VM"})
	}
}

// sortedLinks returns the container links by ifindex: plans are the same
// for the same observation.
func (v view) sortedLinks() []hostnet.Link {
	links := slices.Collect(maps.Values(v.links))
	slices.SortFunc(links, func(a, b hostnet.Link) int { return a.Ifindex - b.Ifindex })
	return links
}

// adoption is how the runtime's own wiring of a container link stands.
type adoption struct {
	nic     *int         // index in v.foreign of the VM's NIC for the link; nil if none
	tap     hostnet.Link // the runtime's tap or macvtap for it (Ifindex 0: unknown)
	missing []string     // what traffic lacks; empty: intact
	repair  bool         // redirects between the link and tap would mend it
}

// runtimeWiring says whether the runtime wired container link l (ok) and
// how that wiring stands. Kata wires a link in one of two ways:
//   - macvtap model: a macvtap tap<N>_kata on top of l, carrying the
//     guest NIC's MAC (l itself gets a random one). l is Kata's lower
//     device, never an endpoint of ours.
//   - tcfilter model: a VM NIC without our ids with l's MAC, fed by a
//     tap<N>_kata and redirects l ⇄ tap at priority 49152.
//
// A VM NIC with l's MAC is enough to call l wired: plugging ours beside it
// would put two NICs with one MAC into the guest. Whether Kata's redirect
// is intact (a link re-created with the same MAC loses Kata's filters with
// the old link; a filter deleted by hand) decides only whether the link
// is reported broken. taken are foreign NICs matched to other links.
func (v view) runtimeWiring(l hostnet.Link, taken map[int]bool) (adoption, bool) {
	for _, k := range v.kata {
		if k.Kind != "macvtap" || k.Parent != l.Ifindex {
			continue
		}
		a := adoption{tap: k}
		if n := v.foreignNIC(k.MAC, taken); n >= 0 {
			a.nic = &n
		} else {
			a.missing = append(a.missing, fmt.Sprintf("a VM NIC with MAC %s for Kata's macvtap %s", k.MAC, k.Name))
		}
		return a, true
	}
	n := v.foreignNIC(l.MAC, taken)
	if n < 0 {
		return adoption{}, false
	}
	a := adoption{nic: &n}
	var taps []hostnet.Link
	for _, k := range v.kata {
		if k.Kind == "tap" {
			taps = append(taps, k)
		}
	}
	for _, k := range taps {
		if v.redirected(l.Ifindex, k.Ifindex) && v.redirected(k.Ifindex, l.Ifindex) {
			a.tap = k
			return a, true
		}
	}
	// Which of Kata's taps feeds the NIC? One joined to l in either
	// direction; else the only one whose redirects lead nowhere (its
	// link was re-created).
	var cands []hostnet.Link
	for _, k := range taps {
		if v.redirected(l.Ifindex, k.Ifindex) || v.redirected(k.Ifindex, l.Ifindex) {
			cands = append(cands, k)
		}
	}
	if len(cands) == 0 {
		for _, k := range taps {
			if !slices.ContainsFunc(v.redirs, func(r hostnet.Redirect) bool { return r.From == k.Ifindex && v.exists(r.To) }) {
				cands = append(cands, k)
			}
		}
	}
	switch len(cands) {
	case 0:
		a.missing = append(a.missing, fmt.Sprintf("a tap<N>_kata of the runtime's joined to %s", l.Name))
	case 1:
		a.tap, a.repair = cands[0], true
		if !v.redirected(l.Ifindex, a.tap.Ifindex) {
			a.missing = append(a.missing, fmt.Sprintf("redirect %s→%s", l.Name, a.tap.Name))
		}
		if !v.redirected(a.tap.Ifindex, l.Ifindex) {
			a.missing = append(a.missing, fmt.Sprintf("redirect %s→%s", a.tap.Name, l.Name))
		}
	default:
		names := make([]string, len(cands))
		for i, k := range cands {
			names[i] = k.Name
		}
		a.missing = append(a.missing, fmt.Sprintf("a redirect from %s to one of the runtime's taps (%s: cannot tell which)", l.Name, strings.Join(names, ", ")))
	}
	return a, true
}

// adopt reports link l as the runtime's and, when allowed and possible,
// plans the repair of its redirects.
func adopt(v view, l hostnet.Link, a adoption, repairOK bool, p *Plan) Skipped {
	dev := "no VM NIC"
	if a.nic != nil {
		dev = fmt.Sprintf("VM device %q", v.foreign[*a.nic].ID)
	}
	tap := "no tap"
	if a.tap.Ifindex != 0 {
		tap = a.tap.Name
	}
	if len(a.missing) == 0 {
		by := "the runtime"
		if v.ownedRedirect(l.Ifindex, a.tap.Ifindex) || v.ownedRedirect(a.tap.Ifindex, l.Ifindex) {
			by = "the runtime, redirects repaired by tapsync"
		}
		return Skipped{Link: l, Adopted: true, Reason: fmt.Sprintf("wired by %s (%s, %s); adopted", by, tap, dev)}
	}
	s := Skipped{Link: l, Adopted: true, Broken: true,
		Reason: fmt.Sprintf("wired by the runtime (%s, %s) but broken: missing %s", tap, dev, strings.Join(a.missing, ", "))}
	switch {
	case !a.repair:
		s.Reason += "; tapsync cannot repair this"
	case !repairOK:
		s.Reason += "; set repair_adopted = true to let tapsync repair it"
	default:
		s.Reason += "; repairing"
		e := state.Endpoint{Index: sandboxWide.Index, LinkName: l.Name, LinkIfindex: l.Ifindex, LinkMAC: l.MAC.String()}
		p.Actions = append(p.Actions, Action{Op: OpRepairAdopted, Endpoint: e, KataTap: a.tap, Reason: "missing " + strings.Join(a.missing, ", ")})
	}
	return s
}

// foreignNIC returns the index in v.foreign of a NIC with mac not yet
// taken, or -1.
func (v view) foreignNIC(mac net.HardwareAddr, taken map[int]bool) int {
	for i, n := range v.foreign {
		if !taken[i] && bytes.Equal(n.MAC, mac) {
			return i
		}
	}
	return -1
}

// foreignWithMAC names a foreign NIC with mac ("" if none).
func (v view) foreignWithMAC(mac net.HardwareAddr) string {
	for _, n := range v.foreign {
		if bytes.Equal(n.MAC, mac) {
			return fmt.Sprintf("device %q", n.ID)
		}
	}
	return ""
}

// redirected reports whether any redirect (anyone's) leads from ifindex
// from to ifindex to.
func (v view) redirected(from, to int) bool {
	return slices.ContainsFunc(v.redirs, func(r hostnet.Redirect) bool { return r.From == from && r.To == to })
}

// exists reports whether ifindex i names a link of the netns.
func (v view) exists(i int) bool {
	if _, ok := v.links[i]; ok {
		return true
	}
	return slices.ContainsFunc(slices.Collect(maps.Values(v.taps)), func(t hostnet.Tap) bool { return t.Ifindex == i }) ||
		slices.ContainsFunc(slices.Collect(maps.Values(v.macvtaps)), func(m hostnet.Macvtap) bool { return m.Ifindex == i }) ||
		slices.ContainsFunc(v.kata, func(k hostnet.Link) bool { return k.Ifindex == i })
}

// remove plans the removal of endpoint e in the safe order: QEMU lets go
// of the tap before the tap and its filters are deleted.
func remove(v view, e state.Endpoint, why string, p *Plan) {
	if !e.Removing {
		p.Actions = append(p.Actions, Action{Op: OpMarkRemoving, Endpoint: e, Reason: why})
		e.Removing = true
	}
	_, nicOK := v.nics[e.Index]
	if nicOK || (v.netdevs[e.Index] && !e.Burned) {
		p.Actions = append(p.Actions, Action{Op: OpUnplugNIC, Endpoint: e})
	}
	kindOf(e).remove(v, e, p)
	if !e.Burned { // a burned index stays reserved while QEMU holds its leftover
		p.Actions = append(p.Actions, Action{Op: OpForget, Endpoint: e})
	}
}

// recoverOrphans puts back into rec the endpoints whose owned objects are
// observed but which the record does not know (the record was set aside
// as unreadable): a QEMU device or netdev with our id, or a tap carrying
// our redirects. Matched to a container link they are kept; otherwise
// they are removed.
func recoverOrphans(v view, rec *state.Record, p *Plan) {
	evidence := map[int]bool{}
	for n := range v.nics {
		evidence[n] = true
	}
	for n := range v.netdevs {
		evidence[n] = true
	}
	for n, t := range v.taps {
		if v.ownedRedirectsOn(t.Ifindex) {
			evidence[n] = true
		}
	}
	for n := range v.macvtaps {
		evidence[n] = true
	}
	for _, n := range slices.Sorted(maps.Keys(evidence)) {
		if _, ok := rec.Endpoint(n); ok {
			continue
		}
		e := state.Endpoint{Index: n, Removing: true, Queues: 1}
		reason := "owned objects with no record and no container link"
		l, linked := linkOf(v, n)
		if linked {
			e = endpointFor(n, l, 1)
			if t, ok := v.taps[n]; ok && t.MultiQueue {
				e.Queues = max(t.Attached, 2)
			}
			reason = "owned objects found for " + l.Name + " with no record"
		}
		e = recoveredKind(v, e, l)
		rec.Put(e)
		p.Actions = append(p.Actions, Action{Op: OpRecord, Endpoint: e, Reason: "recovered: " + reason})
	}
}

// linkOf finds the container link that endpoint n's objects serve: the
// source of our redirect into tap n, or the link with the NIC's MAC.
func linkOf(v view, n int) (hostnet.Link, bool) {
	if m, ok := v.macvtaps[n]; ok {
		l, ok := v.links[m.Parent]
		return l, ok
	}
	if t, ok := v.taps[n]; ok {
		for _, r := range v.redirs {
			if l, ok := v.links[r.From]; ok && r.Owned && r.To == t.Ifindex {
				return l, true
			}
		}
	}
	if nic, ok := v.nics[n]; ok {
		for _, l := range v.sortedLinks() {
			if bytes.Equal(l.MAC, nic.MAC) {
				return l, true
			}
		}
	}
	return hostnet.Link{}, false
}

// usedIndexes are the indexes a new endpoint must not take: recorded ones
// (pending removals included); any tap, macvtap, ifb, device or netdev of
// ours of that index; and any whose device names (tsn<N>, tsm<N>, tsi<N>)
// a container link has as its name or an altname, since a pod names its
// links as it likes and the kernel refuses a name that is taken. Kata's
// tap<N>_kata are another name space.
func usedIndexes(v view, rec state.Record) map[int]bool {
	used := map[int]bool{}
	for _, e := range rec.Endpoints {
		used[e.Index] = true
	}
	for _, l := range v.links {
		for _, name := range append([]string{l.Name}, l.AltNames...) {
			if n, ok := hostnet.ParseEndpointName(name); ok {
				used[n] = true
			}
		}
	}
	for n := range v.ifbs {
		used[n] = true
	}
	for n := range v.taps {
		used[n] = true
	}
	for n := range v.macvtaps {
		used[n] = true
	}
	for n := range v.nics {
		used[n] = true
	}
	for n := range v.netdevs {
		used[n] = true
	}
	return used
}

func lowestFree(used map[int]bool) int {
	n := 0
	for used[n] {
		n++
	}
	return n
}
