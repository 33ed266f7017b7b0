package qmp

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// ErrNoFreeSlot is wrapped by AddNIC when the VM has no place left to
// hot-plug a PCI device. Retrying does not help until a NIC is removed or
// the VM is started with more hot-plug ports (Kata: pcie_root_port).
var ErrNoFreeSlot = errors.New("no free PCI hot-plug slot")

// pciBus is one element of query-pci's return value (QEMU 7.2):
//
//	[{"bus": 0, "devices": [
//	   {"bus": 0, "slot": 0, "function": 0, "qdev_id": "",
//	    "class_info": {"class": 1536, "desc": "Host bridge"},
//	    "id": {"vendor": 32902, "device": 10688, ...}, "regions": [...]},
//	   {"bus": 0, "slot": 2, "function": 0, "qdev_id": "rp1",
//	    "class_info": {"class": 1540, "desc": "PCI bridge"}, ...,
//	    "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 1, ...},
//	                   "devices": [ ...devices on bus 1, same shape... ]}}]}]
//
// A bridge's "devices" is present and empty when nothing sits behind it.
// Fields not used here are not decoded.
type pciBus struct {
	Bus     int         `json:"bus"`
	Devices []pciDevice `json:"devices"`
}

type pciDevice struct {
	Bus      int    `json:"bus"`
	Slot     int    `json:"slot"`
	Function int    `json:"function"`
	QdevID   string `json:"qdev_id"`
	ID       struct {
		Vendor int `json:"vendor"`
		Device int `json:"device"`
	} `json:"id"`
	PCIBridge *struct {
		Bus struct {
			Secondary int `json:"secondary"`
		} `json:"bus"`
		Devices []pciDevice `json:"devices"`
	} `json:"pci_bridge"`
}

// Hot-plug targets by QOM type. A PCIe port has exactly one slot (0) on its
// secondary bus; a PCI bridge has 32, of which slot 0 is refused by its
// standard hot-plug controller ("Unsupported PCI slot 0 for standard hotplug
// controller").
var (
	singleSlotPorts = map[string]bool{"pcie-root-port": true, "ioh3420": true, "xio3130-downstream": true}
	pciBridges      = map[string]bool{"pci-bridge": true, "pcie-pci-bridge": true}
)

// Intel 440FX host bridge (machine type pc): its root bus pci.0 takes
// hot-plugged devices directly. q35's pcie.0 does not ("Bus 'pcie.0' does
// not support hotplugging").
const (
	vendorIntel  = 0x8086
	deviceI440FX = 0x1237
)

// placement is where device_add puts a NIC: bus is a bus name (a bridge's
// qdev id, or pci.0); addr is "" for a port's only slot, else "0x<slot>".
type placement struct {
	bus  string
	slot int
	addr string
	path []int // slots from the root bus down to the device's own (see PCIPath)
}

// choosePlacement picks a free hot-plug place: an empty PCIe port first
// (Kata on q35 hot-plugs onto its own pci-bridge and tracks those slots
// itself), then a free slot on a PCI bridge, then on pc a free slot of
// pci.0. types maps /machine/peripheral ids to QOM types.
//
// Ports and slots are taken from the top down: Kata (and most VMMs)
// allocate their own hot-plug places from the bottom up, from their own
// bookkeeping, which does not see ours. Starting at the other end keeps the
// two apart until the bus is nearly full.
func choosePlacement(buses []pciBus, types map[string]string) (placement, error) {
	var ports, bridges []placement
	var walk func(devs []pciDevice, above []int)
	walk = func(devs []pciDevice, above []int) {
		for _, d := range devs {
			if d.PCIBridge == nil {
				continue
			}
			here := append(slices.Clone(above), d.Slot)
			switch t := types[d.QdevID]; {
			case d.QdevID == "": // an anonymous bridge's bus cannot be named in device_add
			case singleSlotPorts[t] && len(d.PCIBridge.Devices) == 0:
				ports = append(ports, placement{bus: d.QdevID, path: append(here, 0)})
			case pciBridges[t]:
				if s, ok := freeSlot(d.PCIBridge.Devices); ok {
					bridges = append(bridges, placement{bus: d.QdevID, slot: s, addr: fmt.Sprintf("%#x", s), path: append(slices.Clone(here), s)})
				}
			}
			walk(d.PCIBridge.Devices, here)
		}
	}
	for _, b := range buses {
		walk(b.Devices, nil)
	}
	switch {
	case len(ports) > 0:
		return ports[len(ports)-1], nil
	case len(bridges) > 0:
		return bridges[len(bridges)-1], nil
	}
	for _, b := range buses {
		if b.Bus == 0 && isI440FX(b.Devices) {
			if s, ok := freeSlot(b.Devices); ok {
				return placement{bus: "pci.0", slot: s, addr: fmt.Sprintf("%#x", s), path: []int{s}}, nil
			}
		}
	}
	return placement{}, ErrNoFreeSlot
}

