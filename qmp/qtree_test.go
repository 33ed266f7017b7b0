package qmp

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// readQtree reads an "info qtree" output captured from QEMU 7.2 (started
// with -S: the firmware has numbered no bus, so query-pci would show
// nothing behind the bridge and the ports).
func readQtree(t *testing.T, name string) vmTree {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	root, err := parseQtree(string(b))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	tree, err := treeOf(root)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return tree
}

func TestQtreeQ35(t *testing.T) {
	// q35, root ports rp1 (a NIC without id, on hub port hp0) and rp2
	// (empty), pci-bridge br1 in root slot 8 with tapsync-net3 (slot 0x1f)
	// and a non-transitional tapsync-net4 (0x1e, no netdev), kata1 on
	// pcie.0 slot 7.
	tree := readQtree(t, "qtree-q35.txt")
	sortNICs(tree.nics)
	want := []NICInfo{
		{ID: "tapsync-net3", Index: 3, Owned: true, MAC: mustMAC(t, "02:00:00:00:00:03"), Netdev: "tapsync-netdev3", Bus: "br1", Addr: "1f.0", QOMPath: "/machine/peripheral/tapsync-net3", PCIPath: "08/1f"},
		{ID: "tapsync-net4", Index: 4, Owned: true, MAC: mustMAC(t, "02:00:00:00:00:04"), Bus: "br1", Addr: "1e.0", QOMPath: "/machine/peripheral/tapsync-net4", PCIPath: "08/1e"},
		{ID: "", Index: -1, MAC: mustMAC(t, "02:00:00:00:00:a0"), Netdev: "hp0", Bus: "rp1", Addr: "00.0", PCIPath: "02/00"},
		{ID: "kata1", Index: -1, MAC: mustMAC(t, "02:00:00:00:00:a1"), Bus: "pcie.0", Addr: "07.0", QOMPath: "/machine/peripheral/kata1", PCIPath: "07"},
	}
	if len(tree.nics) != len(want) {
		t.Fatalf("NICs = %+v\nwant %+v", tree.nics, want)
	}
	for i := range want {
		if !sameInfo(tree.nics[i], want[i]) {
			t.Errorf("NIC %d = %+v\nwant  %+v", i, tree.nics[i], want[i])
		}
	}
	for id, typ := range map[string]string{"rp1": "pcie-root-port", "rp2": "pcie-root-port", "br1": "pci-bridge", "kata1": "virtio-net-pci"} {
		if tree.types[id] != typ {
			t.Errorf("type of %s = %q, want %q", id, tree.types[id], typ)
		}
	}
	topo := newTopology(tree.buses, tree.types)
	for _, tc := range []struct {
		p    Placement
		want Place
	}{
		{Placement{}, Place{Bus: "br1", Slot: 0x1d, PCIPath: "08/1d"}},
		{Placement{Hotplug: HotplugRootPort}, Place{Bus: "rp2", Slot: 0, PCIPath: "03/00"}},
		{Placement{Reserved: SlotRange{20, 31}}, Place{Bus: "br1", Slot: 19, PCIPath: "08/13"}},
	} {
		if got, err := topo.Choose(tc.p); err != nil || got != tc.want {
			t.Errorf("Choose(%s) = %+v, %v; want %+v", tc.p, got, err, tc.want)
		}
	}
	if s := topo.survey(Placement{}).String(); !strings.Contains(s, "pci-bridge br1 (08): 29 free, 2 taken") ||
		!strings.Contains(s, "pcie-root-port rp2 (03): 1 free, not used") || !strings.Contains(s, "pcie-root-port rp1 (02): 0 free, 1 taken") {
		t.Errorf("survey = %s", s)
	}
}

func TestQtreePC(t *testing.T) {
	// pc: tapsync-net0 on pci.0 slot 2 (slot 0 the host bridge, 1 PIIX3).
	tree := readQtree(t, "qtree-pc.txt")
	if len(tree.nics) != 1 || tree.nics[0].Bus != "pci.0" || tree.nics[0].Addr != "02.0" || tree.nics[0].PCIPath != "02" || tree.nics[0].Index != 0 {
		t.Fatalf("NICs = %+v", tree.nics)
	}
	topo := newTopology(tree.buses, tree.types)
	if got, err := topo.Choose(Placement{}); err != nil || got != (Place{Bus: "pci.0", Slot: 31, PCIPath: "1f"}) {
		t.Errorf("Choose = %+v, %v; want pci.0 slot 31", got, err)
	}
	if got, err := topo.Choose(Placement{Reserved: SlotRange{3, 31}}); err == nil {
		t.Errorf("Choose with slots 3..31 reserved = %+v; want ErrNoFreeSlot (0, 1, 2 taken)", got)
	}
}

