package reconcile

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile/planner"
)

// vmModel is what tapsync knows of one VM through one QMP connection: its
// virtio-net devices, our netdevs and its hot-plug slots. A pass that
// finds it usable observes the VM from it, without a QMP round trip. It
// starts unknown with each connection, is kept current by our own
// commands and by DEVICE_DELETED, and is dropped by the causes
// beliefRules lists for beliefVMModel (beliefs.go); a verify observes
// fully and logs what the model had wrong.
type vmModel struct {
	mu     sync.Mutex
	conn   *qmp.Client // the connection the model belongs to
	known  bool        // nics, netdevs and topo are current
	verify bool        // the next pass observes fully and compares
	why    cause       // what last outdated the model (drop)
	read   bool        // the connection's first reading is done (see observe)
	// partial: nics and netdevs are current, topo and the NICs' places
	// (Bus, Addr, PCIPath) are not known: the first reading only verified
	// the record (see observe). A pass that has something to do reads the
	// VM fully first (see needsFullReading).
	partial bool
	// version counts changes from events and our commands: a full
	// observation during which it moved may have missed one, and is not
	// installed.
	version uint64
	nics    []qmp.NICInfo
	netdevs []int // indexes of our netdevs
	// topo is the VM's hot-plug slots, read with the rest and kept like it.
	topo qmp.Topology
	// onReset is told of each RESET QEMU reports (the guest rebooted).
	// What it means for the guest belongs to the sandbox, not to this
	// connection's model (see sandboxRuntime.noteReset).
	onReset func()
	// kataLinks names the Kata links the netns showed at the last pass:
	// Kata hot-plugs through a monitor of its own, and QEMU reports no
	// device_add to the others.
	kataLinks string
}

// usable says whether NICs would be read from the model now.
func (m *vmModel) usable() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.known && !m.verify
}

// kataChanged records the Kata links of this pass and says whether they
// differ from the last pass's.
func (m *vmModel) kataChanged(links []datapath.Link) bool {
	var keys []string
	for _, l := range links {
		keys = append(keys, fmt.Sprintf("%s/%d/%s", l.Name, l.Ifindex, l.MAC))
	}
	slices.Sort(keys)
	key := strings.Join(keys, ",")
	m.mu.Lock()
	defer m.mu.Unlock()
	changed := key != m.kataLinks
	m.kataLinks = key
	return changed
}

// modelIgnored are QMP events that change nothing the model holds.
var modelIgnored = map[string]bool{
	"NIC_RX_FILTER_CHANGED": true, "STOP": true, "RESUME": true, "RTC_CHANGE": true,
	"ACPI_DEVICE_OST": true, "DEVICE_UNPLUG_GUEST_ERROR": true, "POWERDOWN": true,
	"SUSPEND": true, "WAKEUP": true, "BALLOON_CHANGE": true, "VSERPORT_CHANGE": true,
}

// event applies one QMP event: a DEVICE_DELETED of a NIC the model holds
// removes it and frees its slot; any other event that is not known to be
// harmless makes the model unknown.
func (m *vmModel) event(e qmp.Event) {
	if modelIgnored[e.Name] {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.version++
	if e.Name == "RESET" && m.onReset != nil {
		m.onReset()
	}
	if !m.known {
		return
	}
	if e.Name == "DEVICE_DELETED" {
		path, _ := e.Data["path"].(string)
		if i := slices.IndexFunc(m.nics, func(n qmp.NICInfo) bool { return n.QOMPath == path }); path != "" && i >= 0 {
			m.dropNICLocked(i)
			return
		}
		// QEMU 7.2 first reports a NIC's own virtio backend
		// (<nic>/virtio-backend, no device id), then the NIC.
		if slices.ContainsFunc(m.nics, func(n qmp.NICInfo) bool { return n.QOMPath != "" && strings.HasPrefix(path, n.QOMPath+"/") }) {
			return
		}
	}
	if e.Name == "RESET" {
		m.dropLocked(causeReset)
		return
	}
	m.dropLocked(causeQMPEvent)
}

// dropNICLocked removes nics[i] and frees its slot; m.mu must be held.
func (m *vmModel) dropNICLocked(i int) {
	n := m.nics[i]
	if slot, ok := slotOf(n); ok {
		m.topo.Release(n.Bus, slot)
	}
	m.nics = slices.Delete(m.nics, i, i+1)
}

// slotOf is the slot of a NIC's Addr ("1f.0").
func slotOf(n qmp.NICInfo) (int, bool) {
	var slot, fn int
	if _, err := fmt.Sscanf(n.Addr, "%x.%x", &slot, &fn); err != nil {
		return 0, false
	}
	return slot, true
}

// drop outdates the model when beliefRules says cause c drops it: the
// next pass observes the VM fully, and a verify compares that with the
// model and logs what differed. why keeps c for that pass's log.
func (m *vmModel) drop(c cause) {
	if m == nil || beliefRules[c].drops&beliefVMModel == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dropLocked(c)
}

// dropLocked is drop with m.mu held.
func (m *vmModel) dropLocked(c cause) {
	if beliefRules[c].drops&beliefVMModel == 0 {
		return
	}
	m.why = c
	if c == causeVerify {
		m.verify = true // kept, to be compared: what it holds did not change
		return
	}
	m.known = false
	m.version++
}

// outdated says why the model cannot be used now ("" when it can).
func (m *vmModel) outdated() cause {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case !m.read:
		return causeReconnect
	case m.known && !m.verify:
		return ""
	}
	return m.why
}

