package qmp

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
)

// ErrNoFreeSlot is wrapped by AddNIC when the VM has no place left that
// its Placement allows. Retrying does not help until a NIC is removed, the
// policy allows more, or the VM is started with more hot-plug places.
var ErrNoFreeSlot = errors.New("no free PCI hot-plug slot")

// Hotplug says which kinds of PCI hot-plug places AddNIC may take.
type Hotplug string

const (
	// HotplugBridge takes free slots of PCI bridges (pci-bridge,
	// pcie-pci-bridge), and on machine type pc free slots of the root bus
	// pci.0; never a PCIe root port. It is the default (the zero value of
	// Placement.Hotplug): Kata creates only as many root ports as its VFIO
	// devices need (hot_plug_vfio = "root-port"), so an empty root port is
	// one a GPU pod is about to take.
	HotplugBridge Hotplug = "bridge"
	// HotplugRootPort takes only empty PCIe ports (pcie-root-port,
	// ioh3420, xio3130-downstream): for VMs started with ports to spare.
	HotplugRootPort Hotplug = "root-port"
	// HotplugAny takes an empty PCIe port first, then a bridge slot, then a
	// slot of pc's pci.0.
	HotplugAny Hotplug = "any"
)

// ParseHotplug reads a config value; "" is HotplugBridge.
func ParseHotplug(s string) (Hotplug, error) {
	switch h := Hotplug(s); h {
	case "":
		return HotplugBridge, nil
	case HotplugBridge, HotplugRootPort, HotplugAny:
		return h, nil
	}
	return "", fmt.Errorf("hotplug %q: want %q, %q or %q", s, HotplugBridge, HotplugRootPort, HotplugAny)
}

// SlotRange is an inclusive range of PCI slot numbers (0..31). The zero
// value, {0, 0}, reserves nothing that could be used anyway: slot 0 of a
// bridge takes no hot-plug and slot 0 of pci.0 is the host bridge.
type SlotRange struct{ From, To int }

func (r SlotRange) contains(slot int) bool { return slot >= r.From && slot <= r.To }

func (r SlotRange) String() string { return fmt.Sprintf("%d..%d", r.From, r.To) }

// Placement is where AddNIC may hot-plug a NIC. The zero value is
// HotplugBridge with nothing reserved.
type Placement struct {
	Hotplug Hotplug // "" means HotplugBridge
	// Reserved slots are never taken. It applies to the slots of every
	// multi-slot bus AddNIC may use — each PCI bridge's secondary bus and
	// pc's pci.0 — by slot number on that bus, whichever bus it is; it does
	// not apply to PCIe ports (their one slot is 0). Kata hands out its
	// pci-bridge slots from 1 upward, so reserving 1..N keeps N of them for
	// Kata whatever order the two of us plug in.
	Reserved SlotRange
}

func (p Placement) policy() Hotplug {
	if p.Hotplug == "" {
		return HotplugBridge
	}
	return p.Hotplug
}

// Validate reports a policy or reserved range that cannot be meant.
func (p Placement) Validate() error {
	if _, err := ParseHotplug(string(p.Hotplug)); err != nil {
		return err
	}
	if r := p.Reserved; r.From < 0 || r.To > 31 || r.From > r.To {
		return fmt.Errorf("reserved slots %s: want From <= To within 0..31", r)
	}
	return nil
}

func (p Placement) String() string {
	s := "hotplug = " + string(p.policy())
	if p.Reserved != (SlotRange{}) {
		s += ", reserved slots " + p.Reserved.String()
	}
	return s
}

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
	PCIBridge *pciBridge `json:"pci_bridge"`
}