func TestQtreePXB(t *testing.T) {
	// q35 with a PCIe expander pxb1 (its bus a second root, pxb-pcie-bus)
	// and root port rp9 on it holding tapsync-net5: listed, not lost.
	tree := readQtree(t, "qtree-pxb.txt")
	if len(tree.nics) != 1 || tree.nics[0].ID != "tapsync-net5" || tree.nics[0].Bus != "rp9" || tree.nics[0].Addr != "00.0" {
		t.Fatalf("NICs = %+v; want tapsync-net5 on rp9", tree.nics)
	}
	if tree.types["pxb1"] != "pxb-pcie" || tree.types["rp9"] != "pcie-root-port" {
		t.Errorf("types = %v", tree.types)
	}
}

func TestQtreeMalformed(t *testing.T) {
	for _, tc := range []struct{ name, out, why string }{
		{"empty", "", "no device tree"},
		{"unknown command", "unknown command: 'info qtree'\r\n", "no device tree"},
		{"device outside a bus", "dev: x, id \"\"\r\n", `line 1 "dev: x, id \"\"": a device outside a bus`},
		{"device line without id", "bus: main\r\n  type System\r\n  dev: x\r\n", `line 3 "  dev: x": want`},
		{"bus outside a device", "bus: main\r\n  bus: other\r\n", "line 2"},
		{"PCI device without addr", "bus: main\r\n  type System\r\n  dev: host, id \"\"\r\n    bus: pcie.0\r\n      type PCIE\r\n      dev: x, id \"a\"\r\n", `x "a" on PCI bus pcie.0 has no PCI address`},
		{"NIC on a bus of unknown kind", "bus: main\r\n  type System\r\n  dev: virtio-net-pci, id \"tapsync-net1\"\r\n", `virtio-net-pci "tapsync-net1" on bus main of type "System", not a PCI bus this reader knows`},
		{"NIC without MAC", "bus: main\r\n  type System\r\n  dev: host, id \"\"\r\n    bus: pcie.0\r\n      type PCIE\r\n      dev: virtio-net-pci, id \"tapsync-net1\"\r\n        addr = 02.0\r\n",
			`virtio-net-pci "tapsync-net1" at pcie.0/02.0: MAC "": not a MAC address`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, err := parseQtree(tc.out)
			if err == nil {
				_, err = treeOf(root)
			}
			if err == nil || !strings.Contains(err.Error(), tc.why) {
				t.Errorf("err = %v, want one saying %q", err, tc.why)
			}
		})
	}
}

// FuzzParseQtree: whatever "info qtree" says, reading it does not panic,
// and what it yields is usable: NICs with a MAC, an address and a PCI
// path; placements on a free slot.
func FuzzParseQtree(f *testing.F) {
	// The captured trees cut to their first NIC: whole ones (20 KB) stall
	// the fuzzer's mutator, and the unit tests read them whole.
	for _, seed := range []struct {
		name  string
		lines int
	}{{"qtree-q35.txt", 100}, {"qtree-pc.txt", 90}, {"qtree-pxb.txt", 110}} {
		b, err := os.ReadFile(filepath.Join("testdata", seed.name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(strings.Join(strings.SplitAfterN(string(b), "\n", seed.lines+1)[:seed.lines], ""))
	}
	f.Add("bus: main\n  type System\n  dev: h, id \"\"\n    bus: pci.0\n      type PCI\n      dev: virtio-net-pci, id \"tapsync-net1\"\n        addr = 1f.0\n        mac = \"02:00:00:00:00:01\"\n")
	f.Fuzz(func(t *testing.T, out string) {
		root, err := parseQtree(out)
		if err != nil {
			return
		}
		tree, err := treeOf(root)
		if err != nil {
			return
		}
		for _, n := range tree.nics {
			if len(n.MAC) != 6 || len(n.Addr) != 4 || n.PCIPath == "" || n.Bus == "" {
				t.Fatalf("NIC %+v from %q", n, out)
			}
		}
		topo := newTopology(tree.buses, tree.types)
		for _, p := range []Placement{{}, {Hotplug: HotplugAny}} {
			if at, err := topo.Choose(p); err == nil && topo.used[at.Bus][at.Slot] {
				t.Fatalf("Choose(%s) = %+v, a slot in use", p, at)
			}
		}
	})
}
