package planner

import (
	"bytes"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// Compute plans one sandbox: what to do so that the VM mirrors the
// container links, given what is observed and what the record says. It is
// pure: same inputs, same plan; applying the plan and planning again
// yields an empty plan.
func Compute(obs Observed, rec state.Record, opts Options) Plan {
	queues := max(opts.Queues, 1)
	v := newView(obs)
	rec = rec.Clone()
	recorded := map[int]bool{}
	for _, e := range rec.Endpoints {
		recorded[e.Index] = true
	}
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
	var (
		intents []Action // the new endpoints' record steps
		made    Plan     // what is made for them
	)
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
		intents = append(intents, Action{Op: OpRecord, Endpoint: e, Reason: "new container link " + l.Name})
		add(v, e, l, opts, &made)
		limitWanted[l.Ifindex] = true
		wired = append(wired, wiredLink{link: l, endpoint: e, plugged: true})
	}
	// The new endpoints are recorded together, before anything is made
	// for any of them: one record write for a pass that finds several
	// new links (a pod's start) instead of one each. Each is still
	// recorded before its own mutations.
	adds.Actions = append(append(adds.Actions, intents...), made.Actions...)
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
	countPlugsInRecordSteps(&p, recorded)
	return p
}

// countPlugsInRecordSteps gives the record step of each endpoint new to
// the record whose NIC the plan plugs that plug's count and host MTU, as
// the plug step would have written them before plugging: one record write
// per new endpoint instead of two, and the plug still counted before it is
// made (guest digests name the plug they were confirmed for, see nicKey;
// PlugMTU caps the guest's MTU, see brokenReason). recorded holds the
// indexes the record had before this plan. An endpoint whose record step
// fails skips its plug, so a plug marked PlugCounted never runs uncounted.
func countPlugsInRecordSteps(p *Plan, recorded map[int]bool) {
	recordAt := map[int]int{} // endpoint index → its first record step so far
	for i, a := range p.Actions {
		switch {
		case a.Op == OpRecord:
			if _, ok := recordAt[a.Endpoint.Index]; !ok {
				recordAt[a.Endpoint.Index] = i
			}
		case a.Op == OpPlugNIC && !recorded[a.Endpoint.Index]:
			if j, ok := recordAt[a.Endpoint.Index]; ok {
				r := &p.Actions[j]
				r.Endpoint.Plugs++
				r.Endpoint.PlugMTU = a.MTU
				p.Actions[i].PlugCounted = true
			}
		}
	}
}

// sharesMAC is why a container link with mac gets no NIC: container link
// owner's NIC carries that MAC, and the guest never holds two NICs with
// one MAC (the agent finds a guest link by its MAC).
func sharesMAC(mac net.HardwareAddr, owner string) string {
	return fmt.Sprintf("shares MAC %s with %s, wired; the agent finds guest links by MAC", mac, owner)
}

// ComputeTeardown plans the removal of every endpoint of a sandbox whose
// pod is going away, in the safe order: NICs are unplugged before their
// taps and redirects go, unless vmGone says QEMU has exited, when the host
// objects go at once. Kata's objects and the guest are never touched; obs
// must keep the container links, which say which link an unrecorded tap
// of ours served, so that its filter there goes too.
func ComputeTeardown(obs Observed, rec state.Record, vmGone bool) Plan {
	obs.Guest = nil
	if vmGone {
		obs.NICs, obs.Netdevs = nil, nil
	}
	return Compute(obs, rec, Options{teardown: true})
}

// brokenReason says why a live endpoint must be re-made rather than
// repaired in place ("" if it can be repaired). The recorded queue count
// is never a reason: a default that moved since must not re-plug every NIC
// of the sandbox (TestQueueDefaultNeverReplugs).
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

func endpointFor(index int, l hostnet.Link, queues int) state.Endpoint {
	return state.Endpoint{Index: index, LinkName: l.Name, LinkIfindex: l.Ifindex, LinkMAC: l.MAC.String(), Queues: queues}
}
