package datapath

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// sameAddr tells one address from another as the kernel does (local
// address, prefix length, peer).
func sameAddr(a, b MovedAddr) bool { return a.Prefix == b.Prefix && a.Peer == b.Peer }

// addrEqual reports whether a, as read from a link, is b: every
// attribute, lifetimes by whether they end.
func addrEqual(a, b MovedAddr) bool {
	return sameAddr(a, b) && a.Broadcast == b.Broadcast && a.Label == b.Label && a.Scope == b.Scope && a.Flags == b.Flags &&
		a.Metric == b.Metric && a.Proto == b.Proto && (a.ValidUntil == 0) == (b.ValidUntil == 0) && (a.PreferredUntil == 0) == (b.PreferredUntil == 0)
}

// samePlace reports whether a and b are at one place of the routing
// tables: the kernel holds one route per family, table, destination,
// source prefix, TOS and metric.
func samePlace(a, b MovedRoute) bool {
	return a.Family == b.Family && a.Table == b.Table && a.Dst == b.Dst && a.From == b.From && a.Tos == b.Tos && a.Metric == b.Metric
}

// sameNexthops reports whether a and b lead the same way.
func sameNexthops(a, b MovedRoute) bool {
	return a.Dev == b.Dev && a.Gateway == b.Gateway && slices.EqualFunc(a.Hops, b.Hops, func(x, y Hop) bool {
		return x.Dev == y.Dev && x.Gateway == y.Gateway
	})
}

// routeEqual reports whether a, as read from the kernel, is b: every
// attribute, the expiry by whether there is one.
func routeEqual(a, b MovedRoute) bool {
	return samePlace(a, b) && a.Protocol == b.Protocol && a.Scope == b.Scope && a.Type == b.Type && a.Flags == b.Flags &&
		a.Dev == b.Dev && a.Gateway == b.Gateway && a.PrefSrc == b.PrefSrc && slices.Equal(a.Hops, b.Hops) &&
		maps.Equal(a.Metrics, b.Metrics) && a.CongCtl == b.CongCtl && a.Pref == b.Pref && a.Realm == b.Realm &&
		(a.ExpiresAt == 0) == (b.ExpiresAt == 0)
}

// through reports whether r sends traffic through link ifindex.
func through(r MovedRoute, ifindex int) bool {
	return r.Dev == ifindex || slices.ContainsFunc(r.Hops, func(h Hop) bool { return h.Dev == ifindex })
}

// ErrCannotGiveBack marks a container link that carries what the macvtap
// model could not give back as it was (a route with an encapsulation, a
// nexthop object or MPLS): its addresses are not taken.
var ErrCannotGiveBack = errors.New("cannot be given back as it was")

// monotonic is the time on CLOCK_MONOTONIC.
var monotonic = func() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(fmt.Sprintf("CLOCK_MONOTONIC: %v", err)) // cannot fail on Linux
	}
	return time.Duration(ts.Nano())
}

// derived reports whether the kernel made r from an address and makes it
// again with the address: the prefix routes of the main table, the local
// and broadcast routes of the local table.
func derived(r MovedRoute) bool {
	return r.Protocol == unix.RTPROT_KERNEL && (r.Table == unix.RT_TABLE_MAIN || r.Table == unix.RT_TABLE_LOCAL)
}

// lent reads what taking the addresses of link ifindex (named name)
// takes: the addresses, and the routes of every table that the kernel
// deletes or changes with them (an IPv4 route goes with the last IPv4
// address of its device, and with its preferred source; an IPv6 route
// loses its preferred source). Every route through the link is
// included, so that what is given back can be compared whole.
func (r *rtnl) lent(ifindex int, name string, now time.Duration) ([]MovedAddr, []MovedRoute, error) {
	read, err := r.addrs(ifindex, now)
	if err != nil || len(read) == 0 {
		return nil, nil, err
	}
	addrs := make([]MovedAddr, len(read))
	mine := map[netip.Addr]bool{}
	for i, a := range read {
		addrs[i] = asTaken(a, name)
		mine[a.Prefix.Addr()] = true
	}
	all, err := r.routes(now)
	if err != nil {
		return nil, nil, err
	}
	var routes []MovedRoute
	for _, rt := range all {
		if derived(rt.MovedRoute) || !(through(rt.MovedRoute, ifindex) || mine[rt.PrefSrc]) {
			continue
		}
		if len(rt.unknown) > 0 {
			return nil, nil, fmt.Errorf("%w: route %s has %s", ErrCannotGiveBack, rt.MovedRoute, strings.Join(rt.unknown, ", "))
		}
		routes = append(routes, rt.MovedRoute)
	}
	return addrs, routes, nil
}