type pciBridge struct {
	Bus struct {
		Secondary int `json:"secondary"`
	} `json:"bus"`
	Devices []pciDevice `json:"devices"`
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

// Kinds of hot-plug buses, as BusCapacity.Type spells them besides QOM types.
const rootBusPC = "pci.0"

// BusCapacity is one bus that takes hot-plugged devices.
type BusCapacity struct {
	Bus     string // device_add's bus=: a port's or bridge's qdev id, or "pci.0"
	Type    string // QOM type of the port or bridge ("pcie-root-port", "pci-bridge"), or "pci.0" for pc's root bus
	PCIPath string // slots leading to the bus from the root bus ("02"); "" for pci.0
	Free    []int  // slots free for a NIC and not reserved, highest first; [0] for an empty port
	Taken   int    // slots in use
	Held    int    // slots free but reserved (Placement.Reserved)
	Allowed bool   // the policy lets AddNIC use this bus
}

func (b BusCapacity) isPort() bool { return singleSlotPorts[b.Type] }

// Capacity is what a VM offers for hot-plug under a Placement.
type Capacity struct {
	Placement Placement
	Buses     []BusCapacity // in topology order
}

// Free is the number of NICs AddNIC can still place.
func (c Capacity) Free() int {
	n := 0
	for _, b := range c.Buses {
		if b.Allowed {
			n += len(b.Free)
		}
	}
	return n
}

// String says, per bus, what is free and why a bus is not used, e.g.
// "hotplug = bridge: 29 free; pci-bridge br1 (08): 29 free, 2 taken; pcie-root-port rp4 (05): 1 free, not used".
func (c Capacity) String() string {
	parts := []string{fmt.Sprintf("%s: %d free", c.Placement, c.Free())}
	for _, b := range c.Buses {
		s := b.Type
		if b.Bus != rootBusPC {
			s += " " + b.Bus + " (" + b.PCIPath + ")"
		}
		s += fmt.Sprintf(": %d free", len(b.Free))
		if b.Taken > 0 {
			s += fmt.Sprintf(", %d taken", b.Taken)
		}
		if b.Held > 0 {
			s += fmt.Sprintf(", %d reserved", b.Held)
		}
		if !b.Allowed {
			s += ", not used"
		}
		parts = append(parts, s)
	}
	if len(c.Buses) == 0 {
		parts = append(parts, "no PCIe port, no PCI bridge, no pc pci.0 (q35's pcie.0 takes no hot-plug)")
	}
	return strings.Join(parts, "; ")
}

// survey lists the buses that take hot-plugged devices, with their free
// slots under p, as the listing of buses shows them (see Topology).
func survey(buses []pciBus, types map[string]string, p Placement) Capacity {
	return newTopology(buses, types).survey(p)
}

// Topology is a VM's hot-plug buses and the slots taken on each, as read at
// one moment: what AddNIC chooses a place from. A caller that keeps a model
// of the VM keeps one, updates it with Take and Release as it adds and
// removes devices, and hands the place it chooses to AddNIC (NIC.At), which
// then asks QEMU nothing before plugging.
type Topology struct {
	buses []pciBus                // the tree of bridges and ports in query-pci's shape (their slots, for PCI paths)
	types map[string]string       // device ids → QOM types
	used  map[string]map[int]bool // bus (a port's or bridge's qdev id, or pci.0) → slots taken
}

// newTopology takes the slots in use from the listing of each bus.
func newTopology(buses []pciBus, types map[string]string) Topology {
	t := Topology{buses: buses, types: types, used: map[string]map[int]bool{}}
	var walk func(devs []pciDevice)
	walk = func(devs []pciDevice) {
		for _, d := range devs {
			if d.PCIBridge == nil {
				continue
			}
			children := d.secondaryDevices()
			if d.QdevID != "" {
				for _, c := range children {
					t.Take(d.QdevID, c.Slot)
				}
			}
			walk(children)
		}
	}
	for _, b := range buses {
		walk(b.Devices)
		if b.Bus == 0 && isI440FX(b.Devices) {
			for _, d := range b.Devices {
				t.Take(rootBusPC, d.Slot)
			}
		}
	}
	return t
}

// Take marks slot of bus as in use.
func (t *Topology) Take(bus string, slot int) {
	if t.used == nil {
		t.used = map[string]map[int]bool{}
	}
	if t.used[bus] == nil {
		t.used[bus] = map[int]bool{}
	}
	t.used[bus][slot] = true
}

// Release marks slot of bus as free.
func (t *Topology) Release(bus string, slot int) { delete(t.used[bus], slot) }

// Clone returns a copy that Take and Release on either leave the other alone.
func (t Topology) Clone() Topology {
	c := Topology{buses: t.buses, types: t.types, used: make(map[string]map[int]bool, len(t.used))}
	for b, s := range t.used {
		c.used[b] = maps.Clone(s)
	}
	return c
}

// Equal reports whether t and o show the same hot-plug buses with the
// same slots taken (what else query-pci says, such as the devices'
// regions, does not count).
func (t Topology) Equal(o Topology) bool {
	anyBus := Placement{Hotplug: HotplugAny}
	if !reflect.DeepEqual(t.survey(anyBus), o.survey(anyBus)) {
		return false
	}
	nonEmpty := func(m map[string]map[int]bool) map[string]map[int]bool {
		out := map[string]map[int]bool{}
		for b, s := range m {
			if len(s) > 0 {
				out[b] = s
			}
		}
		return out
	}
	return reflect.DeepEqual(nonEmpty(t.used), nonEmpty(o.used))
}

// Place is where AddNIC puts a NIC (see Topology.Choose).
type Place struct {
	Bus     string // device_add's bus=
	Slot    int
	PCIPath string // as PCIPath spells it
}

// Choose picks a free hot-plug place that p allows (see choosePlacement).
func (t Topology) Choose(p Placement) (Place, error) {
	pl, err := t.choose(p)
	if err != nil {
		return Place{}, err
	}
	return Place{Bus: pl.bus, Slot: pl.slot, PCIPath: PCIPath(pl.path)}, nil
}

// placement spells pl for device_add. A port's slot is named too: QEMU
// 7.2 lets a device into another slot of a port's bus when slot 0 is
// taken, where the guest never looks, and a caller's stale word must make
// device_add fail instead.
func (pl Place) placement() placement {
	return placement{bus: pl.Bus, slot: pl.Slot, addr: fmt.Sprintf("%#x", pl.Slot)}
}

// survey lists the buses that take hot-plugged devices, with their free
// slots under p. A port or bridge whose type is unknown is not listed, nor
// an anonymous one (device_add cannot name its bus).
func (t Topology) survey(p Placement) Capacity {
	policy := p.policy()
	c := Capacity{Placement: p}
	var walk func(devs []pciDevice, above []int)
	walk = func(devs []pciDevice, above []int) {
		for _, d := range devs {
			if d.PCIBridge == nil {
				continue
			}
			here := append(slices.Clone(above), d.Slot)
			ty := t.types[d.QdevID]
			b := BusCapacity{Bus: d.QdevID, Type: ty, PCIPath: PCIPath(here)}
			switch {
			case d.QdevID == "":
			case singleSlotPorts[ty]:
				b.Allowed = policy != HotplugBridge
				if !t.used[d.QdevID][0] {
					b.Free = []int{0}
				} else {
					b.Taken = 1
				}
				c.Buses = append(c.Buses, b)
			case pciBridges[ty]:
				b.Allowed = policy != HotplugRootPort
				b.Free, b.Taken, b.Held = freeSlots(t.used[d.QdevID], p.Reserved)
				c.Buses = append(c.Buses, b)
			}
			walk(d.secondaryDevices(), here)
		}
	}
	for _, b := range t.buses {
		walk(b.Devices, nil)
	}
	for _, b := range t.buses {
		if b.Bus == 0 && isI440FX(b.Devices) {
			bc := BusCapacity{Bus: rootBusPC, Type: rootBusPC, Allowed: policy != HotplugRootPort}
			bc.Free, bc.Taken, bc.Held = freeSlots(t.used[rootBusPC], p.Reserved)
			c.Buses = append(c.Buses, bc)
		}
	}
	return c
}

// choosePlacement picks a free hot-plug place that p allows. types maps
// /machine/peripheral ids to QOM types. In preference order: an empty PCIe
// port (HotplugRootPort, HotplugAny), then a free slot of a PCI bridge,
// then on pc a free slot of pci.0 (HotplugBridge, HotplugAny).
//
// Ports and slots are taken from the top down: Kata (and most VMMs)
// allocate their own hot-plug places from the bottom up, from their own
// bookkeeping, which does not see ours. Starting at the other end keeps the
// two apart until the bus is nearly full.
//
// When nothing fits, the error wraps ErrNoFreeSlot and says what was
// looked at and what the policy left out.
func choosePlacement(buses []pciBus, types map[string]string, p Placement) (placement, error) {
	return newTopology(buses, types).choose(p)
}

func (t Topology) choose(p Placement) (placement, error) {
	buses := t.buses
	c := t.survey(p)
	pick := func(want func(BusCapacity) bool) (placement, bool) {
		for i := len(c.Buses) - 1; i >= 0; i-- {
			b := c.Buses[i]
			if !b.Allowed || len(b.Free) == 0 || !want(b) {
				continue
			}
			s := b.Free[0]
			pl := placement{bus: b.Bus, slot: s, path: pciPathOf(buses, b.Bus, s)}
			if !b.isPort() {
				pl.addr = fmt.Sprintf("%#x", s)
			}
			return pl, true
		}
		return placement{}, false
	}
	for _, want := range []func(BusCapacity) bool{
		BusCapacity.isPort,
		func(b BusCapacity) bool { return pciBridges[b.Type] },
		func(b BusCapacity) bool { return b.Type == rootBusPC },
	} {
		if pl, ok := pick(want); ok {
			return pl, nil
		}
	}
	return placement{}, fmt.Errorf("%w: %s", ErrNoFreeSlot, c.whyFull())
}

// whyFull explains a Capacity without an allowed free slot, e.g.
// "no free slot on pci-bridge br1 (slots 1..31 taken or reserved), 2 empty root ports not used: hotplug = bridge".
func (c Capacity) whyFull() string {
	var full []string
	portsUnused, bridgesUnused := 0, 0
	for _, b := range c.Buses {
		switch {
		case !b.Allowed && len(b.Free) > 0 && b.isPort():
			portsUnused++
		case !b.Allowed && len(b.Free) > 0:
			bridgesUnused++
		case !b.Allowed:
		case b.isPort():
			full = append(full, b.Type+" "+b.Bus+" (taken)")
		default:
			what := "slots 1..31 taken"
			if b.Held > 0 {
				what = fmt.Sprintf("%d taken, %d reserved", b.Taken, b.Held)
			}
			name := b.Type
			if b.Bus != rootBusPC {
				name += " " + b.Bus
			}
			full = append(full, name+" ("+what+")")
		}
	}
	var s string
	switch policy := c.Placement.policy(); {
	case len(full) > 0:
		s = "no free slot on " + strings.Join(full, ", ")
	case policy == HotplugRootPort:
		s = "no PCIe root port"
	case policy == HotplugBridge:
		s = "no PCI bridge and no pc pci.0 (q35's pcie.0 takes no hot-plug)"
	default:
		s = "no PCIe root port, no PCI bridge, no pc pci.0 (q35's pcie.0 takes no hot-plug)"
	}
	if portsUnused > 0 {
		s += fmt.Sprintf(", %d empty root ports not used", portsUnused)
	}
	if bridgesUnused > 0 {
		s += fmt.Sprintf(", %d buses with free slots not used", bridgesUnused)
	}
	return s + ": " + c.Placement.String()
}

// freeSlots returns the slots in 1..31 with no function in use and not
// reserved, highest first, and how many slots are taken and how many free
// ones are reserved.
func freeSlots(used map[int]bool, reserved SlotRange) (free []int, taken, held int) {
	for s := 31; s >= 1; s-- {
		switch {
		case used[s]:
			taken++
		case reserved.contains(s):
			held++
		default:
			free = append(free, s)
		}
	}
	return free, taken, held
}

// secondaryDevices returns the devices query-pci lists behind a bridge or
// port, keeping only those on its own secondary bus. QEMU looks a bridge's
// devices up by the bus number the firmware wrote into it: before the
// firmware has numbered the buses (secondary 0) it lists none, and while
// the firmware is numbering them (a guest boot or reset) a lookup can land
// on another bus and list that bus's devices, which made empty root ports
// look taken. A slot wrongly taken for free then fails device_add, which
// AddNIC rolls back.
func (d pciDevice) secondaryDevices() []pciDevice {
	sec := d.PCIBridge.Bus.Secondary
	if sec == 0 {
		return nil
	}
	var own []pciDevice
	for _, c := range d.PCIBridge.Devices {
		if c.Bus == sec {
			own = append(own, c)
		}
	}
	return own
}

func isI440FX(devs []pciDevice) bool {
	for _, d := range devs {
		if d.Slot == 0 && d.Function == 0 && d.ID.Vendor == vendorIntel && d.ID.Device == deviceI440FX {
			return true
		}
	}
	return false
}

// Equivalent to: {"execute": "qom-get", "arguments": {"path": path, "property": prop}} (HMP: qom-get PATH PROP)
func (c *Client) qomGet(ctx context.Context, path, prop string, out any) error {
	return c.runInto(ctx, "qom-get", "path="+path+" property="+prop,
		map[string]any{"path": path, "property": prop}, out)
}

// Topology asks QEMU for its hot-plug buses and the slots taken on them.
//
// Equivalent to: HMP info qtree (see readTree).
func (c *Client) Topology(ctx context.Context) (Topology, error) {
	t, err := c.readTree(ctx)
	if err != nil {
		return Topology{}, err
	}
	return newTopology(t.buses, t.types), nil
}

// HotplugCapacity lists, per bus, the places AddNIC could still take under
// p, and the buses p leaves alone (for "tapsync check --sandbox").
//
// Equivalent to: HMP info qtree.
func (c *Client) HotplugCapacity(ctx context.Context, p Placement) (Capacity, error) {
	if err := p.Validate(); err != nil {
		return Capacity{}, err
	}
	t, err := c.Topology(ctx)
	if err != nil {
		return Capacity{}, fmt.Errorf("hot-plug capacity of VM at %s: %w", c.path, err)
	}
	return t.survey(p), nil
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
