package planner

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/tapsync/tapsync/agent/guestnet"
	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// The guest side: for every endpoint tapsync plugs, the agent is told what
// the container link looks like, then the sandbox's routes on wired links,
// then permanent neighbours. What was last confirmed is kept in the record
// as digests keyed to the NIC plug they describe, and a pass whose desired
// guest state has the recorded digests makes no agent call. Whenever an
// interface is configured, the routes and neighbours through it are sent
// again. docs/reconcile.md ("Guest digests") has the rules.

// GuestState is what the agent reports of the guest.
type GuestState struct {
	Interfaces []guestnet.Interface
	Routes     []guestnet.Route
}

// GuestRoute is one route for the guest and the endpoint whose link it
// uses (-1: a link the runtime wired, adopted), with that link's NIC
// plug (see nicKey).
type GuestRoute struct {
	Route    guestnet.Route
	Endpoint int
	NIC      string
}

// GuestNeighbor is one permanent neighbour for the guest and the endpoint
// whose link it sits on (-1: adopted), with that link's NIC plug.
type GuestNeighbor struct {
	Neighbor guestnet.Neighbor
	Endpoint int
	NIC      string
}

// DesiredInterface is what the guest NIC of container link l must look
// like. IPv6 link-local addresses are the guest kernel's own business.
func DesiredInterface(l hostnet.Link) guestnet.Interface {
	var addrs []netip.Prefix
	for _, a := range l.Addrs {
		if !a.Addr().IsLinkLocalUnicast() || a.Addr().Is4() {
			addrs = append(addrs, a)
		}
	}
	slices.SortFunc(addrs, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return guestnet.Interface{Name: l.Name, MAC: l.MAC, Addrs: addrs, MTU: l.MTU, NoARP: l.NoARP}
}

// digest is a short fingerprint of canonical text; "" stays "".
func digest(text string) string {
	if text == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(text))
	return hex.EncodeToString(sum[:8])
}

func interfaceText(i guestnet.Interface) string {
	addrs := make([]string, len(i.Addrs))
	for n, a := range i.Addrs {
		addrs[n] = a.String()
	}
	return fmt.Sprintf("if %s %s mtu %d noarp %v addrs %s", i.Name, i.MAC, i.MTU, i.NoARP, strings.Join(addrs, ","))
}

func interfaceDigest(i guestnet.Interface) string { return digest(interfaceText(i)) }

// nicKey names one plug of endpoint e's NIC, with mac for the guest:
// what a guest digest was confirmed for. plugging: the plan makes that
// plug (OpPlugNIC counts it in the record before the NIC is plugged).
func nicKey(e state.Endpoint, mac net.HardwareAddr, plugging bool) string {
	plugs := e.Plugs
	if plugging {
		plugs++
	}
	return fmt.Sprintf("nic %d %s plug %d", e.Index, mac, plugs)
}

// runtimeNICKey names the NIC of a link the runtime wired.
func runtimeNICKey(mac net.HardwareAddr) string { return "runtime nic " + mac.String() }

// endpointDigest is the digest of guest interface i on the NIC plug key.
func endpointDigest(key string, i guestnet.Interface) string {
	return digest(key + ": " + interfaceText(i))
}

