package qmp

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
)

// The device tree, as HMP "info qtree" prints it, is the one reading of a
// VM that tells everything tapsync needs about it in a single round trip:
// every device with its id and type, the bus it sits on, its PCI address,
// and the properties of its parts (a virtio-net-pci's MAC and netdev are on
// its virtio-net-device child). A QMP command costs QEMU about a
// millisecond of CPU whatever it asks (measured on QEMU 7.2 under TCG: even
// query-name), so reading a VM through QOM — qom-list of two containers,
// qom-get of four properties per NIC, query-pci for the bridges — cost
// 15 or more of them; this costs one. It also lists the devices behind a
// bridge whose bus the firmware has not numbered yet (a VM started with -S),
// which query-pci leaves out.
//
// QEMU 7.2 prints (two spaces per level; "bus:" lines open a bus of the
// device above, "dev:" lines a device on the bus above, "name = value"
// lines are the device's properties, strings quoted):
//
//	bus: main-system-bus
//	  type System
//	  dev: q35-pcihost, id ""
//	    bus: pcie.0
//	      type PCIE
//	      dev: pci-bridge, id "pci-bridge-0"
//	        addr = 1e.0
//	        class PCI bridge, addr 00:1e.0, pci id 1b36:0001 (sub 0000:0000)
//	        bus: pci-bridge-0
//	          type PCI
//	          dev: virtio-net-pci, id "tapsync-net0"
//	            addr = 1f.0
//	            bus: virtio-bus
//	              type virtio-pci-bus
//	              dev: virtio-net-device, id ""
//	                mac = "02:54:53:00:01:02"
//	                netdev = "tapsync-netdev0"
//
// HMP is QEMU's human interface; this format has been stable since QEMU
// 1.x, and what does not parse as it is an error naming the line, never a
// guess.

// qtreeDev is one device of the tree, with the properties read here.
type qtreeDev struct {
	typ, id string
	// addr, mac and netdev are those properties as printed (strings
	// unquoted); the tree prints dozens more per device, not kept.
	addr, mac, netdev string
	hasMAC            bool
	vendor            int // from the PCI "class ..., pci id VVVV:DDDD" line; -1 when none
	device            int
	buses             []*qtreeBus
}

// qtreeBus is one bus of the tree.
type qtreeBus struct {
	name, typ string
	devs      []*qtreeDev
}

// isPCI says whether devices on b are PCI functions (q35's pcie.0, pc's
// pci.0, a bridge's or port's secondary bus, a PCI expander's bus:
// pxb-bus, pxb-pcie-bus, pxb-cxl-bus).
func (b *qtreeBus) isPCI() bool {
	return b.typ == "PCI" || b.typ == "PCIE" || strings.HasPrefix(b.typ, "pxb-")
}

// devfn is a PCI device's address on its bus, from its "addr = SS.F" property.
func (d *qtreeDev) devfn() (slot, fn int, ok bool) {
	s, f, found := strings.Cut(d.addr, ".")
	if !found {
		return 0, 0, false
	}
	sl, err1 := strconv.ParseUint(s, 16, 8)
	fu, err2 := strconv.ParseUint(f, 16, 8)
	if err1 != nil || err2 != nil || sl > 31 || fu > 7 {
		return 0, 0, false
	}
	return int(sl), int(fu), true
}

