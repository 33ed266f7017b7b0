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
// whether to stay silent about it: its kind, or its being the pod's own
// plumbing, a port of a bridge or bond (a tap or macvtap port excepted: it
// is still the VM's device) or the lower device of a macvtap link. A
// redirect on such a link's ingress would take every frame before the
// bridge, bond or macvtap sees it.
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

// view indexes an observation for planning.
type view struct {
	links   map[int]hostnet.Link // by ifindex
	sorted  []hostnet.Link       // links by ifindex (sortedLinks)
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
	v.sorted = slices.Collect(maps.Values(v.links))
	slices.SortFunc(v.sorted, func(a, b hostnet.Link) int { return a.Ifindex - b.Ifindex })
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

// ownedRedirectsOn reports whether any of our redirects sits on one of
// the links ifindexes.
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

// sortedLinks returns the container links by ifindex, so that plans are
// the same for the same observation. The slice is the view's: read only.
func (v view) sortedLinks() []hostnet.Link { return v.sorted }

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
	for _, t := range v.taps {
		if t.Ifindex == i {
			return true
		}
	}
	for _, m := range v.macvtaps {
		if m.Ifindex == i {
			return true
		}
	}
	return slices.ContainsFunc(v.kata, func(k hostnet.Link) bool { return k.Ifindex == i })
}
