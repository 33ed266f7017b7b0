package main

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The guest side of the floor (B5 mode, -agent): after the NIC is
// plugged, the agent calls tapsync makes for it, with the connection
// dialled in advance and nothing looked up in the guest: UpdateInterface
// with the container link's name, MAC, addresses (once CNI has set them:
// the floor waits for them on its address subscription), MTU and the
// device's PCI path (so the agent waits for the device, as tapsync's
// request makes it), then UpdateRoutes with the routes tapsync would send
// (the planner's guestRoutes: the sandbox's main-table routes that are not
// the kernel's, on wired links, named by the container link, those
// without a gateway first).

// agentCallTimeout bounds each agent call; UpdateInterface waits in the
// guest for the hot-plugged device (the test agent up to 5 s).
const agentCallTimeout = 30 * time.Second

// guestSide is what the floor needs to configure the guest.
type guestSide struct {
	agent   *agent.Client
	nl      *netlink.Handle // the sandbox netns: the container link's addresses
	addrs   chan netlink.AddrUpdate
	busPath string // the PCI path of the bus the NICs go on ("1e")
}

// dialGuest connects to the agent at url and checks that it answers.
func dialGuest(ctx context.Context, url string) (*agent.Client, error) {
	u, err := agent.ParseURL(url)
	if err != nil {
		return nil, err
	}
	c, err := agent.Dial(ctx, u, agentCallTimeout)
	if err != nil {
		return nil, err
	}
	if err := c.Check(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("agent %s: %w", url, err)
	}
	return c, nil
}

// configure tells the guest about the container link of endpoint e,
// plugged in slot, then sends every wired link's routes.
func (g *guestSide) configure(ctx context.Context, ns *datapath.Netns, e endpoint, link nic, slot int, wired map[int]endpoint) error {
	addrs, err := g.waitAddrs(ctx, link.ifindex)
	if err != nil {
		return err
	}
	want := agent.Interface{Name: e.name, MAC: link.mac, Addrs: addrs, MTU: link.mtu, NoARP: link.noARP,
		DevicePath: fmt.Sprintf("%s/%02x", g.busPath, slot)}
	if _, err := g.agent.UpdateInterface(ctx, want); err != nil {
		return fmt.Errorf("configure guest %s: %w", e.name, err)
	}
	routes, err := guestRoutes(ns, wired)
	if err != nil {
		return err
	}
	if _, err := g.agent.UpdateRoutes(ctx, routes); err != nil {
		return fmt.Errorf("guest routes after %s: %w", e.name, err)
	}
	return nil
}

// waitAddrs returns the link's addresses once it has one that is not
// IPv6 link-local (those the guest makes itself), waiting on the address
// subscription; sorted as tapsync sends them.
func (g *guestSide) waitAddrs(ctx context.Context, ifindex int) ([]netip.Prefix, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	link := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
	for {
		// Equivalent to: ip -n NS addr show dev IFINDEX
		list, err := g.nl.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("addresses of link %d: %w", ifindex, err)
		}
		var addrs []netip.Prefix
		for _, a := range list {
			ip, ok := netip.AddrFromSlice(a.IP)
			ones, _ := a.Mask.Size()
			if ok && !(ip.Unmap().Is6() && ip.IsLinkLocalUnicast()) {
				addrs = append(addrs, netip.PrefixFrom(ip.Unmap(), ones))
			}
		}
		if len(addrs) > 0 {
			slices.SortFunc(addrs, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
			return addrs, nil
		}
		// Drain to the next address event of this link.
		for found := false; !found; {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("link %d got no address within a minute", ifindex)
			case u, ok := <-g.addrs:
				if !ok {
					return nil, fmt.Errorf("address subscription closed")
				}
				found = u.LinkIndex == ifindex && u.NewAddr
			}
		}
	}
}

// guestRoutes are the routes tapsync sends the guest (the planner's
// guestRoutes): main-table unicast routes not made by the kernel, through
// wired links, named as the container link; link-local and multicast
// destinations left to the guest's kernel; those without a gateway first
// (a gateway must be reachable when its route is added).
func guestRoutes(ns *datapath.Netns, wired map[int]endpoint) ([]agent.Route, error) {
	rs, err := ns.Routes()
	if err != nil {
		return nil, err
	}
	var out []agent.Route
	for _, r := range rs {
		e, ok := wired[r.LinkIndex]
		if !ok || r.Dst.IsValid() && (r.Dst.Addr().IsLinkLocalUnicast() || r.Dst.Addr().IsMulticast()) {
			continue
		}
		out = append(out, agent.Route{Dest: r.Dst, Gateway: r.Gateway, Device: e.name, Source: r.Src, Scope: r.Scope, IPv6: r.IPv6, MTU: r.MTU})
	}
	slices.SortStableFunc(out, func(a, b agent.Route) int {
		return cmp.Or(cmp.Compare(boolInt(a.Gateway.IsValid()), boolInt(b.Gateway.IsValid())), strings.Compare(a.String(), b.String()))
	})
	return out, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// noARP reports IFF_NOARP in a link's flags.
func noARP(a *netlink.LinkAttrs) bool { return a.RawFlags&unix.IFF_NOARP != 0 }