// parseQtree reads the output of "info qtree".
func parseQtree(out string) (*qtreeBus, error) {
	type frame struct {
		indent int
		bus    *qtreeBus
		dev    *qtreeDev
	}
	var root *qtreeBus
	var stack []frame
	n := 0
	for rest := out; rest != ""; {
		var line string
		line, rest, _ = strings.Cut(rest, "\n")
		n++
		line = strings.TrimRight(line, "\r")
		text := strings.TrimLeft(line, " ")
		if text == "" {
			continue
		}
		indent := len(line) - len(text)
		for len(stack) > 0 && stack[len(stack)-1].indent >= indent {
			stack = stack[:len(stack)-1]
		}
		var top frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		bad := func(why string) error {
			return fmt.Errorf("info qtree line %d %q: %s", n, truncate(line, 80), why)
		}
		switch {
		case strings.HasPrefix(text, "bus: "):
			// Clones: what the tree keeps must not hold the whole reply
			// (a substring does), since a model keeps its tree's names.
			b := &qtreeBus{name: strings.Clone(strings.TrimPrefix(text, "bus: "))}
			switch {
			case b.name == "" || strings.ContainsAny(b.name, " \t"):
				return nil, bad("a bus without a name")
			case len(stack) == 0 && root == nil && indent == 0:
				root = b
			case top.dev != nil && top.indent == indent-2:
				top.dev.buses = append(top.dev.buses, b)
			default:
				return nil, bad("a bus outside a device")
			}
			stack = append(stack, frame{indent: indent, bus: b})
		case strings.HasPrefix(text, "dev: "):
			if top.bus == nil || top.indent != indent-2 {
				return nil, bad("a device outside a bus")
			}
			typ, rest, ok := strings.Cut(strings.TrimPrefix(text, "dev: "), ", id ")
			id, unquoted := unquote(rest)
			if !ok || !unquoted || typ == "" {
				return nil, bad(`want "dev: TYPE, id \"ID\""`)
			}
			d := &qtreeDev{typ: strings.Clone(typ), id: strings.Clone(id), vendor: -1, device: -1}
			top.bus.devs = append(top.bus.devs, d)
			stack = append(stack, frame{indent: indent, dev: d})
		case top.bus != nil && top.indent == indent-2:
			if t, ok := strings.CutPrefix(text, "type "); ok && top.bus.typ == "" {
				top.bus.typ = strings.Clone(t)
			}
		case top.dev != nil && top.indent == indent-2:
			if name, value, ok := strings.Cut(text, " = "); ok && !strings.Contains(name, " ") {
				if s, quoted := unquote(value); quoted {
					value = s
				}
				switch name {
				case "addr":
					top.dev.addr = value // parsed, not kept
				case "mac":
					top.dev.mac, top.dev.hasMAC = value, true // parsed, not kept
				case "netdev":
					top.dev.netdev = strings.Clone(value)
				}
			} else if _, ids, ok := strings.Cut(text, ", pci id "); ok && strings.HasPrefix(text, "class ") {
				var v, d int
				if _, err := fmt.Sscanf(ids, "%x:%x", &v, &d); err == nil {
					top.dev.vendor, top.dev.device = v, d
				}
			}
			// gpio, mmio, bar and other lines tell nothing needed here.
		}
		// Deeper lines under a property (none in QEMU 7.2) are skipped.
	}
	if root == nil {
		return nil, fmt.Errorf("info qtree: no device tree in %q", truncate(out, 120))
	}
	return root, nil
}

// unquote strips the double quotes QEMU prints around strings.
func unquote(s string) (string, bool) {
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		return s[1 : len(s)-1], true
	}
	return s, false
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// vmTree is one reading of a VM's devices: the PCI tree in query-pci's
// shape (what placement works on), the ids of user-created devices with
// their types, and the virtio-net devices.
type vmTree struct {
	buses []pciBus
	types map[string]string
	nics  []NICInfo
}

// readTree asks QEMU for its device tree.
//
// Equivalent to: {"execute": "human-monitor-command", "arguments": {"command-line": "info qtree"}} (HMP: info qtree)
func (c *Client) readTree(ctx context.Context) (vmTree, error) {
	var out string
	if err := c.runInto(ctx, "human-monitor-command", "command-line=info qtree",
		map[string]any{"command-line": "info qtree"}, &out); err != nil {
		return vmTree{}, err
	}
	root, err := parseQtree(out)
	if err != nil {
		return vmTree{}, err
	}
	return treeOf(root)
}