// take deletes addrs from link ifindex, the last first (a primary IPv4
// address after its secondaries); one already gone is success.
func (r *rtnl) take(ifindex int, addrs []MovedAddr, now time.Duration) error {
	for _, a := range slices.Backward(addrs) {
		// Equivalent to: ip address del ADDR dev CONTAINER
		if err := r.request(unix.RTM_DELADDR, 0, addrMsg(a, ifindex, now, true)...); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("delete address %s: %w", a, err)
		}
	}
	return nil
}

// dadTimeout bounds the wait for duplicate address detection of a given
// back IPv6 address that a route needs as preferred source (the kernel
// refuses a tentative one); it takes a second or two.
const dadTimeout = 10 * time.Second

// giveBack adds m's addresses and routes back to link ifindex (named
// name), as they were, then reads them back and compares. An address
// whose valid lifetime ran out meanwhile is not given back (the kernel
// would have deleted it, with routes that needed it), nor is an expired
// route or one through another link that is gone.
func (r *rtnl) giveBack(ifindex int, name string, m Moved, now time.Duration) error {
	var addrs []MovedAddr
	expired := false
	for _, a := range m.Addrs {
		if a.ValidUntil != 0 && a.ValidUntil < now+time.Second {
			expired = true
			continue
		}
		addrs = append(addrs, a)
	}
	routes := slices.DeleteFunc(slices.Clone(m.Routes), func(rt MovedRoute) bool {
		return rt.ExpiresAt != 0 && rt.ExpiresAt < now+time.Second
	})
	if err := r.giveAddrs(ifindex, name, addrs, now); err != nil {
		return err
	}
	if err := r.awaitDAD(ifindex, addrs, routes); err != nil {
		return err
	}
	routes, err := r.giveRoutes(ifindex, routes, expired, now)
	if err != nil {
		return err
	}
	return r.compare(ifindex, name, addrs, routes, now)
}

// giveAddrs adds addrs to link ifindex. One there already with other
// attributes (added by someone else since, or left by a crash) is
// replaced by the one taken. IPv4 addresses go back in their order, so a
// secondary stays secondary; IPv6 ones in reverse, because the kernel
// lists the newest of a scope first.
func (r *rtnl) giveAddrs(ifindex int, name string, addrs []MovedAddr, now time.Duration) error {
	have, err := r.addrs(ifindex, now)
	if err != nil {
		return err
	}
	var v4, v6 []MovedAddr
	for _, a := range addrs {
		if a.Prefix.Addr().Is4() {
			v4 = append(v4, a)
		} else {
			v6 = append(v6, a)
		}
	}
	slices.Reverse(v6)
	for _, a := range append(v4, v6...) {
		if i := slices.IndexFunc(have, func(h addrRead) bool { return sameAddr(h.MovedAddr, a) }); i >= 0 {
			if addrEqual(asTaken(have[i], name), a) {
				continue
			}
			// Equivalent to: ip address del ADDR dev CONTAINER
			if err := r.request(unix.RTM_DELADDR, 0, addrMsg(a, ifindex, now, true)...); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				return fmt.Errorf("replace address %s (is %s): %w", a, have[i].MovedAddr, err)
			}
		}
		// Equivalent to: ip address add ADDR [peer P] [brd B] scope S [label L] [metric M] [proto P] [FLAGS] [valid_lft V preferred_lft P] dev CONTAINER
		if err := r.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, addrMsg(a, ifindex, now, false)...); err != nil {
			return fmt.Errorf("add address %s: %w", a, err)
		}
		// Deleting a primary IPv4 address takes its secondaries with it.
		if have, err = r.addrs(ifindex, now); err != nil {
			return err
		}
	}
	return nil
}

// asTaken is a as lent would record it from link name.
func asTaken(a addrRead, name string) MovedAddr {
	if a.Label == name {
		a.Label = ""
	}
	return a.MovedAddr
}

