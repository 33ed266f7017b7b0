package reconcile

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/tapsync/tapsync/datapath"
)

// neighWorld is podWorld with a permanent neighbour on eth0.
func neighWorld() *world {
	w := podWorld()
	w.neighbors = []datapath.Neighbor{{IP: netip.MustParseAddr("10.1.0.9"), MAC: macN(9), LinkIndex: w.links[0].Ifindex, State: 0x80}}
	return w
}

// A NIC made again under a new endpoint is a new netdevice to the guest:
// the old one left with its routes and neighbours, which the new one must
// get again although the device name, and so the routes' text, is the same.
func TestReplacementNICKeepsGuestRoutesAndNeighbours(t *testing.T) {
	for _, tc := range []struct {
		name   string
		remake func(w *world)
	}{
		{"MAC changed", func(w *world) { w.setMAC("eth0", macN(7)) }},
		{"MTU raised above the NIC's host_mtu", func(w *world) { w.links[0].MTU = 9000 }},
		{"link re-created with the same MAC", func(w *world) {
			old := w.link("eth0")
			routes := slices.DeleteFunc(slices.Clone(w.routes), func(r datapath.Route) bool { return r.LinkIndex != old.Ifindex })
			neigh := slices.Clone(w.neighbors)
			w.delLink("eth0")
			i := w.addLink("eth0", "veth", old.MAC, old.MTU)
			w.links[len(w.links)-1].Addrs = old.Addrs
			for _, r := range routes {
				r.LinkIndex = i
				w.routes = append(w.routes, r)
			}
			for _, n := range neigh {
				n.LinkIndex = i
				w.neighbors = append(w.neighbors, n)
			}
		}},
		{"NIC unplugged behind tapsync's back", func(w *world) {
			w.nics = slices.DeleteFunc(w.nics, func(n NIC) bool { return n.Owned })
			delete(w.netdevs, 0)
			w.taps[0].Attached = 0
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := neighWorld()
			mustConvergeGuest(t, w)
			tc.remake(w)
			mustConvergeGuest(t, w)
		})
	}
}

// A route whose MTU or source changes in the netns is sent again: the
// guest must not keep the old one while the record says it has the new.
func TestGuestRouteAttributeChangeIsSent(t *testing.T) {
	w := podWorld()
	mustConvergeGuest(t, w)
	w.routes[1].MTU = 1400
	w.routes[0].Src = netip.MustParseAddr("10.1.0.5")
	p, _, err := w.reconcile(guestOn)
	if err != nil || guestOps(p) != "update-guest-routes" {
		t.Errorf("route MTU and source changed: plan %q, %v; want update-guest-routes", guestOps(p), err)
	}
	mustConvergeGuest(t, w)
}
