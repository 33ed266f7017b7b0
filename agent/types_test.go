package agent

import (
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/tapsync/tapsync/agent/agentpb"
)

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func TestInterfaceConversion(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   Interface
		pb   *agentpb.Interface
	}{{
		name: "v4 and v6, noarp, device path",
		in: Interface{
			Name:       "eth1",
			MAC:        mustMAC("02:00:00:aa:bb:cc"),
			Addrs:      []netip.Prefix{netip.MustParsePrefix("10.1.2.3/24"), netip.MustParsePrefix("fd00::3/64")},
			MTU:        1400,
			NoARP:      true,
			DevicePath: "02/1f",
		},
		pb: &agentpb.Interface{
			Device: "eth1", Name: "eth1", Mtu: 1400, HwAddr: "02:00:00:aa:bb:cc", DevicePath: "02/1f", RawFlags: 0x80,
			IPAddresses: []*agentpb.IPAddress{
				{Family: agentpb.IPFamily_v4, Address: "10.1.2.3", Mask: "24"},
				{Family: agentpb.IPFamily_v6, Address: "fd00::3", Mask: "64"},
			},
		},
	}, {
		name: "no addresses, host prefixes",
		in:   Interface{Name: "net0", MAC: mustMAC("02:00:00:00:00:01"), Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("2001:db8::1/128")}},
		pb: &agentpb.Interface{Device: "net0", Name: "net0", HwAddr: "02:00:00:00:00:01", IPAddresses: []*agentpb.IPAddress{
			{Family: agentpb.IPFamily_v4, Address: "192.0.2.1", Mask: "32"},
			{Family: agentpb.IPFamily_v6, Address: "2001:db8::1", Mask: "128"},
		}},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			pb, err := interfaceToPB(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(pb, tc.pb) {
				t.Errorf("to protobuf:\n got %v\nwant %v", pb, tc.pb)
			}
			back, err := interfaceFromPB(pb)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(back, tc.in) {
				t.Errorf("round trip:\n got %+v\nwant %+v", back, tc.in)
			}
		})
	}
}

func TestInterfaceConversionErrors(t *testing.T) {
	if _, err := interfaceToPB(Interface{Name: "eth0"}); err == nil || !strings.Contains(err.Error(), "no MAC") {
		t.Errorf("no MAC: err = %v", err)
	}
	if _, err := interfaceToPB(Interface{Name: "eth0", MAC: mustMAC("02:00:00:00:00:01"), Addrs: []netip.Prefix{{}}}); err == nil {
		t.Error("invalid prefix accepted")
	}
	for _, a := range []*agentpb.IPAddress{
		{Address: "10.0.0.1", Mask: "255.255.255.0"},
		{Address: "10.0.0.1", Mask: "33"},
		{Address: "10.0.0", Mask: "24"},
	} {
		if _, err := interfaceFromPB(&agentpb.Interface{Name: "eth0", IPAddresses: []*agentpb.IPAddress{a}}); err == nil {
			t.Errorf("%v accepted", a)
		}
	}
	// Agents that fill only device still name the interface.
	i, err := interfaceFromPB(&agentpb.Interface{Device: "eth3"})
	if err != nil || i.Name != "eth3" {
		t.Errorf("device only: %+v, %v", i, err)
	}
}