// fresh returns the model's view when it is known and no verify is due.
func (m *vmModel) fresh() (nics []qmp.NICInfo, netdevs []int, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.known || m.verify {
		return nil, nil, false
	}
	return slices.Clone(m.nics), slices.Clone(m.netdevs), true
}

// observe reads QEMU and installs what it saw, unless the model changed
// meanwhile; with a verify due and a full model known, what differed is
// logged. A connection's first reading asks no more than its use needs
// (docs/reconcile.md, "A connection's first reading"): with a record to
// verify (recorded) the model it installs is partial, enough to plan but
// not to act (needsFullReading); every later reading is full.
//
// Equivalent to: ReadVM (HMP info qtree, info network): NICs, netdevs and
// hot-plug slots in two round trips; one for a first reading: HMP info
// network (ReadNetwork) with a record to verify, else info qtree
// (ReadDevices) when the record accounts for the NICs.
func (m *vmModel) observe(ctx context.Context, recorded func() bool, accounted func([]qmp.NICInfo) bool) ([]qmp.NICInfo, []int, error) {
	m.mu.Lock()
	v, c, first := m.version, m.conn, !m.read
	m.read = true
	m.mu.Unlock()
	var vm qmp.VMState
	var err error
	partial := first && recorded != nil && recorded()
	if partial {
		vm, err = c.ReadNetwork(ctx)
	} else {
		vm, err = c.ReadDevices(ctx)
	}
	if err != nil {
		return nil, nil, err
	}
	if !partial && (!first || accounted == nil || !accounted(vm.NICs)) {
		if vm.Netdevs, err = c.ListNetdevs(ctx); err != nil {
			return nil, nil, err
		}
	}
	netdevs := netdevIndexes(vm.Netdevs)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.version != v {
		return vm.NICs, netdevs, nil // changed under us: observe again next time
	}
	if m.known && m.verify && !m.partial && !partial {
		if diff := m.diffLocked(vm.NICs, netdevs); diff != "" {
			zerolog.Ctx(ctx).Warn().Str("differences", diff).
				Msg("the model of the VM differed from QEMU (a bug, or another actor changed the VM); replaced")
		}
	}
	m.known, m.verify, m.partial = true, false, partial
	m.nics, m.netdevs = slices.Clone(vm.NICs), slices.Clone(netdevs)
	m.topo = vm.Topology
	return vm.NICs, netdevs, nil
}

