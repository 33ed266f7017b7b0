package planner

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
	"golang.org/x/sys/unix"
)

// What the macvtap model took from a container link lives in the record
// (state.Moved, text) from before it is taken until it is given back
// (hostnet.Moved): these convert between the two, and add what a take
// reports to what the record holds.

func stateAddr(a hostnet.MovedAddr) state.Addr {
	s := state.Addr{Prefix: a.Prefix.String(), Label: a.Label, Scope: a.Scope, Flags: a.Flags, Metric: a.Metric, Proto: a.Proto,
		ValidUntil: int64(a.ValidUntil), PreferredUntil: int64(a.PreferredUntil)}
	if a.Peer.IsValid() {
		s.Peer = a.Peer.String()
	}
	if a.Broadcast.IsValid() {
		s.Broadcast = a.Broadcast.String()
	}
	return s
}

func movedAddr(s state.Addr) (hostnet.MovedAddr, error) {
	a := hostnet.MovedAddr{Label: s.Label, Scope: s.Scope, Flags: s.Flags, Metric: s.Metric, Proto: s.Proto,
		ValidUntil: time.Duration(s.ValidUntil), PreferredUntil: time.Duration(s.PreferredUntil)}
	var err error
	if a.Prefix, err = netip.ParsePrefix(s.Prefix); err != nil {
		return a, err
	}
	if a.Peer, err = parseAddr(s.Peer); err != nil {
		return a, err
	}
	a.Broadcast, err = parseAddr(s.Broadcast)
	return a, err
}

func stateRoute(r hostnet.MovedRoute) state.Route {
	s := state.Route{IPv6: r.Family == unix.AF_INET6, Table: r.Table, Tos: r.Tos, Protocol: r.Protocol, Scope: r.Scope,
		Type: r.Type, Flags: r.Flags, Metric: r.Metric, Dev: r.Dev, Metrics: maps.Clone(r.Metrics), CongCtl: r.CongCtl,
		Pref: r.Pref, Realm: r.Realm, ExpiresAt: int64(r.ExpiresAt)}
	if r.Dst.Bits() > 0 {
		s.Dst = r.Dst.String()
	}
	if r.From.IsValid() {
		s.From = r.From.String()
	}
	if r.Gateway.IsValid() {
		s.Gateway = r.Gateway.String()
	}
	if r.PrefSrc.IsValid() {
		s.Src = r.PrefSrc.String()
	}
	for _, h := range r.Hops {
		sh := state.Hop{Dev: h.Dev, Weight: h.Weight, Flags: h.Flags, Realm: h.Realm}
		if h.Gateway.IsValid() {
			sh.Gateway = h.Gateway.String()
		}
		s.Hops = append(s.Hops, sh)
	}
	return s
}