// awaitDAD waits until the IPv6 addresses among addrs that routes need
// as preferred source have passed duplicate address detection.
func (r *rtnl) awaitDAD(ifindex int, addrs []MovedAddr, routes []MovedRoute) error {
	need := map[netip.Addr]bool{}
	for _, rt := range routes {
		if rt.PrefSrc.Is6() && slices.ContainsFunc(addrs, func(a MovedAddr) bool { return a.Prefix.Addr() == rt.PrefSrc }) {
			need[rt.PrefSrc] = true
		}
	}
	deadline := time.Now().Add(dadTimeout)
	for len(need) > 0 {
		have, err := r.addrs(ifindex, monotonic())
		if err != nil {
			return err
		}
		tentative := ""
		for _, a := range have {
			switch {
			case !need[a.Prefix.Addr()]:
			case a.flags&unix.IFA_F_DADFAILED != 0:
				return fmt.Errorf("address %s failed duplicate address detection", a.Prefix)
			case a.flags&unix.IFA_F_TENTATIVE != 0:
				tentative = a.Prefix.String()
			}
		}
		if tentative == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("address %s still tentative after %s", tentative, dadTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// giveRoutes adds routes back, in rounds: a route whose gateway is
// reachable only through another of them succeeds once that one is
// there. A route at its place already is kept when it is the same, and
// replaced when it leads the same way (the kernel stripped its preferred
// source); one leading elsewhere is someone else's and is an error. It
// returns the routes given back: one through another link that is gone
// was taken by the kernel with that link and is left out, and so, when
// an address expired, is one that cannot be added without it.
func (r *rtnl) giveRoutes(ifindex int, routes []MovedRoute, expired bool, now time.Duration) ([]MovedRoute, error) {
	given := slices.Clone(routes)
	pending := routes
	for len(pending) > 0 {
		have, err := r.routes(now)
		if err != nil {
			return nil, err
		}
		var failed []MovedRoute
		var errs []error
		for _, rt := range pending {
			if err := r.giveRoute(rt, have, now); err != nil {
				failed = append(failed, rt)
				errs = append(errs, fmt.Errorf("route %s: %w", rt, err))
			}
		}
		if len(failed) < len(pending) {
			pending = failed
			continue
		}
		var stuck []error
		for i, rt := range failed {
			gone := (errors.Is(errs[i], unix.ENODEV) && !through(rt, ifindex)) ||
				(expired && (errors.Is(errs[i], unix.ENETUNREACH) || errors.Is(errs[i], unix.EINVAL)))
			if gone {
				given = slices.DeleteFunc(given, func(g MovedRoute) bool { return samePlace(g, rt) })
			} else {
				stuck = append(stuck, errs[i])
			}
		}
		return given, errors.Join(stuck...)
	}
	return given, nil
}

// giveRoute adds rt, or replaces the route at its place that leads the
// same way.
func (r *rtnl) giveRoute(rt MovedRoute, have []routeRead, now time.Duration) error {
	i := slices.IndexFunc(have, func(h routeRead) bool { return samePlace(h.MovedRoute, rt) })
	if i < 0 {
		// Equivalent to: ip route add …
		return r.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, routeMsg(rt, now)...)
	}
	cur := have[i].MovedRoute
	if routeEqual(cur, rt) {
		return nil
	}
	if !sameNexthops(cur, rt) {
		return fmt.Errorf("%w: %s holds its place; left as it is", unix.EEXIST, cur)
	}
	// Equivalent to: ip route replace …
	return r.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, routeMsg(rt, now)...)
}

// compare reads link ifindex's addresses and the routes back and says
// how they differ from addrs and routes.
func (r *rtnl) compare(ifindex int, name string, addrs []MovedAddr, routes []MovedRoute, now time.Duration) error {
	have, err := r.addrs(ifindex, now)
	if err != nil {
		return err
	}
	var diffs []string
	last := -1
	for _, a := range addrs {
		i := slices.IndexFunc(have, func(h addrRead) bool { return sameAddr(h.MovedAddr, a) })
		switch {
		case i < 0:
			diffs = append(diffs, "address "+a.String()+" missing")
		case !addrEqual(asTaken(have[i], name), a):
			diffs = append(diffs, fmt.Sprintf("address %s is %s", a, asTaken(have[i], name)))
		case a.Prefix.Addr().Is4() && i < last:
			diffs = append(diffs, fmt.Sprintf("address %s moved before another", a))
		case a.Prefix.Addr().Is4():
			last = i
		}
	}
	all, err := r.routes(now)
	if err != nil {
		return err
	}
	for _, rt := range routes {
		i := slices.IndexFunc(all, func(h routeRead) bool { return samePlace(h.MovedRoute, rt) })
		switch {
		case i < 0:
			diffs = append(diffs, "route "+rt.String()+" missing")
		case !routeEqual(all[i].MovedRoute, rt):
			diffs = append(diffs, fmt.Sprintf("route %s is %s", rt, all[i].MovedRoute))
		}
	}
	if len(diffs) > 0 {
		return fmt.Errorf("given back, but not as it was: %s", strings.Join(diffs, "; "))
	}
	return nil
}