// complete makes a partial model full (see observe) with the device tree
// alone, one round trip: the netdevs stay those the partial reading
// listed, since nothing changed the model in between. ok is false when
// something did (an event, a command): the model is then unknown, and
// the caller observes again.
//
// Equivalent to: ReadDevices (HMP info qtree).
func (m *vmModel) complete(ctx context.Context) (nics []qmp.NICInfo, netdevs []int, ok bool, err error) {
	m.mu.Lock()
	v, c := m.version, m.conn
	m.mu.Unlock()
	vm, err := c.ReadDevices(ctx)
	if err != nil {
		m.drop(causeQMPFailed)
		return nil, nil, false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.version != v || !m.known || !m.partial {
		if m.known { // else what made it unknown stays its cause
			m.dropLocked(causeRaced)
		}
		return nil, nil, false, nil
	}
	m.partial = false
	m.nics, m.topo = slices.Clone(vm.NICs), vm.Topology
	return vm.NICs, slices.Clone(m.netdevs), true, nil
}

// needsFullReading says whether the model is partial (see observe): a
// pass that acts completes it first, since plugging needs the free slots,
// and the guest the NICs' PCI paths.
func (m *vmModel) needsFullReading() bool {
	if m == nil {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.known && m.partial
}

// diffLocked says how the model differs from what QEMU showed, "" when it
// does not; m.mu must be held.
func (m *vmModel) diffLocked(nics []qmp.NICInfo, netdevs []int) string {
	var d []string
	key := func(n qmp.NICInfo) string {
		return fmt.Sprintf("%s mac=%s netdev=%s bus=%s addr=%s path=%s", n.QOMPath, n.MAC, n.Netdev, n.Bus, n.Addr, n.PCIPath)
	}
	have := map[string]bool{}
	for _, n := range m.nics {
		have[key(n)] = true
	}
	for _, n := range nics {
		if k := key(n); !have[k] {
			d = append(d, "unknown NIC "+k)
		} else {
			delete(have, k)
		}
	}
	for k := range have {
		d = append(d, "NIC gone "+k)
	}
	a, b := slices.Sorted(slices.Values(m.netdevs)), slices.Sorted(slices.Values(netdevs))
	if !slices.Equal(a, b) {
		d = append(d, fmt.Sprintf("netdevs %v, QEMU has %v", a, b))
	}
	sort.Strings(d)
	return strings.Join(d, "; ")
}

// place chooses where a new NIC goes, when the model is fresh and holds
// neither the device nor the netdev of index: AddNIC then asks QEMU
// nothing. nil means "let AddNIC look".
func (m *vmModel) place(index int, p qmp.Placement) *qmp.Place {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.known || m.verify || m.partial || slices.Contains(m.netdevs, index) ||
		slices.ContainsFunc(m.nics, func(n qmp.NICInfo) bool { return n.Owned && n.Index == index }) {
		return nil
	}
	at, err := m.topo.Choose(p)
	if err != nil {
		return nil // AddNIC looks again and says what is full
	}
	return &at
}

// plugged records a NIC that AddNIC made (or found).
func (m *vmModel) plugged(info qmp.NICInfo) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.version++
	if !m.known {
		return
	}
	if m.partial {
		m.dropLocked(causePartialPlug) // the slot it took is in no topology the model has
		return
	}
	if slices.ContainsFunc(m.nics, func(n qmp.NICInfo) bool { return n.QOMPath == info.QOMPath }) {
		if !slices.ContainsFunc(m.nics, func(n qmp.NICInfo) bool {
			return n.QOMPath == info.QOMPath && bytes.Equal(n.MAC, info.MAC) && n.Bus == info.Bus && n.Addr == info.Addr
		}) {
			m.dropLocked(causeContradicted) // found made already, elsewhere than the model thought
		}
		return
	}
	slot, ok := slotOf(info)
	if !ok {
		m.dropLocked(causeContradicted)
		return
	}
	m.topo.Take(info.Bus, slot)
	m.nics = append(m.nics, info)
	if !slices.Contains(m.netdevs, info.Index) {
		m.netdevs = append(m.netdevs, info.Index)
	}
}

// unplugged records that endpoint index's NIC and netdev are gone.
func (m *vmModel) unplugged(index int) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.version++
	if i := slices.IndexFunc(m.nics, func(n qmp.NICInfo) bool { return n.Owned && n.Index == index }); i >= 0 {
		m.dropNICLocked(i)
	}
	m.netdevs = slices.DeleteFunc(m.netdevs, func(n int) bool { return n == index })
}

// countQueues resolves queues = 0 (one per vCPU) for the endpoints the
// pass would make: the vCPUs are counted then, and only then, since Kata
// hot-adds them after the VM starts. An endpoint keeps its count.
func (s *session) countQueues(ctx context.Context) error {
	s.queues = s.sb.Queues
	if s.queues > 0 {
		return nil
	}
	p := Compute(s.obs, s.rec, s.options())
	if !slices.ContainsFunc(p.Actions, func(a Action) bool {
		_, recorded := s.rec.Endpoint(a.Endpoint.Index)
		return a.Op == planner.OpRecord && !recorded
	}) {
		return nil
	}
	n, err := s.vm.c.VCPUs(ctx)
	if err != nil {
		return fmt.Errorf("count vCPUs for queues=0: %w", err)
	}
	s.queues = min(max(n, 1), datapath.MaxQueues)
	return nil
}