func movedRoute(s state.Route) (hostnet.MovedRoute, error) {
	r := hostnet.MovedRoute{Family: unix.AF_INET, Table: s.Table, Tos: s.Tos, Protocol: s.Protocol, Scope: s.Scope, Type: s.Type,
		Flags: s.Flags, Metric: s.Metric, Dev: s.Dev, Metrics: maps.Clone(s.Metrics), CongCtl: s.CongCtl, Pref: s.Pref,
		Realm: s.Realm, ExpiresAt: time.Duration(s.ExpiresAt)}
	r.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	if s.IPv6 {
		r.Family, r.Dst = unix.AF_INET6, netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	var err error
	if s.Dst != "" {
		if r.Dst, err = netip.ParsePrefix(s.Dst); err != nil {
			return r, err
		}
	}
	if s.From != "" {
		if r.From, err = netip.ParsePrefix(s.From); err != nil {
			return r, err
		}
	}
	if r.Gateway, err = parseAddr(s.Gateway); err != nil {
		return r, err
	}
	if r.PrefSrc, err = parseAddr(s.Src); err != nil {
		return r, err
	}
	for _, sh := range s.Hops {
		h := hostnet.Hop{Dev: sh.Dev, Weight: sh.Weight, Flags: sh.Flags, Realm: sh.Realm}
		if h.Gateway, err = parseAddr(sh.Gateway); err != nil {
			return r, err
		}
		r.Hops = append(r.Hops, h)
	}
	return r, nil
}

// parseAddr parses s; "" is the zero Addr.
func parseAddr(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	return netip.ParseAddr(s)
}

// movedOf converts what endpoint e's record says it took from its link.
// An entry that does not parse (the record was edited by hand) is left
// out, and named in the error.
func movedOf(e state.Endpoint) (hostnet.Moved, error) {
	m := hostnet.Moved{MAC: GuestMAC(e)}
	if e.Moved == nil {
		return m, nil
	}
	var bad []string
	for _, s := range e.Moved.Addrs {
		a, err := movedAddr(s)
		if err != nil {
			bad = append(bad, fmt.Sprintf("address %+v: %v", s, err))
			continue
		}
		m.Addrs = append(m.Addrs, a)
	}
	for _, s := range e.Moved.Routes {
		r, err := movedRoute(s)
		if err != nil {
			bad = append(bad, fmt.Sprintf("route %+v: %v", s, err))
			continue
		}
		m.Routes = append(m.Routes, r)
	}
	if len(bad) > 0 {
		return m, fmt.Errorf("endpoint %d's record of what it took from %s: %v", e.Index, e.LinkName, bad)
	}
	return m, nil
}

// MovedAddrs are the prefixes endpoint e took from its link.
func MovedAddrs(e state.Endpoint) []netip.Prefix {
	m, _ := movedOf(e)
	out := make([]netip.Prefix, len(m.Addrs))
	for i, a := range m.Addrs {
		out[i] = a.Prefix
	}
	return out
}

// MovedRoutes are the routes endpoint e took from its link as datapath's
// Observe shows routes (the main table's, through the link): the guest's.
func MovedRoutes(e state.Endpoint) []hostnet.Route {
	m, _ := movedOf(e)
	var out []hostnet.Route
	for _, r := range m.Routes {
		if rt, ok := r.Route(); ok && rt.LinkIndex == e.LinkIfindex {
			out = append(out, rt)
		}
	}
	return out
}

// unobservable says whether endpoint e took what an observation cannot
// show back (routes of other tables or on other links): whether it is
// all back only the give-back itself can tell.
func unobservable(e state.Endpoint) bool {
	m, _ := movedOf(e)
	return slices.ContainsFunc(m.Routes, func(r hostnet.MovedRoute) bool {
		rt, ok := r.Route()
		return !ok || rt.LinkIndex != e.LinkIfindex
	})
}

// MergeMoved adds to prev what m took that prev lacks, and says whether
// it added anything. What prev holds is kept as it is: it was recorded
// first, as the link had it before anything was taken.
func MergeMoved(prev *state.Moved, m hostnet.Moved) (state.Moved, bool) {
	var out state.Moved
	if prev != nil {
		out = prev.Clone()
	}
	have := map[string]bool{}
	for _, s := range out.Addrs {
		if a, err := movedAddr(s); err == nil {
			have[addrKey(a)] = true
		}
	}
	changed := false
	for _, a := range m.Addrs {
		if k := addrKey(a); !have[k] {
			have[k] = true
			out.Addrs, changed = append(out.Addrs, stateAddr(a)), true
		}
	}
	for _, s := range out.Routes {
		if r, err := movedRoute(s); err == nil {
			have[movedRouteKey(r)] = true
		}
	}
	for _, r := range m.Routes {
		if k := movedRouteKey(r); !have[k] {
			have[k] = true
			out.Routes, changed = append(out.Routes, stateRoute(r)), true
		}
	}
	return out, changed
}

// addrKey and movedRouteKey name an address and a route as the kernel tells
// them apart.
func addrKey(a hostnet.MovedAddr) string { return fmt.Sprintf("addr %s peer %s", a.Prefix, a.Peer) }

func movedRouteKey(r hostnet.MovedRoute) string {
	return fmt.Sprintf("route %d %d %s from %s tos %d metric %d", r.Family, r.Table, r.Dst, r.From, r.Tos, r.Metric)
}