// routeKey is how two routes are told apart: destination (a default route
// spelt as 0.0.0.0/0 or ::/0), gateway and device.
func routeKey(r guestnet.Route) string {
	dst := r.Dest
	if !dst.IsValid() {
		dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if r.IPv6 {
			dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
	}
	gw := ""
	if r.Gateway.IsValid() {
		gw = r.Gateway.String()
	}
	return fmt.Sprintf("%s via %s dev %s", dst.Masked(), gw, r.Device)
}

func routeText(r guestnet.Route) string {
	src := ""
	if r.Source.IsValid() {
		src = r.Source.String()
	}
	return fmt.Sprintf("%s src %s scope %d mtu %d", routeKey(r), src, r.Scope, r.MTU)
}

// RoutesDigest is what the record keeps (Record.GuestRoutes) once the
// guest has routes rs, each on the NIC plug it names.
func RoutesDigest(rs []GuestRoute) string {
	lines := make([]string, len(rs))
	for i, r := range rs {
		lines[i] = routeText(r.Route) + " on " + r.NIC
	}
	return digest(strings.Join(lines, "\n"))
}

// NeighborsDigest is what the record keeps (Record.GuestNeighbors) once
// the guest has neighbours ns, each on the NIC plug it names.
func NeighborsDigest(ns []GuestNeighbor) string {
	lines := make([]string, len(ns))
	for i, n := range ns {
		lines[i] = fmt.Sprintf("%s lladdr %s dev %s state %d flags %d on %s", n.Neighbor.IP, n.Neighbor.MAC, n.Neighbor.Device,
			n.Neighbor.State, n.Neighbor.Flags, n.NIC)
	}
	return digest(strings.Join(lines, "\n"))
}

// guestHas reports whether the guest already has an interface that is
// want: same MAC, name, MTU, NOARP and addresses (IPv6 link-local aside).
func guestHas(g *GuestState, want guestnet.Interface) bool {
	for _, have := range g.Interfaces {
		if !bytes.Equal(have.MAC, want.MAC) {
			continue
		}
		got := DesiredInterface(hostnet.Link{Name: have.Name, MAC: have.MAC, MTU: have.MTU, NoARP: have.NoARP, Addrs: have.Addrs})
		return interfaceDigest(got) == interfaceDigest(want)
	}
	return false
}

// guestHasRoutes reports whether every route of want is in the guest,
// with all the attributes the digest covers (source, scope, MTU).
func guestHasRoutes(g *GuestState, want []GuestRoute) bool {
	have := map[string]bool{}
	for _, r := range g.Routes {
		have[routeText(r)] = true
	}
	for _, r := range want {
		if !have[routeText(r.Route)] {
			return false
		}
	}
	return true
}

// wiredLink is a container link whose guest NIC exists or is being made:
// an endpoint of ours (Endpoint ≥ 0) or one the runtime wired (-1).
type wiredLink struct {
	link     hostnet.Link
	endpoint state.Endpoint
	adopted  bool
	plugged  bool // the NIC is (re)plugged in this plan: the guest has nothing of it
}

// guestDevice is a wired link as the guest's routes and neighbours name
// it.
type guestDevice struct {
	name     string
	endpoint int    // -1: the runtime's
	nic      string // its NIC plug (see nicKey)
}

// planGuest appends the guest steps for the wired links, in order:
// interfaces, then routes (they name the interfaces), then neighbours.
// A plan that plugs a NIC keeps what it planned from in p.guest, and
// always has a routes step: its guest steps are brought up to date when
// sent (see Refreshed).
func planGuest(obs Observed, rec state.Record, wired []wiredLink, p *Plan) {
	// Devices whose interface the plan configures: the agent takes them
	// down to do so, and the kernel drops the routes and neighbours
	// through them.
	reconfigured := map[string]bool{}
	plugging := false
	for _, w := range wired {
		if w.adopted {
			continue
		}
		e := w.endpoint
		want := DesiredInterface(w.link)
		d := endpointDigest(deviceOf(w).nic, want)
		switch {
		case !w.plugged && e.Guest == d:
		case !w.plugged && obs.Guest != nil && guestHas(obs.Guest, want):
			p.Actions = append(p.Actions, Action{Op: OpConfirmGuest, Endpoint: e, Digest: d, Reason: "the guest already has it"})
		default:
			// A NIC this plan plugs is new to the guest: nothing the agent
			// says can spare its configuration.
			p.askGuest = p.askGuest || !w.plugged
			plugging = plugging || w.plugged
			why := "guest interface not configured"
			switch {
			case w.plugged:
				why = "NIC plugged"
			case e.Guest != "":
				why = fmt.Sprintf("%s changed", w.link.Name)
			}
			p.Actions = append(p.Actions, Action{Op: OpConfigureGuest, Endpoint: e, Guest: want, Digest: d, Reason: why})
			reconfigured[w.link.Name] = true
		}
	}
	devs := guestDevices(wired)

	routes := guestRoutes(obs.Routes, devs)
	flushed := slices.ContainsFunc(routes, func(r GuestRoute) bool { return reconfigured[r.Route.Device] })
	switch d := RoutesDigest(routes); {
	case d == rec.GuestRoutes && !flushed && plugging:
		// CNI gives a new link its addresses and routes after making
		// it, often while its NIC is being plugged.
		p.Actions = append(p.Actions, Action{Op: OpUpdateGuestRoutes, Endpoint: sandboxWide, Routes: routes, Digest: d,
			Reason: "NIC plugged: sent if the routes have changed by then", ifChanged: true})
	case d == rec.GuestRoutes && !flushed:
	case obs.Guest != nil && !flushed && guestHasRoutes(obs.Guest, routes):
		p.Actions = append(p.Actions, Action{Op: OpConfirmGuestRoutes, Endpoint: sandboxWide, Digest: d, Reason: "the guest already has them"})
	default:
		p.askGuest = p.askGuest || !flushed
		p.Actions = append(p.Actions, Action{Op: OpUpdateGuestRoutes, Endpoint: sandboxWide, Routes: routes, Digest: d})
	}

	neigh := guestNeighbors(obs.Neighbors, devs)
	// There is no call to remove a neighbour: a smaller set is not pushed.
	flushed = slices.ContainsFunc(neigh, func(n GuestNeighbor) bool { return reconfigured[n.Neighbor.Device] })
	if d := NeighborsDigest(neigh); len(neigh) > 0 && (d != rec.GuestNeighbors || flushed) {
		p.Actions = append(p.Actions, Action{Op: OpAddGuestNeighbors, Endpoint: sandboxWide, Neighbors: neigh, Digest: d})
	}
	if plugging {
		p.guest = &guestInputs{wired: wired}
	}
}

// deviceOf is wired link w as the guest's routes and neighbours name it.
func deviceOf(w wiredLink) guestDevice {
	if w.adopted {
		return guestDevice{name: w.link.Name, endpoint: -1, nic: runtimeNICKey(w.link.MAC)}
	}
	return guestDevice{name: w.link.Name, endpoint: w.endpoint.Index, nic: nicKey(w.endpoint, w.link.MAC, w.plugged)}
}

// guestDevices are the wired links by ifindex.
func guestDevices(wired []wiredLink) map[int]guestDevice {
	devs := map[int]guestDevice{}
	for _, w := range wired {
		devs[w.link.Ifindex] = deviceOf(w)
	}
	return devs
}

// guestNeighbors turns the sandbox's permanent neighbours on wired links
// into the guest's, in a stable order.
func guestNeighbors(neighbors []hostnet.Neighbor, devs map[int]guestDevice) []GuestNeighbor {
	var neigh []GuestNeighbor
	for _, n := range neighbors {
		if dev, ok := devs[n.LinkIndex]; ok && n.IP.IsValid() && len(n.MAC) > 0 {
			neigh = append(neigh, GuestNeighbor{Endpoint: dev.endpoint, NIC: dev.nic,
				Neighbor: guestnet.Neighbor{IP: n.IP, MAC: n.MAC, Device: dev.name, State: n.State, Flags: n.Flags}})
		}
	}
	slices.SortFunc(neigh, func(a, b GuestNeighbor) int {
		return cmp.Or(strings.Compare(a.Neighbor.Device, b.Neighbor.Device), a.Neighbor.IP.Compare(b.Neighbor.IP))
	})
	return neigh
}

// sandboxWide is the endpoint of steps that concern the whole guest.
var sandboxWide = state.Endpoint{Index: -1}

// guestRoutes turns the sandbox's routes on configured links into the
// guest's: device names are the container link names (the agent renames
// the guest NIC to them). Link-local and multicast destinations are the
// guest kernel's own. Routes without a gateway come first: a gateway must
// be reachable when its route is added.
func guestRoutes(routes []hostnet.Route, devs map[int]guestDevice) []GuestRoute {
	var out []GuestRoute
	for _, r := range routes {
		dev, ok := devs[r.LinkIndex]
		if !ok {
			continue
		}
		if r.Dst.IsValid() && (r.Dst.Addr().IsLinkLocalUnicast() || r.Dst.Addr().IsMulticast()) {
			continue
		}
		out = append(out, GuestRoute{Endpoint: dev.endpoint, NIC: dev.nic, Route: guestnet.Route{
			Dest: r.Dst, Gateway: r.Gateway, Device: dev.name, Source: r.Src, Scope: r.Scope, IPv6: r.IPv6, MTU: r.MTU,
		}})
	}
	slices.SortStableFunc(out, func(a, b GuestRoute) int {
		return cmp.Or(cmp.Compare(boolInt(a.Route.Gateway.IsValid()), boolInt(b.Route.Gateway.IsValid())),
			strings.Compare(routeText(a.Route), routeText(b.Route)))
	})
	return out
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// NeedsGuest reports whether the plan has guest steps that the agent's
// view of the guest could turn into confirmations. Steps for a NIC the
// plan plugs, and routes through an interface it configures, cannot be:
// the guest has nothing of them yet, so asking would only delay them.
func (p Plan) NeedsGuest() bool { return p.askGuest }