// freeSlot returns the highest slot in 1..31 with no function in use.
func freeSlot(devs []pciDevice) (int, bool) {
	var used [32]bool
	for _, d := range devs {
		if d.Slot >= 0 && d.Slot < len(used) {
			used[d.Slot] = true
		}
	}
	for s := len(used) - 1; s >= 1; s-- {
		if !used[s] {
			return s, true
		}
	}
	return 0, false
}

func isI440FX(devs []pciDevice) bool {
	for _, d := range devs {
		if d.Slot == 0 && d.Function == 0 && d.ID.Vendor == vendorIntel && d.ID.Device == deviceI440FX {
			return true
		}
	}
	return false
}

// qomEntry is one element of qom-list's return value:
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

// Equivalent to: {"execute": "qom-list", "arguments": {"path": path}}
func (c *Client) qomList(ctx context.Context, path string) ([]qomEntry, error) {
	var entries []qomEntry
	err := c.runInto(ctx, "qom-list", "path="+path, map[string]any{"path": path}, &entries)
	return entries, err
}

// Equivalent to: {"execute": "qom-get", "arguments": {"path": path, "property": prop}}
func (c *Client) qomGet(ctx context.Context, path, prop string, out any) error {
	return c.runInto(ctx, "qom-get", "path="+path+" property="+prop,
		map[string]any{"path": path, "property": prop}, out)
}

// peripheralTypes maps the ids of user-created devices to their QOM types.
func (c *Client) peripheralTypes(ctx context.Context) (map[string]string, error) {
	entries, err := c.qomList(ctx, peripheral)
	if err != nil {
		return nil, err
	}
	types := make(map[string]string, len(entries))
	for _, e := range entries {
		if t := e.childType(); t != "" {
			types[e.Name] = t
		}
	}
	return types, nil
}

// choosePlace asks QEMU for its PCI topology and picks a hot-plug place.
func (c *Client) choosePlace(ctx context.Context) (placement, error) {
	types, err := c.peripheralTypes(ctx)
	if err != nil {
		return placement{}, err
	}
	buses, err := c.queryPCI(ctx)
	if err != nil {
		return placement{}, err
	}
	return choosePlacement(buses, types)
}

// PCIPath spells a device's place the way the Kata agent's devicePath
// does: the slot of each bridge or port from the root bus down, then the
// device's own slot, in two hex digits each, joined by "/" — "02/1f" is
// slot 0x1f behind the bridge in root slot 2, "05/00" the device of the
// root port in root slot 5.
func PCIPath(slots []int) string {
	parts := make([]string, len(slots))
	for i, s := range slots {
		parts[i] = fmt.Sprintf("%02x", s)
	}
	return strings.Join(parts, "/")
}

// pciPathOf finds the slots leading to the device in slot of the bus that
// bridge or port busID opens ("pcie.0"/"pci.0" or "" for the root bus),
// or nil when busID is not in the topology.
func pciPathOf(buses []pciBus, busID string, slot int) []int {
	if busID == "" || busID == "pcie.0" || busID == "pci.0" {
		return []int{slot}
	}
	var find func(devs []pciDevice, above []int) []int
	find = func(devs []pciDevice, above []int) []int {
		for _, d := range devs {
			if d.PCIBridge == nil {
				continue
			}
			here := append(slices.Clone(above), d.Slot)
			if d.QdevID == busID {
				return append(here, slot)
			}
			if p := find(d.PCIBridge.Devices, here); p != nil {
				return p
			}
		}
		return nil
	}
	for _, b := range buses {
		if p := find(b.Devices, nil); p != nil {
			return p
		}
	}
	return nil
}

// Equivalent to: {"execute": "query-pci"}
func (c *Client) queryPCI(ctx context.Context) ([]pciBus, error) {
	var buses []pciBus
	err := c.runInto(ctx, "query-pci", "", nil, &buses)
	return buses, err
}
