package qmp

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
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

	for _, tc := range []struct {
		name  string
		buses []pciBus
		types map[string]string
		want  placement
		err   error
	}{
		{"last empty root port", q35, types, placement{bus: "rp4", path: []int{5, 0}}, nil},
		{"bridge when no port is free", q35, bridgeOnly, placement{bus: "br1", slot: 31, addr: "0x1f", path: []int{8, 31}}, nil},
		{"unknown types are not used", q35, map[string]string{}, placement{}, ErrNoFreeSlot},
		{"q35 without ports", q35NoPorts, nil, placement{}, ErrNoFreeSlot},
		{"pc root bus", pc, nil, placement{bus: "pci.0", slot: 31, addr: "0x1f", path: []int{31}}, nil},
		{"nothing", nil, nil, placement{}, ErrNoFreeSlot},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := choosePlacement(tc.buses, tc.types)
			if !errors.Is(err, tc.err) || got.bus != tc.want.bus || got.slot != tc.want.slot || got.addr != tc.want.addr || !slices.Equal(got.path, tc.want.path) {
				t.Errorf("choosePlacement = %+v, %v; want %+v, %v", got, err, tc.want, tc.err)
			}
		})
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

	// A full bridge and full root bus.
	full := pciBus{Bus: 0}
	full.Devices = append(full.Devices, pciDevice{Slot: 0})
	full.Devices[0].ID.Vendor, full.Devices[0].ID.Device = vendorIntel, deviceI440FX
	for s := 1; s < 32; s++ {
		full.Devices = append(full.Devices, pciDevice{Slot: s, Function: 0})
	}
	if _, err := choosePlacement([]pciBus{full}, nil); !errors.Is(err, ErrNoFreeSlot) {
		t.Errorf("full pc: err = %v, want ErrNoFreeSlot", err)
	}
}
