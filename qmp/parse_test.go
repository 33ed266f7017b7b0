package qmp

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// readJSON decodes a QEMU 7.2 reply captured in testdata.
func readJSON(t *testing.T, name string, out any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func TestParseInfoNetwork(t *testing.T) {
	var captured string // QEMU 7.2: hubs, a 2-queue tap NIC, a NIC without netdev
	readJSON(t, "info-network-q35.json", &captured)
	for _, tc := range []struct {
		name, out string
		want      []string
	}{
		{"captured", captured, []string{"hp1", "hp0", "tapsync-netdev1"}},
		{"empty", "", nil},
		{"netdev without NIC", "tapsync-netdev3: index=0,type=tap,fd=13\r\ntapsync-netdev3: index=0,type=tap,fd=14\r\n",
			[]string{"tapsync-netdev3"}},
		{"hub port with netdev peer", "hub 0\r\n \\ hp0: user0: index=0,type=user,net=10.0.2.0,restrict=off\r\nnic0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\n",
			[]string{"hp0", "user0"}},
		{"netdev with odd info", "net0: index=0,type=socket,socket: connect to 127.0.0.1:5: index=9\r\n", []string{"net0"}},
		{"junk", "garbage\n \\ \n: index=0,type=tap\nx: index=0\n", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseInfoNetwork(tc.out); !slices.Equal(got, tc.want) {
				t.Errorf("parseInfoNetwork = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestParseNetwork(t *testing.T) {
	var captured string // QEMU 7.2: hubs, a 2-queue tap NIC, a NIC without netdev
	readJSON(t, "info-network-q35.json", &captured)
	type nic struct{ id, mac, netdev string }
	for _, tc := range []struct {
		name, out string
		want      []nic
	}{
		{"captured", captured, []nic{
			{"tapsync-net1", "02:00:00:00:00:01", "tapsync-netdev1"},
			{"kata0", "02:00:00:00:00:03", "hp1"}, // its hub port
			{"virtio-net-pci.2", "02:00:00:00:00:02", ""},
		}},
		{"empty", "", nil},
		{"not virtio", "nic0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\n \\ net0: index=0,type=tap,fd=3\r\n", nil},
		{"filters between a NIC and its netdev",
			"tapsync-net2: index=0,type=nic,model=virtio-net-pci-non-transitional,macaddr=02:00:00:00:00:05\r\nfilters:\r\n  - f0: type=filter-dump\r\n \\ tapsync-netdev2: index=0,type=tap,fd=9\r\n",
			[]nic{{"tapsync-net2", "02:00:00:00:00:05", "tapsync-netdev2"}}},
		{"a netdev under no NIC line is not a NIC's", "tapsync-netdev3: index=0,type=tap,fd=13\r\n \\ tapsync-netdev4: index=0,type=tap,fd=14\r\n", nil},
		{"MAC unreadable: left out", "tapsync-net1: index=0,type=nic,model=virtio-net-pci,macaddr=zz\r\n", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nics, _ := parseNetwork(tc.out)
			var got []nic
			for _, n := range nics {
				got = append(got, nic{n.ID, n.MAC.String(), n.Netdev})
				idx, owned := ParseDeviceID(n.ID)
				if n.Owned != owned || (owned && (n.Index != idx || n.QOMPath != peripheral+"/"+n.ID)) || (!owned && (n.Index != -1 || n.QOMPath != "")) {
					t.Errorf("NIC %+v: ownership, index or QOM path inconsistent with its id", n)
				}
			}
			sortNICsByID := func(a, b nic) int { return strings.Compare(a.id, b.id) }
			slices.SortFunc(got, sortNICsByID)
			want := slices.Clone(tc.want)
			slices.SortFunc(want, sortNICsByID)
			if !slices.Equal(got, want) {
				t.Errorf("parseNetwork NICs = %v, want %v", got, want)
			}
		})
	}
}

func TestChoosePlacement(t *testing.T) {
	// q35 with root ports rp1..rp4 (tapsync-net1 on rp1, kata0 on rp3) and
	// a pci-bridge br1 (slots 1 and 2 used).
	var q35, q35NoPorts, pc []pciBus
	readJSON(t, "query-pci-q35.json", &q35)
	readJSON(t, "query-pci-q35-noports.json", &q35NoPorts)
	readJSON(t, "query-pci-pc.json", &pc) // a NIC at pci.0 slot 2
	var entries []qomEntry
	readJSON(t, "qom-list-peripheral-q35.json", &entries)
	types := map[string]string{}
	for _, e := range entries {
		if ct := e.childType(); ct != "" {
			types[e.Name] = ct
		}
	}
	bridgeOnly := map[string]string{"br1": "pci-bridge"}

	bridge := Placement{}
	ports := Placement{Hotplug: HotplugRootPort}
	anyPlace := Placement{Hotplug: HotplugAny}
	for _, tc := range []struct {
		name  string
		buses []pciBus
		types map[string]string
		place Placement
		want  placement
		err   error
		why   []string // in the error
	}{
		{name: "bridge: top bridge slot, root ports left alone", buses: q35, types: types, place: bridge,
			want: placement{bus: "br1", slot: 31, addr: "0x1f", path: []int{8, 31}}},
		{name: "bridge: explicit policy is the zero value's", buses: q35, types: types, place: Placement{Hotplug: HotplugBridge},
			want: placement{bus: "br1", slot: 31, addr: "0x1f", path: []int{8, 31}}},
		{name: "bridge: below the reserved range", buses: q35, types: types, place: Placement{Reserved: SlotRange{16, 31}},
			want: placement{bus: "br1", slot: 15, addr: "0xf", path: []int{8, 15}}},
		{name: "bridge: reserved range covers every free slot", buses: q35, types: types, place: Placement{Reserved: SlotRange{3, 31}},
			err: ErrNoFreeSlot, why: []string{"no free slot on pci-bridge br1 (2 taken, 29 reserved)", "2 empty root ports not used", "hotplug = bridge, reserved slots 3..31"}},
		{name: "root-port: last empty root port", buses: q35, types: types, place: ports,
			want: placement{bus: "rp4", path: []int{5, 0}}},
		{name: "root-port: reserved range does not apply to ports", buses: q35, types: types, place: Placement{Hotplug: HotplugRootPort, Reserved: SlotRange{0, 31}},
			want: placement{bus: "rp4", path: []int{5, 0}}},
		{name: "root-port: no port, bridge not used", buses: q35, types: bridgeOnly, place: ports,
			err: ErrNoFreeSlot, why: []string{"no PCIe root port", "1 buses with free slots not used", "hotplug = root-port"}},
		{name: "any: last empty root port first", buses: q35, types: types, place: anyPlace,
			want: placement{bus: "rp4", path: []int{5, 0}}},
		{name: "any: bridge when no port is known", buses: q35, types: bridgeOnly, place: anyPlace,
			want: placement{bus: "br1", slot: 31, addr: "0x1f", path: []int{8, 31}}},
		{name: "unknown types are not used", buses: q35, types: map[string]string{}, place: anyPlace, err: ErrNoFreeSlot},
		{name: "q35 without ports: bridge", buses: q35NoPorts, place: bridge,
			err: ErrNoFreeSlot, why: []string{"no PCI bridge and no pc pci.0", "hotplug = bridge"}},
		{name: "q35 without ports: root-port", buses: q35NoPorts, place: ports, err: ErrNoFreeSlot, why: []string{"no PCIe root port: hotplug = root-port"}},
		{name: "q35 without ports: any", buses: q35NoPorts, place: anyPlace, err: ErrNoFreeSlot, why: []string{"hotplug = any"}},
		{name: "pc: bridge takes pci.0", buses: pc, place: bridge, want: placement{bus: "pci.0", slot: 31, addr: "0x1f", path: []int{31}}},
		{name: "pc: any takes pci.0", buses: pc, place: anyPlace, want: placement{bus: "pci.0", slot: 31, addr: "0x1f", path: []int{31}}},
		{name: "pc: reserved applies to pci.0", buses: pc, place: Placement{Reserved: SlotRange{20, 31}},
			want: placement{bus: "pci.0", slot: 19, addr: "0x13", path: []int{19}}},
		{name: "pc: root-port", buses: pc, place: ports, err: ErrNoFreeSlot, why: []string{"no PCIe root port", "1 buses with free slots not used"}},
		{name: "nothing", place: anyPlace, err: ErrNoFreeSlot},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := choosePlacement(tc.buses, tc.types, tc.place)
			if !errors.Is(err, tc.err) || got.bus != tc.want.bus || got.slot != tc.want.slot || got.addr != tc.want.addr || !slices.Equal(got.path, tc.want.path) {
				t.Errorf("choosePlacement = %+v, %v; want %+v, %v", got, err, tc.want, tc.err)
			}
			for _, w := range tc.why {
				if err == nil || !strings.Contains(err.Error(), w) {
					t.Errorf("error %v does not say %q", err, w)
				}
			}
			if err != nil {
				t.Log(err)
			}
		})
	}

	// Capacity agrees with the placement: free counts per policy.
	for _, tc := range []struct {
		place Placement
		free  int
	}{
		{bridge, 29}, {ports, 2}, {anyPlace, 31}, {Placement{Reserved: SlotRange{1, 15}}, 16},
	} {
		c := survey(q35, types, tc.place)
		if c.Free() != tc.free {
			t.Errorf("%s: Free() = %d, want %d (%s)", tc.place, c.Free(), tc.free, c)
		}
		if len(c.Buses) != 5 {
			t.Errorf("%s: %d buses, want rp1..rp4 and br1: %s", tc.place, len(c.Buses), c)
		}
	}
	if s := survey(q35, types, bridge).String(); !strings.Contains(s, "pci-bridge br1 (08): 29 free, 2 taken") ||
		!strings.Contains(s, "pcie-root-port rp4 (05): 1 free, not used") {
		t.Errorf("Capacity.String() = %q", s)
	}

	// The agent's devicePath of devices already placed.
	for _, tc := range []struct {
		bus  string
		slot int
		want string
	}{
		{"rp1", 0, "02/00"}, {"br1", 2, "08/02"}, {"pcie.0", 3, "03"}, {"pci.0", 31, "1f"}, {"nosuch", 1, ""},
	} {
		if got := PCIPath(pciPathOf(q35, tc.bus, tc.slot)); got != tc.want {
			t.Errorf("PCIPath of slot %d on %s = %q, want %q", tc.slot, tc.bus, got, tc.want)
		}
	}

	// While the firmware numbers buses, QEMU may list another bus's
	// devices behind a port: only those on the port's secondary bus count.
	port := pciDevice{Slot: 2, QdevID: "rp1"}
	port.PCIBridge = &pciBridge{Devices: []pciDevice{{Bus: 0, Slot: 0}, {Bus: 0, Slot: 31}}}
	port.PCIBridge.Bus.Secondary = 1
	if got, err := choosePlacement([]pciBus{{Devices: []pciDevice{port}}}, map[string]string{"rp1": "pcie-root-port"}, ports); err != nil || got.bus != "rp1" {
		t.Errorf("port listing the root bus's devices: choosePlacement = %+v, %v; want rp1", got, err)
	}

	// A full bridge and full root bus.
	full := pciBus{Bus: 0}
	full.Devices = append(full.Devices, pciDevice{Slot: 0})
	full.Devices[0].ID.Vendor, full.Devices[0].ID.Device = vendorIntel, deviceI440FX
	for s := 1; s < 32; s++ {
		full.Devices = append(full.Devices, pciDevice{Slot: s, Function: 0})
	}
	if _, err := choosePlacement([]pciBus{full}, nil, anyPlace); !errors.Is(err, ErrNoFreeSlot) ||
		!strings.Contains(err.Error(), "no free slot on pci.0 (slots 1..31 taken): hotplug = any") {
		t.Errorf("full pc: err = %v, want ErrNoFreeSlot naming pci.0", err)
	}
}

func TestPlacementValidate(t *testing.T) {
	for _, tc := range []struct {
		p  Placement
		ok bool
	}{
		{Placement{}, true},
		{Placement{Hotplug: HotplugAny, Reserved: SlotRange{1, 15}}, true},
		{Placement{Reserved: SlotRange{31, 31}}, true},
		{Placement{Hotplug: "roots"}, false},
		{Placement{Reserved: SlotRange{5, 4}}, false},
		{Placement{Reserved: SlotRange{-1, 4}}, false},
		{Placement{Reserved: SlotRange{1, 32}}, false},
	} {
		if err := tc.p.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v.Validate() = %v, want ok=%v", tc.p, err, tc.ok)
		}
	}
	for in, want := range map[string]Hotplug{"": HotplugBridge, "bridge": HotplugBridge, "root-port": HotplugRootPort, "any": HotplugAny, "x": ""} {
		if got, err := ParseHotplug(in); got != want || (err == nil) != (want != "") {
			t.Errorf("ParseHotplug(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

// qomEntry is one element of qom-list's return value, as the tests read
// captured listings and QEMU's own:
//
//	{"name": "rp1", "type": "child<pcie-root-port>"}
//	{"name": "type", "type": "string"}
type qomEntry struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

// childType returns T of "child<T>", or "" for properties that are not
// child objects.
func (e qomEntry) childType() string {
	t, ok := strings.CutPrefix(e.Type, "child<")
	if !ok || !strings.HasSuffix(t, ">") {
		return ""
	}
	return strings.TrimSuffix(t, ">")
}
