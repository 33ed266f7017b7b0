package planner

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// macvtapKind is the macvtap model (state.KindMacvtap): our macvtap tsm<N>
// on the container link carries the link's MAC; the link carries
// hostnet.HostMAC meanwhile and gives up its addresses and routes, which
// the record keeps (they are the guest's) and the removal gives back.
type macvtapKind struct{}

// macvtapKinds are the links the macvtap model puts a macvtap on. An
// ipvlan's MAC is its parent's and cannot be lent.
var macvtapKinds = map[string]bool{"veth": true, "macvlan": true, "vlan": true}

func (macvtapKind) name() string { return state.KindMacvtap }

func (macvtapKind) claims(l hostnet.Link, model string) bool {
	return model == ModelMacvtap && macvtapKinds[l.Kind] && l.MAC[0]&1 == 0
}

// The addresses a macvtap moved are lost with the record: its removal
// gives the link back its MAC only.
func (k macvtapKind) recovered(v view, e state.Endpoint, _ hostnet.Link) (state.Endpoint, bool) {
	m, ok := v.macvtaps[e.Index]
	if !ok {
		return e, false
	}
	e.Kind, e.LinkMAC, e.LinkIfindex = k.name(), m.MAC.String(), m.Parent
	return e, true
}

func (macvtapKind) add(_ view, e state.Endpoint, l hostnet.Link, p *Plan) {
	p.Actions = append(p.Actions, Action{Op: OpEnsureMacvtap, Endpoint: e, MTU: l.MTU})
}

func (macvtapKind) broken(v view, e state.Endpoint, l hostnet.Link) string {
	m, mOK := v.macvtaps[e.Index]
	nic, nicOK := v.nics[e.Index]
	switch {
	case mOK && (m.Parent != l.Ifindex || m.Mode != "bridge" || !bytes.Equal(m.MAC, GuestMAC(e))):
		return fmt.Sprintf("%s is not the macvtap tapsync made (on %d, %s, %s)", m.Name, m.Parent, m.Mode, m.MAC)
	case nicOK && !bytes.Equal(nic.MAC, GuestMAC(e)):
		return fmt.Sprintf("VM NIC %s has MAC %s, endpoint has %s", nic.ID, nic.MAC, e.LinkMAC)
	case nicOK && !mOK:
		return fmt.Sprintf("VM NIC %s lost its macvtap", nic.ID)
	}
	return ""
}

// repair is one idempotent ensure-macvtap, which records addresses that
// appeared on the link since before it takes them (they must come back
// on removal).
func (macvtapKind) repair(v view, e state.Endpoint, l hostnet.Link, p *Plan) {
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

// remove deletes the macvtap (QEMU has let go of its queues), then gives
// the link back what it lent. A link whose MAC someone changed meanwhile
// keeps that MAC: it is the link's new identity, not ours to undo.
func (macvtapKind) remove(v view, e state.Endpoint, p *Plan) {
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

func (macvtapKind) device(e state.Endpoint) string { return hostnet.MacvtapName(e.Index) }

// Frames for the macvtap arrive at the link's ingress and go to its
// queues from the receive path, past no egress (rx); what the guest
// writes is sent through the link (tx on its egress).
// e2e TestMacvtapRateLimits measures this with a guest.
func (macvtapKind) rateSites() (rx, tx RateSite) { return SiteLinkIngress, SiteLinkEgress }

func (macvtapKind) borrowsLink() bool { return true }

// hostMAC is what the container link of macvtap endpoint e carries.
func hostMAC(e state.Endpoint) net.HardwareAddr {
	mac := GuestMAC(e)
	if len(mac) != 6 {
		return nil
	}
	return hostnet.HostMAC(mac, e.Index)
}

// strayAddrs are the addresses of a link whose addresses the macvtap
// model moved away: ones that appeared since. An IPv6 link-local address
// is the kernel's (derived from the MAC the link carries now), not the
// pod's.
func strayAddrs(l hostnet.Link) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range l.Addrs {
		if !(a.Addr().Is6() && a.Addr().IsLinkLocalUnicast()) {
			out = append(out, a)
		}
	}
	return out
}
