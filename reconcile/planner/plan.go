package planner

import (
	"fmt"
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

	// PlugCounted (OpPlugNIC): the endpoint's record step in this plan
	// counts this plug already (see countPlugsInRecordSteps), so the plug
	// step writes no record of its own.
	PlugCounted bool
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
