package testnet

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Furnish gives link dev in ns every kind of address and route that a
// CNI chain (bridge or ptp, then sbr) or an administrator leaves on a
// pod's link, and that the macvtap model must give back exactly: a
// secondary address with a label, one of link scope with its own flags
// and finite lifetimes, one with a metric, a point-to-point one, IPv6
// ones with and without duplicate address detection; two default routes
// (metrics 0 and 100), routes with a preferred source, metrics and a
// lock, a multipath route, an sbr-style table 100 with its rules, IPv6
// routes with a preference, an expiry and a preferred source, and a
// route through another link (lo) whose preferred source is dev's.
// Addresses are in 10.<70+n>.0.0/16 and fd<70+n>::/16.
func Furnish(t testing.TB, ns NS, dev string, n int) {
	t.Helper()
	ip := func(args ...string) { IP(t, append([]string{"-n", ns.Name}, args...)...) }
	v4 := func(s string) string { return fmt.Sprintf("10.%d.%s", 70+n, s) }
	v6 := func(s string) string { return fmt.Sprintf("fd%d:%s", 70+n, s) }

	ip("addr", "add", v4("0.2/24"), "dev", dev)
	ip("addr", "add", v4("0.3/24"), "dev", dev, "label", dev+":1")
	ip("addr", "add", v4("1.2/24"), "dev", dev, "scope", "link", "noprefixroute", "valid_lft", "6000", "preferred_lft", "3000")
	ip("addr", "add", v4("2.2/24"), "dev", dev, "metric", "50")
	ip("addr", "add", v4("3.1"), "peer", v4("3.2/32"), "dev", dev)
	ip("addr", "add", v6(":2/64"), "dev", dev, "nodad")
	ip("addr", "add", v6("1::5/64"), "dev", dev, "nodad", "noprefixroute", "valid_lft", "9000", "preferred_lft", "4000")
	ip("addr", "add", v6("2::2/64"), "dev", dev) // with duplicate address detection
	WaitDAD(t, ns, dev)

	ip("route", "add", "default", "via", v4("0.1"), "dev", dev)
	ip("route", "add", "default", "via", v4("0.254"), "dev", dev, "metric", "100")
	ip("route", "add", v4("99.0/24"), "via", v4("0.1"), "src", v4("0.2"), "mtu", "lock", "1400", "advmss", "1360", "proto", "static")
	ip("route", "add", v4("98.0/24"), "nexthop", "via", v4("0.1"), "weight", "2", "nexthop", "via", v4("0.254"), "weight", "1")
	ip("route", "add", v4("97.0/24"), "dev", dev, "scope", "link", "table", "200")
	// sbr: the link's routes copied into a table of its own, chosen by
	// a rule on its address.
	ip("rule", "add", "from", v4("0.2/32"), "table", "100", "prio", "100")
	ip("route", "add", "default", "via", v4("0.1"), "dev", dev, "table", "100")
	ip("route", "add", v4("0.0/24"), "dev", dev, "proto", "kernel", "scope", "link", "src", v4("0.2"), "table", "100")
	ip("-6", "rule", "add", "from", v6(":2/128"), "table", "100", "prio", "100")
	ip("-6", "route", "add", "default", "via", v6(":1"), "dev", dev, "table", "100")

	ip("-6", "route", "add", "default", "via", v6(":1"), "dev", dev)
	ip("-6", "route", "add", "default", "via", v6(":254"), "dev", dev, "metric", "2048", "pref", "high")
	ip("-6", "route", "add", v6("99::/64"), "via", v6(":1"), "src", v6(":2"))
	ip("-6", "route", "add", v6("98::/64"), "via", v6(":1"), "expires", "8000")
	ip("-6", "route", "add", v6("97::/64"), "via", v6("2::1"), "src", v6("2::2"), "mtu", "1300")

	ip("route", "add", v4("96.0/24"), "dev", "lo", "src", v4("0.2"))
}

