// Package guestnet holds the guest's network configuration as values:
// an interface, a route and a neighbour as the Kata agent configures
// them. It does no I/O and knows no protobuf: package agent sends these
// values to the agent, and the planner decides them without depending on
// ttrpc.
package guestnet

import (
	"net"
	"net/netip"
	"strings"
)

// Interface is a guest NIC as the agent configures it.
type Interface struct {
	Name       string
	MAC        net.HardwareAddr
	Addrs      []netip.Prefix // address with its prefix length
	MTU        int
	NoARP      bool
	DevicePath string // "bb/ss" (hex PCI slots), "" = do not wait for a device
}

// Route is a guest route in the main table.
type Route struct {
	Dest    netip.Prefix // !Dest.IsValid() = default route of Family
	Gateway netip.Addr   // zero = none
	Device  string
	Source  netip.Addr // zero = none
	Scope   uint8
	IPv6    bool // family
	MTU     int
}

// Neighbor is a static guest neighbour (ARP or NDP) entry.
type Neighbor struct {
	IP     netip.Addr
	MAC    net.HardwareAddr
	Device string
	State  int // NUD_* bits
	Flags  int
}

// String is the route as `ip route` would show it, for errors and logs.
func (r Route) String() string {
	var b strings.Builder
	switch {
	case r.Dest.IsValid() && r.Dest.Bits() > 0:
		b.WriteString(r.Dest.String())
	case r.IPv6:
		b.WriteString("default (v6)")
	default:
		b.WriteString("default")
	}
	if r.Gateway.IsValid() {
		b.WriteString(" via " + r.Gateway.String())
	}
	if r.Device != "" {
		b.WriteString(" dev " + r.Device)
	}
	if r.Source.IsValid() {
		b.WriteString(" src " + r.Source.String())
	}
	return b.String()
}
