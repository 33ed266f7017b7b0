package datapath

import (
	"net"

	"github.com/tapsync/tapsync/datapath/hostnet"
)

// The values this package observes and takes are hostnet's, so that a
// package that only decides from them need not import netlink. These
// names keep them where callers have always found them.
type (
	Link        = hostnet.Link
	Tap         = hostnet.Tap
	Macvtap     = hostnet.Macvtap
	Redirect    = hostnet.Redirect
	RateLimitOn = hostnet.RateLimitOn
	Route       = hostnet.Route
	Neighbor    = hostnet.Neighbor
	Moved       = hostnet.Moved
	MovedAddr   = hostnet.MovedAddr
	MovedRoute  = hostnet.MovedRoute
	Hop         = hostnet.Hop
)

// TapName is hostnet.TapName.
func TapName(index int) string { return hostnet.TapName(index) }

// ParseTapName is hostnet.ParseTapName.
func ParseTapName(name string) (int, bool) { return hostnet.ParseTapName(name) }

// ParseKataTapName is hostnet.ParseKataTapName.
func ParseKataTapName(name string) (int, bool) { return hostnet.ParseKataTapName(name) }

// ParseEndpointName is hostnet.ParseEndpointName.
func ParseEndpointName(name string) (int, bool) { return hostnet.ParseEndpointName(name) }

// MacvtapName is hostnet.MacvtapName.
func MacvtapName(index int) string { return hostnet.MacvtapName(index) }

// ParseMacvtapName is hostnet.ParseMacvtapName.
func ParseMacvtapName(name string) (int, bool) { return hostnet.ParseMacvtapName(name) }

// IfbName is hostnet.IfbName.
func IfbName(index int) string { return hostnet.IfbName(index) }

// ParseIfbName is hostnet.ParseIfbName.
func ParseIfbName(name string) (int, bool) { return hostnet.ParseIfbName(name) }

// HostMAC is hostnet.HostMAC.
func HostMAC(guest net.HardwareAddr, index int) net.HardwareAddr {
	return hostnet.HostMAC(guest, index)
}