// WaitDAD waits until dev in ns has its IPv6 link-local address and no
// address of it is tentative.
func WaitDAD(t testing.TB, ns NS, dev string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ll := IP(t, "-n", ns.Name, "-6", "addr", "show", "dev", dev, "scope", "link")
		tentative := IP(t, "-n", ns.Name, "-6", "addr", "show", "dev", dev, "tentative")
		if strings.TrimSpace(ll) != "" && strings.TrimSpace(tentative) == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s after 10s: link-local %q, tentative %q", dev, ll, tentative)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Handle is a route netlink handle in ns, closed when t ends.
func Handle(t testing.TB, ns NS) *netlink.Handle {
	t.Helper()
	h := openHandle(t, ns)
	t.Cleanup(h.Close)
	return h
}

// openHandle is a route netlink handle in ns, for the caller to close.
func openHandle(t testing.TB, ns NS) *netlink.Handle {
	t.Helper()
	nsh, err := netns.GetFromPath(ns.Path)
	if err != nil {
		t.Fatalf("open netns %s: %v", ns.Path, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", ns.Path, err)
	}
	return h
}

// Facts describes, through netlink, the link dev in ns and everything of
// the netns that routes: the link's addresses with every attribute (in
// the kernel's order), the routes of every table of both families, and
// the rules; then the same as iproute2 shows it (ip -d addr, ip -d route
// show table all, ip rule), for what the netlink library does not decode
// (address metrics and protocols, route preferences). Remaining lifetimes
// read "finite": they count down.
func Facts(t testing.TB, ns NS, dev string) string {
	t.Helper()
	// Closed here: a test may ask for the facts many times.
	h := openHandle(t, ns)
	defer h.Close()
	link, err := h.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	names := map[int]string{}
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var b strings.Builder
	a := link.Attrs()
	fmt.Fprintf(&b, "link %s %s mtu %d flags %v\n", a.Name, a.HardwareAddr, a.MTU, a.Flags)

	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, ad := range addrs {
		fmt.Fprintf(&b, "addr %s peer %v brd %v label %q scope %d flags %#x valid %s preferred %s\n", ad.IPNet, ad.Peer, ad.Broadcast,
			ad.Label, ad.Scope, ad.Flags&^(unix.IFA_F_TENTATIVE|unix.IFA_F_OPTIMISTIC), lifetime(ad.ValidLft), lifetime(ad.PreferedLft))
	}

	routes, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, r := range routes {
		s := fmt.Sprintf("route family %d table %d type %d dst %v tos %d proto %d scope %d metric %d flags %#x dev %s gw %v src %v"+
			" mtu %d lock %v advmss %d hoplimit %d realm %d",
			r.Family, r.Table, r.Type, r.Dst, r.Tos, r.Protocol, r.Scope, r.Priority, r.Flags, names[r.LinkIndex], r.Gw, r.Src,
			r.MTU, r.MTULock, r.AdvMSS, r.Hoplimit, r.Realm)
		for _, hop := range r.MultiPath {
			s += fmt.Sprintf(" nexthop dev %s via %v weight %d flags %#x", names[hop.LinkIndex], hop.Gw, hop.Hops+1, hop.Flags)
		}
		lines = append(lines, s)
	}
	slices.Sort(lines)
	for _, l := range lines {
		b.WriteString(l + "\n")
	}

	rules, err := h.RuleList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	lines = lines[:0]
	for _, r := range rules {
		lines = append(lines, fmt.Sprintf("rule family %d prio %d table %d src %v dst %v iif %q oif %q type %d invert %v",
			r.Family, r.Priority, r.Table, r.Src, r.Dst, r.IifName, r.OifName, r.Type, r.Invert))
	}
	slices.Sort(lines)
	for _, l := range lines {
		b.WriteString(l + "\n")
	}

	ipText := func(args ...string) string {
		return countdown.ReplaceAllString(IP(t, append([]string{"-n", ns.Name}, args...)...), "$1 N$2")
	}
	b.WriteString(ipText("-d", "addr", "show", "dev", dev))
	// Routes sorted, with their nexthops: the kernel lists routes to one
	// destination through several links (each link's fe80::/64) in the
	// order they were made, and giving a link back its link-local
	// address makes its own again.
	for _, family := range []string{"-4", "-6"} {
		var routes []string
		for _, l := range strings.Split(strings.TrimSpace(ipText("-d", family, "route", "show", "table", "all")), "\n") {
			if strings.HasPrefix(l, "\t") && len(routes) > 0 {
				routes[len(routes)-1] += l
				continue
			}
			routes = append(routes, l)
		}
		slices.Sort(routes)
		b.WriteString(strings.Join(routes, "\n") + "\n")
	}
	b.WriteString(ipText("-4", "rule", "show"))
	b.WriteString(ipText("-6", "rule", "show"))
	return b.String()
}

// countdown matches what iproute2 shows counting down: remaining
// lifetimes and expiries.
var countdown = regexp.MustCompile(`(valid_lft|preferred_lft|expires) \d+(sec)`)

func lifetime(s int) string {
	if uint32(s) == 0xffffffff {
		return "forever"
	}
	return "finite"
}

// Diff shows how got differs from want, line by line: the lines missing
// and the lines added, or, with the same lines, where the order differs.
func Diff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for _, l := range w {
		if !slices.Contains(g, l) {
			fmt.Fprintf(&b, "- %s\n", l)
		}
	}
	for _, l := range g {
		if !slices.Contains(w, l) {
			fmt.Fprintf(&b, "+ %s\n", l)
		}
	}
	if b.Len() > 0 {
		return b.String()
	}
	for i := range min(len(w), len(g)) {
		if w[i] != g[i] {
			fmt.Fprintf(&b, "line %d: want %q\n         got %q\n", i+1, w[i], g[i])
		}
	}
	return "the same lines in another order:\n" + b.String()
}
