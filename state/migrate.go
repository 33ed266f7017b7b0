package state

import (
	"encoding/json"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// A record is migrated, not set aside, when this build knows its schema
// version: what it holds and nothing else does (the addresses and routes
// the macvtap model took from a container link above all) must survive
// an upgrade of the daemon.

// decode reads a record of any schema version this build knows and
// returns it in this one, with the version it was written in.
func decode(b []byte) (Record, int, error) {
	// A record of this build's version, the common case, is read once.
	var r Record
	err := json.Unmarshal(b, &r)
	if err == nil && r.Version == Version {
		return r, Version, nil
	}
	current := err // what reading it as this version said
	r = Record{}
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return Record{}, 0, fmt.Errorf("unparsable: %w", err)
	}
	switch v.Version {
	case Version:
		err = current
	case 1:
		r, err = from1(b)
	default:
		return Record{}, v.Version, fmt.Errorf("schema version %d, this build reads 1 to %d", v.Version, Version)
	}
	if err != nil {
		return Record{}, v.Version, fmt.Errorf("unparsable as version %d: %w", v.Version, err)
	}
	r.Version = Version
	return r, v.Version, nil
}

// Version 1 kept a moved address as its prefix alone and a moved route
// as a main-table route through the link with its destination, gateway,
// source, scope, protocol and MTU. Version 2 keeps every attribute, of
// routes of every table.
type (
	record1 struct {
		Record
		Endpoints []endpoint1 `json:"endpoints"`
	}
	endpoint1 struct {
		Endpoint
		Moved *moved1 `json:"moved,omitempty"`
	}
	moved1 struct {
		Addrs  []string `json:"addrs,omitempty"`
		Routes []route1 `json:"routes,omitempty"`
	}
	route1 struct {
		Dst      string `json:"dst,omitempty"`
		Gateway  string `json:"gateway,omitempty"`
		Src      string `json:"src,omitempty"`
		Scope    uint8  `json:"scope,omitempty"`
		IPv6     bool   `json:"ipv6,omitempty"`
		Protocol int    `json:"protocol,omitempty"`
		MTU      int    `json:"mtu,omitempty"`
	}
)

// What version 1 did not record is what its give-back made: an address
// added with the netlink library's defaults (an IPv4 broadcast address
// when the prefix has room for one, lifetimes forever, no flags), a
// route in the main table (254) as unicast (1), at the kernel's default
// metric (0 for IPv4, 1024 for IPv6); an IPv6 link-local address at
// scope link, loopback's at scope host, as the kernel gives them.
const metricIPv6 = 1024

func from1(b []byte) (Record, error) {
	var old record1
	if err := json.Unmarshal(b, &old); err != nil {
		return Record{}, err
	}
	r := old.Record
	r.Endpoints = nil
	for _, oe := range old.Endpoints {
		e := oe.Endpoint
		e.Moved = nil
		if oe.Moved != nil {
			m := Moved{}
			for _, a := range oe.Moved.Addrs {
				m.Addrs = append(m.Addrs, addrFrom1(a))
			}
			for _, or := range oe.Moved.Routes {
				m.Routes = append(m.Routes, routeFrom1(or, e.LinkIfindex))
			}
			e.Moved = &m
		}
		r.Endpoints = append(r.Endpoints, e)
	}
	return r, nil
}

func addrFrom1(s string) Addr {
	a := Addr{Prefix: s}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return a
	}
	ip := p.Addr()
	switch {
	case ip.Is4() && p.Bits() < 31:
		b := ip.As4()
		for i := range b {
			b[i] |= ^mask(p.Bits(), i)
		}
		a.Broadcast = netip.AddrFrom4(b).String()
	case ip.Is6() && ip.IsLinkLocalUnicast():
		a.Scope = unix.RT_SCOPE_LINK
	case ip.Is6() && ip.IsLoopback():
		a.Scope = unix.RT_SCOPE_HOST
	}
	return a
}

// mask is byte i of a prefix mask of bits ones.
func mask(bits, i int) byte {
	n := max(0, min(8, bits-8*i))
	return byte(uint(0xff) << uint(8-n))
}

func routeFrom1(o route1, dev int) Route {
	r := Route{IPv6: o.IPv6, Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST, Dst: o.Dst, Gateway: o.Gateway, Src: o.Src,
		Scope: o.Scope, Protocol: uint8(o.Protocol), Dev: dev}
	if o.IPv6 {
		r.Metric = metricIPv6
	}
	if o.MTU != 0 {
		r.Metrics = map[string]uint32{"mtu": uint32(o.MTU)}
	}
	return r
}
