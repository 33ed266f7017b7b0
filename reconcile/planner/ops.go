package planner

import (
	"fmt"
	"strings"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// Op is the kind of one step. What each Op is, is its entry in opSpecs;
// how it is applied, its entry in reconcile's appliers.
type Op int

const (
	OpRecord             Op = iota // write the endpoint to the record (intent or recovery)
	OpMarkRemoving                 // record that the endpoint's removal has started
	OpForget                       // drop the endpoint from the record, after its removal
	OpCreateTap                    // create tsn<N>
	OpFixTap                       // bring the tap up, at the container link's MTU
	OpAddRedirects                 // tc redirects link ⇄ tap
	OpPlugNIC                      // open the tap's queues, hot-add the NIC
	OpUnplugNIC                    // hot-remove the NIC and its netdev (may stay pending)
	OpRemoveRedirects              // delete our filters from link and tap
	OpDeleteTap                    // delete tsn<N>
	OpResetGuest                   // record that the endpoint's guest configuration goes with its NIC
	OpConfirmGuest                 // record that the guest interface already is as wanted
	OpConfirmGuestRoutes           // record that the guest already has the routes
	OpConfigureGuest               // agent: UpdateInterface
	OpUpdateGuestRoutes            // agent: UpdateRoutes with the full set
	OpAddGuestNeighbors            // agent: AddARPNeighbors
	OpRepairAdopted                // our redirects between a link the runtime wired and its tap
	OpEnsureMacvtap                // macvtap model: tsm<N> takes the link's MAC, the link's addresses go
	OpRemoveMacvtap                // delete tsm<N>
	OpRestoreLink                  // give the container link back its MAC, addresses and routes
	OpSetRateLimit                 // an rx or tx limit (0: none)

	NumOps // not an Op: how many there are
)

func (o Op) String() string { return o.spec().name }

// Mutates reports whether the op changes the kernel, QEMU or the guest
// (as opposed to only the record).
func (o Op) Mutates() bool { return o.spec().mutates }

// Guestward reports whether the op is a call to the guest's agent.
func (o Op) Guestward() bool { return o.spec().guestward }

// opSpec is what one Op is: its name in logs and plans, what it touches
// and how an Action of it reads. How it is applied is its entry in
// reconcile's appliers.
type opSpec struct {
	name      string
	mutates   bool // changes the kernel, QEMU or the guest, not only the record
	guestward bool // a call to the guest's agent
	// text is how an Action of the op reads, without its reason.
	text func(a Action) string
}

// spec is o's declaration. An Op outside opSpecs reads as nothing and
// counts as a mutation.
func (o Op) spec() opSpec {
	if o < 0 || o >= NumOps {
		return opSpec{mutates: true, text: func(Action) string { return "" }}
	}
	return opSpecs[o]
}

// opSpecs declares every Op. Adding an operation is adding its constant,
// its entry here and in reconcile's appliers, and the planner code that
// emits it; TestOpSpecs and reconcile's TestAppliers check that no entry
// is missing.
var opSpecs = [NumOps]opSpec{
	OpRecord: {
		name: "record",
		text: func(a Action) string {
			e := a.Endpoint
			s := fmt.Sprintf("record endpoint %d for %s (ifindex %d, %s, %s", e.Index, e.LinkName, e.LinkIfindex, e.LinkMAC, queuesStr(e.Queues))
			if e.Kind != state.KindTap {
				s += ", " + e.Kind
			}
			if e.Moved != nil {
				s += fmt.Sprintf(", moving %d addresses and %d routes", len(e.Moved.Addrs), len(e.Moved.Routes))
			}
			return s + ")"
		},
	},
	OpMarkRemoving: {
		name: "mark-removing",
		text: func(a Action) string {
			return fmt.Sprintf("record removal of endpoint %d (%s)", a.Endpoint.Index, a.Endpoint.LinkName)
		},
	},
	OpForget: {
		name: "forget",
		text: func(a Action) string {
			return fmt.Sprintf("forget endpoint %d (%s)", a.Endpoint.Index, a.Endpoint.LinkName)
		},
	},
	OpCreateTap: {
		name: "create-tap", mutates: true,
		text: func(a Action) string {
			return fmt.Sprintf("create %s (%s, mtu %d)", hostnet.TapName(a.Endpoint.Index), queuesStr(a.Endpoint.Queues), a.MTU)
		},
	},
	OpFixTap: {
		name: "fix-tap", mutates: true,
		text: func(a Action) string {
			return fmt.Sprintf("set %s up, mtu %d", hostnet.TapName(a.Endpoint.Index), a.MTU)
		},
	},
	OpAddRedirects: {
		name: "add-redirects", mutates: true,
		text: func(a Action) string {
			return fmt.Sprintf("redirect %s ⇄ %s", a.Endpoint.LinkName, hostnet.TapName(a.Endpoint.Index))
		},
	},
	OpPlugNIC: {
		name: "plug-nic", mutates: true,
		text: func(a Action) string {
			e := a.Endpoint
			s := fmt.Sprintf("hot-add NIC %d (%s) on %s", e.Index, e.LinkMAC, DeviceName(e))
			if len(a.AwaitUnplug) > 0 {
				s += fmt.Sprintf(" once NIC %v with that MAC is gone", a.AwaitUnplug)
			}
			return s
		},
	},
	OpUnplugNIC: {
		name: "unplug-nic", mutates: true,
		text: func(a Action) string {
			s := fmt.Sprintf("hot-remove NIC %d", a.Endpoint.Index)
			if a.Endpoint.UnplugRequested {
				s += " (asked before; checking back)"
			}
			return s
		},
	},
	OpRemoveRedirects: {
		name: "remove-redirects", mutates: true,
		text: func(a Action) string {
			return fmt.Sprintf("remove redirects %s ⇄ %s", a.Endpoint.LinkName, hostnet.TapName(a.Endpoint.Index))
		},
	},
	OpDeleteTap: {
		name: "delete-tap", mutates: true,
		text: func(a Action) string { return fmt.Sprintf("delete %s", hostnet.TapName(a.Endpoint.Index)) },
	},
	OpResetGuest: {
		name: "reset-guest",
		text: func(a Action) string {
			return fmt.Sprintf("forget the guest configuration of endpoint %d (%s)", a.Endpoint.Index, a.Endpoint.LinkName)
		},
	},
	OpConfirmGuest: {
		name: "confirm-guest",
		text: func(a Action) string {
			return fmt.Sprintf("record guest interface %s of endpoint %d as configured", a.Endpoint.LinkName, a.Endpoint.Index)
		},
	},
	OpConfirmGuestRoutes: {
		name: "confirm-guest-routes",
		text: func(Action) string { return "record the guest's routes as configured" },
	},
	OpConfigureGuest: {
		name: "configure-guest", mutates: true, guestward: true,
		text: func(a Action) string {
			g := a.Guest
			addrs := make([]string, len(g.Addrs))
			for i, p := range g.Addrs {
				addrs[i] = p.String()
			}
			if len(addrs) == 0 {
				addrs = []string{"no address"}
			}
			s := fmt.Sprintf("configure guest interface %s (%s): %s, mtu %d", g.Name, g.MAC, strings.Join(addrs, " "), g.MTU)
			if g.NoARP {
				s += ", noarp"
			}
			return s
		},
	},
	OpUpdateGuestRoutes: {
		name: "update-guest-routes", mutates: true, guestward: true,
		text: func(a Action) string {
			rs := make([]string, len(a.Routes))
			for i, r := range a.Routes {
				rs[i] = routeKey(r.Route)
			}
			return fmt.Sprintf("set the guest's routes (%d): %s", len(rs), strings.Join(rs, "; "))
		},
	},
	OpAddGuestNeighbors: {
		name: "add-guest-neighbors", mutates: true, guestward: true,
		text: func(a Action) string {
			return fmt.Sprintf("add %d permanent neighbours in the guest", len(a.Neighbors))
		},
	},
	OpRepairAdopted: {
		name: "repair-adopted", mutates: true,
		text: func(a Action) string {
			return fmt.Sprintf("redirect %s ⇄ %s (the runtime's tap)", a.Endpoint.LinkName, a.KataTap.Name)
		},
	},
	OpEnsureMacvtap: {
		name: "ensure-macvtap", mutates: true,
		text: func(a Action) string {
			e := a.Endpoint
			return fmt.Sprintf("macvtap %s on %s with %s (mtu %d), %s takes %s and gives up its addresses", hostnet.MacvtapName(e.Index),
				e.LinkName, e.LinkMAC, a.MTU, e.LinkName, hostMAC(e))
		},
	},
	OpRemoveMacvtap: {
		name: "remove-macvtap", mutates: true,
		text: func(a Action) string { return fmt.Sprintf("delete %s", hostnet.MacvtapName(a.Endpoint.Index)) },
	},
	OpRestoreLink: {
		name: "restore-link", mutates: true,
		text: func(a Action) string {
			return fmt.Sprintf("give %s back %s, %d addresses and %d routes", a.Endpoint.LinkName, a.Restore.MAC, len(a.Restore.Addrs), len(a.Restore.Routes))
		},
	},
	OpSetRateLimit: {
		name: "set-rate-limit", mutates: true,
		text: func(a Action) string {
			e := a.Endpoint
			on := e.LinkName
			switch {
			case a.Ingress:
				on = fmt.Sprintf("%s's ingress via %s", e.LinkName, hostnet.IfbName(e.Index))
			case a.RateOn == 0:
				on = hostnet.TapName(e.Index)
			}
			if a.Rate == 0 {
				return fmt.Sprintf("remove the %s limit of endpoint %d from %s", a.RateDir, e.Index, on)
			}
			return fmt.Sprintf("limit %s of endpoint %d to %d bit/s on %s", a.RateDir, e.Index, a.Rate, on)
		},
	},
}

func queuesStr(n int) string {
	if n == 1 {
		return "1 queue"
	}
	return fmt.Sprintf("%d queues", n)
}