func TestRouteConversion(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   Route
		pb   *agentpb.Route
	}{{
		name: "v4 default via gateway",
		in:   Route{Gateway: netip.MustParseAddr("10.1.0.1"), Device: "eth0"},
		pb:   &agentpb.Route{Gateway: "10.1.0.1", Device: "eth0", Family: agentpb.IPFamily_v4},
	}, {
		name: "v6 default via gateway",
		in:   Route{Gateway: netip.MustParseAddr("fe80::1"), Device: "eth0", IPv6: true},
		pb:   &agentpb.Route{Gateway: "fe80::1", Device: "eth0", Family: agentpb.IPFamily_v6},
	}, {
		name: "v6 default through a device only",
		in:   Route{Device: "eth0", IPv6: true},
		pb:   &agentpb.Route{Device: "eth0", Family: agentpb.IPFamily_v6},
	}, {
		name: "v4 prefix via gateway with source, scope, mtu",
		in: Route{Dest: netip.MustParsePrefix("10.2.0.0/16"), Gateway: netip.MustParseAddr("10.1.0.1"), Device: "eth1",
			Source: netip.MustParseAddr("10.1.0.5"), Scope: 0, MTU: 1400},
		pb: &agentpb.Route{Dest: "10.2.0.0/16", Gateway: "10.1.0.1", Device: "eth1", Source: "10.1.0.5", Mtu: 1400, Family: agentpb.IPFamily_v4},
	}, {
		name: "v4 link scope",
		in:   Route{Dest: netip.MustParsePrefix("10.1.0.0/24"), Device: "eth0", Scope: 253},
		pb:   &agentpb.Route{Dest: "10.1.0.0/24", Device: "eth0", Scope: 253, Family: agentpb.IPFamily_v4},
	}, {
		name: "v6 prefix",
		in:   Route{Dest: netip.MustParsePrefix("fd00:1::/64"), Device: "eth0", IPv6: true},
		pb:   &agentpb.Route{Dest: "fd00:1::/64", Device: "eth0", Family: agentpb.IPFamily_v6},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			pb, err := routeToPB(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(pb, tc.pb) {
				t.Errorf("to protobuf:\n got %v\nwant %v", pb, tc.pb)
			}
			back, err := routeFromPB(pb)
			if err != nil {
				t.Fatal(err)
			}
			if back != tc.in {
				t.Errorf("round trip:\n got %+v\nwant %+v", back, tc.in)
			}
		})
	}
}

func TestRouteFamilyFromAddresses(t *testing.T) {
	// The addresses decide the family; the IPv6 flag only matters
	// without them.
	pb, err := routeToPB(Route{Dest: netip.MustParsePrefix("fd00::/8"), IPv6: false})
	if err != nil || pb.Family != agentpb.IPFamily_v6 {
		t.Errorf("v6 dest with IPv6=false: %v, %v", pb, err)
	}
	r, err := routeFromPB(&agentpb.Route{Dest: "10.0.0.0/8", Family: agentpb.IPFamily_v6})
	if err != nil || r.IPv6 {
		t.Errorf("v4 dest with family v6: %+v, %v", r, err)
	}
	if _, err := routeToPB(Route{Dest: netip.MustParsePrefix("10.0.0.0/8"), Gateway: netip.MustParseAddr("fd00::1")}); err == nil || !strings.Contains(err.Error(), "mixed") {
		t.Errorf("mixed families: err = %v", err)
	}
	for _, d := range []string{"", "default"} {
		r, err := routeFromPB(&agentpb.Route{Dest: d, Device: "eth0"})
		if err != nil || r.Dest.IsValid() {
			t.Errorf("dest %q: %+v, %v", d, r, err)
		}
	}
	r, err = routeFromPB(&agentpb.Route{Dest: "10.9.8.7"})
	if err != nil || r.Dest != netip.MustParsePrefix("10.9.8.7/32") {
		t.Errorf("bare address dest: %+v, %v", r, err)
	}
	for _, pb := range []*agentpb.Route{{Dest: "10.0.0.0/33"}, {Dest: "x"}, {Gateway: "10.0.0"}, {Source: "::g"}} {
		if _, err := routeFromPB(pb); err == nil {
			t.Errorf("%v accepted", pb)
		}
	}
}

func TestNeighborConversion(t *testing.T) {
	pb, err := neighborToPB(Neighbor{IP: netip.MustParseAddr("fd00::1"), MAC: mustMAC("02:00:00:00:00:09"), Device: "eth0", State: 0x80, Flags: 1})
	if err != nil {
		t.Fatal(err)
	}
	want := &agentpb.ARPNeighbor{
		ToIPAddress: &agentpb.IPAddress{Family: agentpb.IPFamily_v6, Address: "fd00::1"},
		Device:      "eth0", Lladdr: "02:00:00:00:00:09", State: 0x80, Flags: 1,
	}
	if !proto.Equal(pb, want) {
		t.Errorf("got %v\nwant %v", pb, want)
	}
	if _, err := neighborToPB(Neighbor{Device: "eth0"}); err == nil {
		t.Error("neighbour without IP accepted")
	}
}
