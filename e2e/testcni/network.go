package testcni

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"net/netip"
	"sync/atomic"
)

// CNIVersion is the spec version of every conflist built here; Debian 12's
// plugins (1.1.1) speak 0.1.0 to 1.0.0.
const CNIVersion = "1.0.0"

// Network is one CNI network: a name and its conflist, as Multus would
// find it in a NetworkAttachmentDefinition.
type Network struct {
	Name string
	Conf []byte // conflist JSON
}

// Option adjusts a Network built by this package.
type Option func(*options)

type options struct {
	mtu    int
	routes []netip.Prefix
}

// WithMTU sets the MTU of the container link (and of the bridge, for
// bridge networks).
func WithMTU(mtu int) Option { return func(o *options) { o.mtu = mtu } }

// WithRoutes replaces the default route(s) IPAM hands out with routes to
// dsts via the network's gateway, as a secondary network that must not
// take the pod's default route would (e.g. a /16 via the gateway).
func WithRoutes(dsts ...netip.Prefix) Option {
	return func(o *options) { o.routes = append(o.routes, dsts...) }
}

// Gateway is the address of the node side on a network built for subnet:
// its first host address. The bridge plugin gives it to the bridge
// (isGateway); AddMacvlanMaster gives it to the node's macvlan.
func Gateway(subnet netip.Prefix) netip.Addr { return subnet.Masked().Addr().Next() }

// Bridge is a bridge network on bridge (created in the node netns) with
// host-local IPAM on subnet; the bridge holds Gateway(subnet) (isGateway)
// and the pod gets a default route via it unless WithRoutes says
// otherwise. ipMasq is off, so no plugin touches iptables.
func Bridge(name, bridge string, subnet netip.Prefix, opts ...Option) Network {
	o := apply(opts)
	return conflist(name, bridgePlugin(bridge, true, o, hostLocal(o, subnet)))
}

// BridgeDualStack is Bridge with an IPv4 and an IPv6 range: the pod gets
// one address of each, and default routes for both families unless
// WithRoutes says otherwise.
func BridgeDualStack(name, bridge string, v4, v6 netip.Prefix, opts ...Option) Network {
	o := apply(opts)
	return conflist(name, bridgePlugin(bridge, true, o, hostLocal(o, v4, v6)))
}

// Macvlan is a macvlan network in bridge mode on master, a link in the
// node netns that the test creates (AddMacvlanMaster), with host-local
// IPAM on subnet and Gateway(subnet) as the gateway.
func Macvlan(name, master string, subnet netip.Prefix, opts ...Option) Network {
	o := apply(opts)
	pl := map[string]any{
		"type":   "macvlan",
		"master": master,
		"mode":   "bridge",
		"ipam":   hostLocal(o, subnet),
	}
	if o.mtu != 0 {
		pl["mtu"] = o.mtu
	}
	return conflist(name, pl)
}

// L2Only is a bridge network without IPAM: the pod's link is up with no
// address and no route, and the bridge has no address either.
func L2Only(name, bridge string, opts ...Option) Network {
	o := apply(opts)
	return conflist(name, bridgePlugin(bridge, false, o, map[string]any{}))
}

func apply(opts []Option) options {
	var o options
	for _, f := range opts {
		f(&o)
	}
	return o
}

func bridgePlugin(bridge string, gateway bool, o options, ipam map[string]any) map[string]any {
	pl := map[string]any{
		"type":      "bridge",
		"bridge":    bridge,
		"isGateway": gateway,
		"ipMasq":    false,
		"ipam":      ipam,
	}
	if o.mtu != 0 {
		pl["mtu"] = o.mtu
	}
	return pl
}

// hostLocal is a host-local IPAM section with one range per subnet.
// Plugins.Add sets its dataDir.
func hostLocal(o options, subnets ...netip.Prefix) map[string]any {
	var ranges [][]map[string]string
	var routes []map[string]string
	for _, s := range subnets {
		ranges = append(ranges, []map[string]string{{
			"subnet":  s.Masked().String(),
			"gateway": Gateway(s).String(),
		}})
		if o.routes == nil {
			def := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
			if s.Addr().Is6() {
				def = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
			}
			routes = append(routes, map[string]string{"dst": def.String()})
		}
	}
	for _, r := range o.routes {
		// No "gw": the IPAM result's gateway of the route's family is used.
		routes = append(routes, map[string]string{"dst": r.String()})
	}
	return map[string]any{"type": "host-local", "ranges": ranges, "routes": routes}
}

func conflist(name string, plugin map[string]any) Network {
	b, err := json.Marshal(map[string]any{
		"cniVersion": CNIVersion,
		"name":       name,
		"plugins":    []any{plugin},
	})
	if err != nil {
		panic(fmt.Sprintf("encode conflist %s: %v", name, err)) // only maps of strings, numbers and bools
	}
	return Network{Name: name, Conf: b}
}

// Names and subnets come from process-wide allocators, so tests running in
// parallel in one binary never share one. Test binaries run side by side
// may pick the same ones (each starts at a random point), which is harmless:
// every test's bridges, masters and routes live in its own node netns.
var (
	subnetSeq atomic.Uint32
	nameSeq   atomic.Uint32
)

func init() {
	n, err := rand.Int(rand.Reader, big.NewInt(1<<16))
	if err != nil {
		panic(err)
	}
	subnetSeq.Store(uint32(n.Int64()))
	nameSeq.Store(uint32(n.Int64()) << 8)
}

// subnet4Count is how many /24s 10.200.0.0–10.255.255.0 holds.
const subnet4Count = 56 * 256

// Subnet4 returns a fresh IPv4 /24 from 10.200.0.0/13's upper part
// (10.200.0.0–10.255.255.0), private and unlikely to meet a real
// network's.
func Subnet4() netip.Prefix {
	n := subnetSeq.Add(1) % subnet4Count
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(200 + n/256), byte(n % 256), 0}), 24)
}

// Subnet6 returns a fresh IPv6 /64 from the unique local prefix
// fd74:6170:7379::/48.
func Subnet6() netip.Prefix {
	n := uint16(subnetSeq.Add(1))
	return netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x74, 0x61, 0x70, 0x73, 0x79, byte(n >> 8), byte(n)}), 64)
}

// UniqueName returns prefix followed by 8 hex digits, unique within the
// process; a prefix of at most 7 bytes keeps it a valid link name (15).
func UniqueName(prefix string) string {
	if len(prefix) > 7 {
		panic(fmt.Sprintf("link name prefix %q longer than 7 bytes", prefix))
	}
	b := make([]byte, 4)
	n := nameSeq.Add(1)
	b[0], b[1], b[2], b[3] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
	return prefix + hex.EncodeToString(b)
}