// treeOf gathers what a reading is used for. PCI buses are numbered here
// in the order the tree lists them (the root bus 0, each bridge's or
// port's secondary bus the next number): the numbers only pair a bridge
// with its devices, as they do in query-pci once the firmware has run.
func treeOf(root *qtreeBus) (vmTree, error) {
	t := vmTree{types: map[string]string{}}
	next := 0
	var pciDevs func(b *qtreeBus, num int, path []int) ([]pciDevice, error)
	pciDevs = func(b *qtreeBus, num int, path []int) ([]pciDevice, error) {
		var devs []pciDevice
		for _, d := range b.devs {
			if d.id != "" {
				t.types[d.id] = d.typ
			}
			slot, fn, ok := d.devfn()
			if !ok {
				return nil, fmt.Errorf("info qtree: %s %q on PCI bus %s has no PCI address (addr = %q)", d.typ, d.id, b.name, d.addr)
			}
			pd := pciDevice{Bus: num, Slot: slot, Function: fn, QdevID: d.id}
			pd.ID.Vendor, pd.ID.Device = d.vendor, d.device
			here := append(append([]int(nil), path...), slot)
			if isVirtioNet(d.typ) {
				nic, err := nicOf(d, b.name, slot, fn)
				if err != nil {
					return nil, err
				}
				nic.PCIPath = PCIPath(here)
				t.nics = append(t.nics, nic)
			}
			pciBuses := 0
			for _, sub := range d.buses {
				if !sub.isPCI() {
					if err := collectIDs(sub, t.types); err != nil {
						return nil, err
					}
					continue
				}
				if pciBuses++; pciBuses > 1 {
					return nil, fmt.Errorf("info qtree: %s %q opens more than one PCI bus", d.typ, d.id)
				}
				next++
				num := next
				children, err := pciDevs(sub, num, here)
				if err != nil {
					return nil, err
				}
				pd.PCIBridge = &pciBridge{Devices: children}
				pd.PCIBridge.Bus.Secondary = num
			}
			devs = append(devs, pd)
		}
		// The tree lists a bus's newest device first; query-pci, and
		// placement after it, go by address.
		slices.SortFunc(devs, func(a, b pciDevice) int { return cmp.Or(a.Slot-b.Slot, a.Function-b.Function) })
		return devs, nil
	}
	var walk func(b *qtreeBus) error
	walk = func(b *qtreeBus) error {
		if b.isPCI() {
			devs, err := pciDevs(b, next, nil)
			if err != nil {
				return err
			}
			t.buses = append(t.buses, pciBus{Bus: 0, Devices: devs})
			next++
			return nil
		}
		for _, d := range b.devs {
			if d.id != "" {
				t.types[d.id] = d.typ
			}
			if isVirtioNet(d.typ) {
				return fmt.Errorf("info qtree: %s %q on bus %s of type %q, not a PCI bus this reader knows", d.typ, d.id, b.name, b.typ)
			}
			for _, sub := range d.buses {
				if err := walk(sub); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(root); err != nil {
		return vmTree{}, err
	}
	return t, nil
}

// collectIDs records the ids and types of the devices below a non-PCI
// bus of a PCI device (a virtio bus, i2c, ide). A virtio-net-pci there
// would be a NIC this reader cannot place: an error, never left out.
func collectIDs(b *qtreeBus, types map[string]string) error {
	for _, d := range b.devs {
		if d.id != "" {
			types[d.id] = d.typ
		}
		if isVirtioNet(d.typ) {
			return fmt.Errorf("info qtree: %s %q on bus %s of type %q, not a PCI bus this reader knows", d.typ, d.id, b.name, b.typ)
		}
		for _, sub := range d.buses {
			if err := collectIDs(sub, types); err != nil {
				return err
			}
		}
	}
	return nil
}

// nicOf reads a virtio-net-pci device of the tree: its MAC and netdev are
// properties of its virtio-net-device on the virtio bus below it.
func nicOf(d *qtreeDev, bus string, slot, fn int) (NICInfo, error) {
	info := NICInfo{ID: d.id, Index: -1, Bus: bus, Addr: fmt.Sprintf("%02x.%x", slot, fn)}
	if n, ok := ParseDeviceID(d.id); ok {
		info.Index, info.Owned = n, true
	}
	if d.id != "" {
		info.QOMPath = peripheral + "/" + d.id
	}
	mac, netdev := d.mac, d.netdev
	for _, sub := range d.buses {
		for _, vd := range sub.devs {
			if vd.hasMAC {
				mac, netdev = vd.mac, vd.netdev
			}
		}
	}
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return NICInfo{}, fmt.Errorf("info qtree: %s %q at %s/%s: MAC %q: not a MAC address", d.typ, d.id, bus, info.Addr, mac)
	}
	info.MAC, info.Netdev = hw, netdev
	return info, nil
}
