package reconcile

// This file is the fake world the planner's replay and crash tests run
// plans against: a netns, a VM and a guest in memory, implementing Host,
// VM and Guest, with fault injection. It is long because it is one model;
// split, each part would need the others' state.

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// world is a fake sandbox: the host side of a netns and a QEMU, holding
// state the way the kernel and QEMU do. Tests compare its end state; call
// order does not matter. It implements Host, VM and Recorder.
type world struct {
	nextIfindex int
	links       []datapath.Link
	taps        map[int]*datapath.Tap
	kata        []datapath.Link // Kata's tap<N>_kata taps and macvtaps
	redirs      []datapath.Redirect
	nics        []NIC
	netdevs     map[int]bool
	rec         state.Record
	saves       int
	mutations   int
	twins       []string     // plugs that put a second NIC with one MAC into the VM
	unsafe      []string     // taps deleted while QEMU still held them
	hangUnplug  bool         // the guest never acknowledges device_del
	orphaned    map[int]bool // netdevs QEMU holds but cannot delete
	failOp      Op           // this op fails once when failNext is set
	failNext    bool
	guestOn     bool // checkConverged also checks the guest
	routes      []datapath.Route
	neighbors   []datapath.Neighbor
	guest       *fakeGuest
	// plugSerial numbers each plug of a NIC, by device id (MAC for a
	// device without one): the guest's netdevice is the plug, not the MAC.
	plugSerial map[string]int
	plugs      int
	// events are what happened to the guest that the reconciler would
	// have noted for the next pass (see noteGuest).
	events []cause
	// unplugBatches are the VM.UnplugNICs calls so far.
	unplugBatches []unplugBatch
	macvtaps      map[int]*datapath.Macvtap // ours, by endpoint index
	limits        map[int]uint64            // our rate limits, by ifindex
	// ifbs are our ifbs tsi<N> by N: the link whose ingress feeds
	// each (0: none) and its limit.
	ifbs map[int]fakeIfb
	// model and the rates are the sandbox's settings: reconcile and
	// checkConverged use them.
	model          string
	rxRate, txRate uint64
	// orig is each container link as it was made (or last changed by the
	// test): what it must look like when no macvtap endpoint has it.
	orig map[int]origLink
}

type fakeIfb struct {
	from int
	bps  uint64
}

type origLink struct {
	mac    net.HardwareAddr
	addrs  []netip.Prefix
	routes []datapath.Route
}

type unplugBatch struct {
	reqs  []Unplug
	wait  bool
	saves int // record writes before this call (world.saves then)
}

func newWorld() *world {
	w := &world{nextIfindex: 2, taps: map[int]*datapath.Tap{}, netdevs: map[int]bool{}, orphaned: map[int]bool{},
		rec: state.Record{Version: state.Version, Sandbox: "sb"}, macvtaps: map[int]*datapath.Macvtap{}, limits: map[int]uint64{},
		ifbs: map[int]fakeIfb{}, orig: map[int]origLink{}}
	w.guest = &fakeGuest{w: w, calls: map[string]int{}}
	return w
}

func (w *world) clone() *world {
	c := *w
	c.links = slices.Clone(w.links)
	c.taps = map[int]*datapath.Tap{}
	for k, v := range w.taps {
		t := *v
		c.taps[k] = &t
	}
	c.redirs = slices.Clone(w.redirs)
	c.kata = slices.Clone(w.kata)
	c.nics = slices.Clone(w.nics)
	c.unplugBatches = slices.Clone(w.unplugBatches)
	c.netdevs = map[int]bool{}
	for k, v := range w.netdevs {
		c.netdevs[k] = v
	}
	c.rec = w.rec.Clone()
	c.routes = slices.Clone(w.routes)
	c.neighbors = slices.Clone(w.neighbors)
	c.guest = w.guest.clone(&c)
	c.macvtaps = map[int]*datapath.Macvtap{}
	for k, v := range w.macvtaps {
		m := *v
		c.macvtaps[k] = &m
	}
	c.limits = maps.Clone(w.limits)
	c.ifbs = maps.Clone(w.ifbs)
	c.orig = maps.Clone(w.orig)
	c.plugSerial = maps.Clone(w.plugSerial)
	c.events = slices.Clone(w.events)
	return &c
}

func macN(n int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0x54, 0x53, 0, byte(n >> 8), byte(n)}
}

// addLink puts a container link into the netns and returns its ifindex.
func (w *world) addLink(name, kind string, mac net.HardwareAddr, mtu int) int {
	w.nextIfindex++
	w.links = append(w.links, datapath.Link{Name: name, Ifindex: w.nextIfindex, Kind: kind, MAC: mac, MTU: mtu, Up: true})
	w.orig[w.nextIfindex] = origLink{mac: mac}
	return w.nextIfindex
}

// addAddr gives a container link an address and, with gw, a default
// route through it, as a CNI plugin does.
func (w *world) addAddr(name, prefix, gw string) {
	i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == name })
	l := &w.links[i]
	p := netip.MustParsePrefix(prefix)
	l.Addrs = append(l.Addrs, p)
	o := w.orig[l.Ifindex]
	o.addrs = append(slices.Clone(o.addrs), p)
	if gw != "" {
		r := datapath.Route{Gateway: netip.MustParseAddr(gw), LinkIndex: l.Ifindex, Protocol: 4}
		w.routes = append(w.routes, r)
		o.routes = append(slices.Clone(o.routes), r)
	}
	w.orig[l.Ifindex] = o
}

// setMAC changes a container link's MAC, as an admin or CNI would.
func (w *world) setMAC(name string, mac net.HardwareAddr) {
	i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == name })
	w.links[i].MAC = mac
	o := w.orig[w.links[i].Ifindex]
	o.mac = mac
	w.orig[w.links[i].Ifindex] = o
}

// delLink deletes a container link; the kernel drops its filters with it.
func (w *world) delLink(name string) {
	i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == name })
	if i < 0 {
		return
	}
	idx := w.links[i].Ifindex
	w.links = slices.Delete(w.links, i, i+1)
	delete(w.limits, idx)
	delete(w.orig, idx)
	for n, f := range w.ifbs { // the kernel drops the link's filters with it
		if f.from == idx {
			w.ifbs[n] = fakeIfb{bps: f.bps}
		}
	}
	for n, m := range w.macvtaps { // the kernel deletes a macvtap with its lower device
		if m.Parent == idx {
			delete(w.macvtaps, n)
			delete(w.limits, m.Ifindex)
		}
	}
	w.redirs = slices.DeleteFunc(w.redirs, func(r datapath.Redirect) bool { return r.From == idx })
	w.routes = slices.DeleteFunc(w.routes, func(r datapath.Route) bool { return r.LinkIndex == idx })
	w.neighbors = slices.DeleteFunc(w.neighbors, func(n datapath.Neighbor) bool { return n.LinkIndex == idx })
}

func (w *world) link(name string) datapath.Link {
	i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == name })
	return w.links[i]
}

// kataColdPlug wires link the way Kata does at boot (tcfilter model): a
// tap tap<N>_kata with Kata's filters (auto priority) and a device without
// our ids.
func (w *world) kataColdPlug(linkName string, tapIndex int) {
	l := w.link(linkName)
	w.nextIfindex++
	w.kata = append(w.kata, datapath.Link{Name: fmt.Sprintf("tap%d_kata", tapIndex), Ifindex: w.nextIfindex, Kind: "tap", MTU: l.MTU, Up: true})
	w.redirs = append(w.redirs,
		datapath.Redirect{From: l.Ifindex, To: w.nextIfindex, Priority: 49152},
		datapath.Redirect{From: w.nextIfindex, To: l.Ifindex, Priority: 49152})
	w.nics = append(w.nics, NIC{ID: "", MAC: l.MAC})
}

// kataMacvtap wires link the way Kata's macvtap model does: a macvtap
// tap<N>_kata on top of it with its MAC, the link given another MAC, and
// a device without our ids with the original MAC.
func (w *world) kataMacvtap(linkName string, tapIndex int) {
	i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == linkName })
	l := w.links[i]
	w.nextIfindex++
	w.kata = append(w.kata, datapath.Link{Name: fmt.Sprintf("tap%d_kata", tapIndex), Ifindex: w.nextIfindex, Kind: "macvtap",
		MAC: l.MAC, MTU: l.MTU, Up: true, Parent: l.Ifindex})
	w.nics = append(w.nics, NIC{ID: "", MAC: l.MAC})
	w.setMAC(linkName, macN(0xfe00+tapIndex)) // Kata's doing: not for tapsync to give back
}

// kataFilterDel deletes Kata's filter on a link by hand.
func (w *world) kataFilterDel(linkName string) {
	l := w.link(linkName)
	w.redirs = slices.DeleteFunc(w.redirs, func(r datapath.Redirect) bool { return !r.Owned && r.From == l.Ifindex })
}

func (w *world) fail(op Op) error {
	if w.failNext && w.failOp == op {
		w.failNext = false
		return fmt.Errorf("injected failure in %s", op)
	}
	return nil
}

// Observe and NICs give copies, as the real sources do.
func (w *world) Observe() (datapath.State, error) {
	s := datapath.State{Links: slices.Clone(w.links), KataLinks: slices.Clone(w.kata), Redirects: slices.Clone(w.redirs),
		Routes: slices.Clone(w.routes), Neighbors: slices.Clone(w.neighbors)}
	for _, k := range slices.Sorted(mapKeys(w.taps)) {
		s.Taps = append(s.Taps, *w.taps[k])
	}
	for _, k := range slices.Sorted(mapKeys(w.macvtaps)) {
		s.Macvtaps = append(s.Macvtaps, *w.macvtaps[k])
	}
	for _, i := range slices.Sorted(mapKeys(w.limits)) {
		s.RateLimits = append(s.RateLimits, datapath.RateLimitOn{Ifindex: i, BPS: w.limits[i]})
	}
	for _, n := range slices.Sorted(mapKeys(w.ifbs)) {
		f := w.ifbs[n]
		s.RateLimits = append(s.RateLimits, datapath.RateLimitOn{Ifindex: f.from, BPS: f.bps, Ingress: true, Ifb: n})
	}
	for i := range s.Links {
		s.Links[i].Addrs = slices.Clone(s.Links[i].Addrs)
	}
	return s, nil
}

func mapKeys[V any](m map[int]V) func(func(int) bool) {
	return func(yield func(int) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func (w *world) NICs(context.Context) ([]NIC, []int, error) {
	return slices.Clone(w.nics), slices.Sorted(mapKeys(w.netdevs)), nil
}

// observed is what a pass observes of the host and QEMU; the guest is
// looked at only when the plan asks for it (see plan).
func (w *world) observed() Observed {
	s, _ := w.Observe()
	nics, netdevs, _ := w.NICs(context.Background())
	return Observed{Links: s.Links, Taps: s.Taps, Macvtaps: s.Macvtaps, RateLimits: s.RateLimits, KataLinks: s.KataLinks,
		Redirects: s.Redirects, Routes: s.Routes, Neighbors: s.Neighbors, NICs: nics, Netdevs: netdevs}
}

// plan computes a pass's plan as the reconciler does: the guest's view is
// asked for only when the record cannot show the guest converged.
func (w *world) plan(opts Options) Plan {
	obs := w.observed()
	p := Compute(obs, w.rec, opts)
	if opts.Guest && p.NeedsGuest() {
		g := w.guest.state()
		obs.Guest = &g
		p = Compute(obs, w.rec, opts)
	}
	return p
}

// noteGuest notes something that happened to the guest, as the
// reconciler does between passes.
func (w *world) noteGuest(ev cause) { w.events = append(w.events, ev) }

func (w *world) EnsureTap(_ context.Context, spec datapath.TapSpec) (datapath.Tap, error) {
	if err := w.fail(planner.OpCreateTap); err != nil {
		return datapath.Tap{}, err
	}
	t, ok := w.taps[spec.Index]
	if !ok {
		w.nextIfindex++
		w.mutations++
		t = &datapath.Tap{Link: datapath.Link{Name: datapath.TapName(spec.Index), Ifindex: w.nextIfindex, Kind: "tap", MTU: 1500, Up: true},
			Index: spec.Index, MultiQueue: spec.Queues > 1, VnetHdr: true, NoPI: true, Persistent: true}
		w.taps[spec.Index] = t
	}
	if !t.Persistent || t.MultiQueue != (spec.Queues > 1) {
		return datapath.Tap{}, datapath.ErrTapMismatch
	}
	if (spec.MTU > 0 && t.MTU != spec.MTU) || !t.Up {
		w.mutations++
		t.Up = true
		if spec.MTU > 0 {
			t.MTU = spec.MTU
		}
	}
	return *t, nil
}

func (w *world) ifindexExists(i int) bool {
	return slices.ContainsFunc(w.links, func(l datapath.Link) bool { return l.Ifindex == i }) ||
		slices.ContainsFunc(w.kata, func(l datapath.Link) bool { return l.Ifindex == i }) ||
		slices.ContainsFunc(slices.Collect(mapValues(w.macvtaps)), func(m *datapath.Macvtap) bool { return m.Ifindex == i }) ||
		slices.ContainsFunc(slices.Collect(mapValues(w.taps)), func(t *datapath.Tap) bool { return t.Ifindex == i })
}

func mapValues[V any](m map[int]V) func(func(V) bool) {
	return func(yield func(V) bool) {
		for _, v := range m {
			if !yield(v) {
				return
			}
		}
	}
}

func (w *world) ensureRedirect(from, to int) error {
	if !w.ifindexExists(from) || !w.ifindexExists(to) {
		return fmt.Errorf("redirect %d→%d: link not found", from, to)
	}
	i := slices.IndexFunc(w.redirs, func(r datapath.Redirect) bool { return r.Owned && r.From == from })
	if i >= 0 && w.redirs[i].To == to {
		return nil
	}
	w.mutations++
	w.redirs = slices.DeleteFunc(w.redirs, func(r datapath.Redirect) bool { return r.Owned && r.From == from })
	w.redirs = append(w.redirs, datapath.Redirect{From: from, To: to, Priority: datapath.FilterPriority, Owned: true})
	return nil
}

func (w *world) EnsureRedirects(container, tap int) error {
	if err := w.fail(planner.OpAddRedirects); err != nil {
		return err
	}
	if err := w.ensureRedirect(container, tap); err != nil {
		return err
	}
	return w.ensureRedirect(tap, container)
}

func (w *world) OpenQueues(_ context.Context, spec datapath.TapSpec, _ datapath.Vhost) (*datapath.Queues, error) {
	t, ok := w.taps[spec.Index]
	if !ok {
		return nil, fmt.Errorf("no tap %d", spec.Index)
	}
	if !t.MultiQueue && t.Attached > 0 {
		// A single-queue tap takes one opener; QEMU (or its leftover
		// netdev) still holds it.
		return nil, fmt.Errorf("TUNSETIFF %s: device or resource busy", t.Name)
	}
	return &datapath.Queues{Tap: make([]*os.File, spec.Queues)}, nil
}

func (w *world) PlugNIC(_ context.Context, index int, mac net.HardwareAddr, _ int, q *datapath.Queues) (string, error) {
	if err := w.fail(planner.OpPlugNIC); err != nil {
		return "", err
	}
	if slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && n.Index == index }) {
		return "", fmt.Errorf("device tapsync-net%d exists", index)
	}
	if w.orphaned[index] {
		return "", fmt.Errorf("netdev tapsync-netdev%d: %w", index, ErrIndexBurned)
	}
	if slices.ContainsFunc(w.nics, func(n NIC) bool { return bytes.Equal(n.MAC, mac) }) {
		w.twins = append(w.twins, fmt.Sprintf("NIC %d plugged with MAC %s beside %+v", index, mac, w.nics))
	}
	w.mutations++
	w.netdevs[index] = true
	path := fmt.Sprintf("%02x/00", 0x1e-index)
	w.nics = append(w.nics, NIC{ID: fmt.Sprintf("tapsync-net%d", index), Index: index, Owned: true, MAC: mac, PCIPath: path})
	if t, ok := w.taps[index]; ok {
		t.Attached = len(q.Tap)
	}
	return path, nil
}

func (w *world) UnplugNIC(_ context.Context, index int, _ bool) error {
	has := slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && n.Index == index })
	if has && w.hangUnplug {
		return fmt.Errorf("device tapsync-net%d: %w", index, ErrUnplugPending)
	}
	if has || (w.netdevs[index] && !w.orphaned[index]) {
		w.mutations++
	}
	w.nics = slices.DeleteFunc(w.nics, func(n NIC) bool { return n.Owned && n.Index == index })
	delete(w.plugSerial, fmt.Sprintf("tapsync-net%d", index))
	if w.orphaned[index] {
		return fmt.Errorf("netdev tapsync-netdev%d: %w", index, ErrIndexBurned)
	}
	delete(w.netdevs, index)
	if t, ok := w.taps[index]; ok {
		t.Attached = 0
	}
	return nil
}

// UnplugNICs records each batch (its requests, and whether it may wait)
// and unplugs NIC by NIC.
func (w *world) UnplugNICs(ctx context.Context, reqs []Unplug, wait bool) []error {
	w.unplugBatches = append(w.unplugBatches, unplugBatch{reqs: slices.Clone(reqs), wait: wait, saves: w.saves})
	errs := make([]error, len(reqs))
	for i, r := range reqs {
		if e, ok := w.rec.Endpoint(r.Index); ok && e.Removing && !e.UnplugRequested {
			w.unsafe = append(w.unsafe, fmt.Sprintf("unplug of NIC %d asked with no request on record", r.Index))
		}
		errs[i] = w.UnplugNIC(ctx, r.Index, wait)
	}
	return errs
}

func (w *world) RemoveRedirects(container, tap int) error {
	before := len(w.redirs)
	w.redirs = slices.DeleteFunc(w.redirs, func(r datapath.Redirect) bool {
		return r.Owned && ((tap > 0 && r.From == tap) ||
			(r.From == container && ((tap > 0 && r.To == tap) || !w.ifindexExists(r.To))))
	})
	if len(w.redirs) != before {
		w.mutations++
	}
	return nil
}

func (w *world) RemoveTap(index int) error {
	t, ok := w.taps[index]
	if !ok {
		return nil
	}
	if w.netdevs[index] || slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && n.Index == index }) {
		w.unsafe = append(w.unsafe, fmt.Sprintf("tap %s deleted while QEMU holds it", t.Name))
	}
	w.mutations++
	delete(w.taps, index)
	delete(w.limits, t.Ifindex)
	w.redirs = slices.DeleteFunc(w.redirs, func(r datapath.Redirect) bool { return r.From == t.Ifindex })
	return nil
}

func (w *world) linkIndex(ifindex int) int {
	return slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Ifindex == ifindex })
}

// EnsureMacvtap behaves as datapath's: the link takes HostMAC, tsm<N>
// exists with the guest MAC, the link's addresses go and the kernel takes
// its IPv4 routes with them.
func (w *world) EnsureMacvtap(_ context.Context, spec datapath.MacvtapSpec) (datapath.Macvtap, datapath.Moved, error) {
	if err := w.fail(planner.OpEnsureMacvtap); err != nil {
		return datapath.Macvtap{}, datapath.Moved{}, err
	}
	i := w.linkIndex(spec.Container)
	if i < 0 {
		return datapath.Macvtap{}, datapath.Moved{}, fmt.Errorf("container link %d: link not found", spec.Container)
	}
	l := &w.links[i]
	host := datapath.HostMAC(spec.MAC, spec.Index)
	switch {
	case bytes.Equal(l.MAC, host):
	case bytes.Equal(l.MAC, spec.MAC):
		w.mutations++
		l.MAC = host
	default:
		return datapath.Macvtap{}, datapath.Moved{}, fmt.Errorf("%w: link mac %s", datapath.ErrMacvtapMismatch, l.MAC)
	}
	m, ok := w.macvtaps[spec.Index]
	if !ok {
		w.nextIfindex++
		w.mutations++
		m = &datapath.Macvtap{Link: datapath.Link{Name: datapath.MacvtapName(spec.Index), Ifindex: w.nextIfindex, Kind: "macvtap",
			MAC: spec.MAC, MTU: spec.MTU, Parent: spec.Container}, Index: spec.Index, Mode: "bridge"}
		w.macvtaps[spec.Index] = m
	}
	if m.Parent != spec.Container || !bytes.Equal(m.MAC, spec.MAC) || m.Mode != "bridge" {
		return datapath.Macvtap{}, datapath.Moved{}, datapath.ErrMacvtapMismatch
	}
	if m.MTU != spec.MTU || !m.Up {
		w.mutations++
		m.MTU, m.Up = spec.MTU, true
	}
	moved := datapath.Moved{MAC: spec.MAC}
	if len(l.Addrs) > 0 {
		for _, a := range l.Addrs {
			moved.Addrs = append(moved.Addrs, datapath.MovedAddr{Prefix: a})
		}
		for _, r := range w.routes {
			if r.LinkIndex == l.Ifindex {
				moved.Routes = append(moved.Routes, movedRouteOf(r))
			}
		}
		if spec.Keep != nil {
			if err := spec.Keep(moved); err != nil {
				return datapath.Macvtap{}, datapath.Moved{}, err
			}
		}
		w.mutations++
		l.Addrs = nil
		idx := l.Ifindex
		w.routes = slices.DeleteFunc(w.routes, func(r datapath.Route) bool { return r.LinkIndex == idx && !r.IPv6 })
	}
	return *m, moved, nil
}

func (w *world) OpenMacvtapQueues(_ context.Context, spec datapath.MacvtapSpec, _ datapath.Vhost) (*datapath.Queues, error) {
	m, ok := w.macvtaps[spec.Index]
	if !ok || !bytes.Equal(m.MAC, spec.MAC) || m.Parent != spec.Container {
		return nil, fmt.Errorf("no macvtap %d as asked", spec.Index)
	}
	return &datapath.Queues{Tap: make([]*os.File, spec.Queues)}, nil
}

func (w *world) RemoveMacvtap(index int) error {
	m, ok := w.macvtaps[index]
	if !ok {
		return nil
	}
	if w.netdevs[index] || slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && n.Index == index }) {
		w.unsafe = append(w.unsafe, fmt.Sprintf("macvtap %s deleted while QEMU holds it", m.Name))
	}
	w.mutations++
	delete(w.macvtaps, index)
	delete(w.limits, m.Ifindex)
	return nil
}

func (w *world) RestoreContainerLink(ifindex int, m datapath.Moved) error {
	if err := w.fail(planner.OpRestoreLink); err != nil {
		return err
	}
	i := w.linkIndex(ifindex)
	if i < 0 {
		return fmt.Errorf("restore link %d: link not found", ifindex)
	}
	l := &w.links[i]
	if !bytes.Equal(l.MAC, m.MAC) {
		w.mutations++
		l.MAC = m.MAC
	}
	for _, a := range m.Addrs {
		if !slices.Contains(l.Addrs, a.Prefix) {
			w.mutations++
			l.Addrs = append(l.Addrs, a.Prefix)
		}
	}
	for _, mr := range m.Routes {
		r, ok := mr.Route()
		if ok && !slices.Contains(w.routes, r) {
			w.mutations++
			w.routes = append(w.routes, r)
		}
	}
	return nil
}

func (w *world) OpenTapLink(_ context.Context, name string, queues int, _ datapath.Vhost) (datapath.TapLink, *datapath.Queues, error) {
	i := slices.IndexFunc(w.links, func(l datapath.Link) bool { return l.Name == name && l.Kind == "tap" })
	if i < 0 {
		return datapath.TapLink{}, nil, fmt.Errorf("no tap link %s", name)
	}
	return datapath.TapLink{Link: w.links[i]}, &datapath.Queues{Tap: make([]*os.File, queues)}, nil
}

func (w *world) OpenMacvtapLinkQueues(_ context.Context, name string, queues int, _ datapath.Vhost) (*datapath.Queues, error) {
	if !slices.ContainsFunc(w.links, func(l datapath.Link) bool { return l.Name == name && l.Kind == "macvtap" }) {
		return nil, fmt.Errorf("no macvtap link %s", name)
	}
	return &datapath.Queues{Tap: make([]*os.File, queues)}, nil
}

func (w *world) EnsureRateLimit(ifindex int, bps uint64) error {
	if err := w.fail(planner.OpSetRateLimit); err != nil {
		return err
	}
	if bps == 0 {
		if _, ok := w.limits[ifindex]; ok {
			w.mutations++
			delete(w.limits, ifindex)
		}
		return nil
	}
	if !w.ifindexExists(ifindex) {
		return fmt.Errorf("rate limit on %d: link not found", ifindex)
	}
	if w.limits[ifindex] != bps/8*8 {
		w.mutations++
		w.limits[ifindex] = bps / 8 * 8
	}
	return nil
}

func (w *world) EnsureIngressLimit(ifindex, index int, bps uint64) error {
	if err := w.fail(planner.OpSetRateLimit); err != nil {
		return err
	}
	if bps == 0 {
		if _, ok := w.ifbs[index]; ok {
			w.mutations++
			delete(w.ifbs, index)
		}
		return nil
	}
	if !w.ifindexExists(ifindex) {
		return fmt.Errorf("ingress limit on %d: link not found", ifindex)
	}
	if f := (fakeIfb{from: ifindex, bps: bps / 8 * 8}); w.ifbs[index] != f {
		w.mutations++
		w.ifbs[index] = f
	}
	return nil
}

func (w *world) Save(r state.Record) error {
	w.saves++
	w.rec = r.Clone()
	return nil
}

func (w *world) env() Env {
	return Env{Host: w, VM: w, Guest: w.guest, Recorder: w, Vhost: datapath.VhostOff, GuestLinkWait: 200 * time.Millisecond,
		Refresh: func(_ context.Context, parts datapath.Parts) (Observed, error) {
			o := w.observed()
			fresh := Observed{Links: o.Links}
			if parts.Routes {
				fresh.Routes = o.Routes
			}
			if parts.Neighbors {
				fresh.Neighbors = o.Neighbors
			}
			return fresh, nil
		}}
}

// teardown runs the teardown plan once against w; vmGone also empties
// QEMU, as its exit does.
func (w *world) teardown(vmGone bool) (Plan, Outcome, error) {
	if vmGone {
		w.nics, w.netdevs = nil, map[int]bool{}
		for _, t := range w.taps {
			t.Attached = 0
		}
	}
	p := ComputeTeardown(w.observed(), w.rec, vmGone)
	env := w.env()
	if vmGone {
		env.VM = nil // a plan for a gone QEMU must not ask it anything
	}
	_, out, err := Apply(context.Background(), p, w.rec, w.observed(), env)
	return p, out, err
}

// options adds the world's sandbox settings to opts.
func (w *world) options(opts Options) Options {
	opts.Model, opts.RxRate, opts.TxRate = w.model, w.rxRate, w.txRate
	return opts
}

// reconcile runs observe → plan → apply once against w, dropping first
// what the events noted since the last pass void, as the reconciler does.
func (w *world) reconcile(opts Options) (Plan, Outcome, error) {
	opts = w.options(opts)
	if len(w.events) > 0 {
		dropGuestBeliefs(&w.rec, w.events)
		w.events = nil
	}
	p := w.plan(opts)
	_, out, err := Apply(context.Background(), p, w.rec, w.observed(), w.env())
	if out.GuestFailed {
		w.noteGuest(causeAgentFailed) // the reconciler drops the connection
	}
	return p, out, err
}

// settled reports whether p has nothing left to do but retry removals
// that the guest keeps pending (an unplug and the steps behind it), and
// the plugs held behind them.
func (w *world) settled(p Plan) bool {
	unplugs := func(n int) bool {
		return slices.ContainsFunc(p.Actions, func(b Action) bool { return b.Op == planner.OpUnplugNIC && b.Endpoint.Index == n })
	}
	pending := func(a Action) bool {
		return w.hangUnplug && (unplugs(a.Endpoint.Index) || slices.ContainsFunc(a.AwaitUnplug, unplugs))
	}
	return !slices.ContainsFunc(p.Actions, func(a Action) bool { return !pending(a) })
}

// converge reconciles until the plan is settled, at most a few rounds.
func (w *world) converge(opts Options) error {
	for range 4 {
		p, _, err := w.reconcile(opts)
		if err != nil {
			return err
		}
		if w.settled(p) {
			return nil
		}
	}
	return fmt.Errorf("no convergence; last plan:\n%s", w.plan(w.options(opts)))
}

// checkConverged says what is wrong with w as a converged sandbox: every
// wireable, non-adopted link has exactly one complete endpoint, and
// nothing of ours exists beyond those (and pending removals).
func (w *world) checkConverged(queues int) []string {
	var bad []string
	live := map[int]bool{}
	obs := w.observed()
	for _, l := range w.links {
		if r, _ := planner.Unwireable(obs, l); r != "" {
			continue
		}
		if slices.ContainsFunc(w.nics, func(n NIC) bool { return !n.Owned && bytes.Equal(n.MAC, l.MAC) }) ||
			slices.ContainsFunc(w.kata, func(k datapath.Link) bool { return k.Parent == l.Ifindex }) {
			continue // adopted
		}
		var eps []state.Endpoint
		for _, e := range w.rec.Endpoints {
			if !e.Removing && planner.SameLink(e, l) {
				eps = append(eps, e)
			}
		}
		if len(eps) != 1 {
			if w.hangUnplug && slices.ContainsFunc(w.rec.Endpoints, func(e state.Endpoint) bool {
				return e.Removing && e.Kind == state.KindMacvtap && e.LinkIfindex == l.Ifindex
			}) {
				continue // waits for the guest to let its old macvtap NIC go
			}
			bad = append(bad, fmt.Sprintf("link %s has %d endpoints", l.Name, len(eps)))
			continue
		}
		e := eps[0]
		live[e.Index] = true
		bad = append(bad, w.checkLimits(e, l)...)
		if e.Kind != state.KindTap {
			bad = append(bad, w.checkEndpoint(e, l)...)
			continue
		}
		t, ok := w.taps[e.Index]
		switch {
		case !ok:
			bad = append(bad, fmt.Sprintf("%s: no tap %d", l.Name, e.Index))
			continue
		case t.MTU != l.MTU || (t.Attached != queues && !w.hangUnplug) || t.MultiQueue != (queues > 1):
			bad = append(bad, fmt.Sprintf("%s: tap %+v", l.Name, *t))
		}
		for _, pair := range [][2]int{{l.Ifindex, t.Ifindex}, {t.Ifindex, l.Ifindex}} {
			if !slices.ContainsFunc(w.redirs, func(r datapath.Redirect) bool { return r.Owned && r.From == pair[0] && r.To == pair[1] }) {
				bad = append(bad, fmt.Sprintf("%s: no redirect %d→%d", l.Name, pair[0], pair[1]))
			}
		}
		if !slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && n.Index == e.Index && bytes.Equal(n.MAC, l.MAC) }) &&
			!(w.hangUnplug && slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && bytes.Equal(n.MAC, l.MAC) })) {
			// (A plug held behind a pending unplug of the same MAC is right.)
			bad = append(bad, fmt.Sprintf("%s: no NIC %d", l.Name, e.Index))
		}
	}
	pending := map[int]bool{}
	for _, e := range w.rec.Endpoints {
		if e.Removing {
			pending[e.Index] = true
		} else if !live[e.Index] {
			bad = append(bad, fmt.Sprintf("record has stale endpoint %+v", e))
		}
	}
	for _, n := range w.nics {
		if n.Owned && !live[n.Index] && !pending[n.Index] {
			bad = append(bad, "leaked NIC "+n.ID)
		}
	}
	for n := range w.netdevs {
		if !live[n] && !pending[n] {
			bad = append(bad, fmt.Sprintf("leaked netdev %d", n))
		}
	}
	for n, t := range w.taps {
		if t.Persistent && !live[n] && !pending[n] {
			bad = append(bad, "leaked tap "+t.Name)
		}
	}
	for n, m := range w.macvtaps {
		if !live[n] && !pending[n] {
			bad = append(bad, "leaked macvtap "+m.Name)
		}
	}
	bad = append(bad, w.checkRestored(live, pending)...)
	for _, r := range w.redirs {
		// A pending removal's tap keeps its filter until QEMU lets go.
		fromPending := slices.ContainsFunc(slices.Collect(mapValues(w.taps)), func(t *datapath.Tap) bool {
			return t.Ifindex == r.From && pending[t.Index]
		})
		if r.Owned && !w.ifindexExists(r.To) && !fromPending {
			bad = append(bad, fmt.Sprintf("dangling redirect %+v", r))
		}
	}
	bad = append(bad, w.twins...)
	bad = append(bad, w.unsafe...)
	if w.guestOn {
		bad = append(bad, w.guest.check()...)
	}
	if p := w.plan(w.options(Options{Queues: queues, Guest: w.guestOn})); !w.settled(p) {
		bad = append(bad, "converged sandbox still plans:\n"+p.String())
	}
	return bad
}

func joinLines(s []string) string { return strings.Join(s, "\n") }

// checkEndpoint checks a live endpoint of a kind other than the tcfilter tap.
func (w *world) checkEndpoint(e state.Endpoint, l datapath.Link) []string {
	var bad []string
	mac := l.MAC
	if e.Kind == state.KindMacvtap {
		mac = planner.GuestMAC(e)
		m, ok := w.macvtaps[e.Index]
		switch {
		case !ok:
			bad = append(bad, fmt.Sprintf("%s: no macvtap %d", l.Name, e.Index))
		case m.Parent != l.Ifindex || !bytes.Equal(m.MAC, mac) || m.MTU != l.MTU || !m.Up:
			bad = append(bad, fmt.Sprintf("%s: macvtap %+v", l.Name, *m))
		}
		if !bytes.Equal(l.MAC, datapath.HostMAC(mac, e.Index)) {
			bad = append(bad, fmt.Sprintf("%s: carries %s, not the host MAC", l.Name, l.MAC))
		}
		if len(l.Addrs) > 0 {
			bad = append(bad, fmt.Sprintf("%s: still has addresses %v", l.Name, l.Addrs))
		}
		o := w.orig[l.Ifindex]
		for _, a := range o.addrs {
			if !slices.Contains(planner.MovedAddrs(e), a) {
				bad = append(bad, fmt.Sprintf("%s: address %s moved away but not recorded", l.Name, a))
			}
		}
	}
	if !slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && n.Index == e.Index && bytes.Equal(n.MAC, mac) }) &&
		!(w.hangUnplug && slices.ContainsFunc(w.nics, func(n NIC) bool { return n.Owned && bytes.Equal(n.MAC, mac) })) {
		bad = append(bad, fmt.Sprintf("%s: no NIC %d", l.Name, e.Index))
	}
	return bad
}

// checkLimits checks a live endpoint's rate limits.
func (w *world) checkLimits(e state.Endpoint, l datapath.Link) []string {
	var bad []string
	rx, tx := planner.RateSites(e)
	rate := map[planner.RateSite]uint64{rx: w.rxRate, tx: w.txRate}
	egress, ingress := rate[planner.SiteLinkEgress], rate[planner.SiteLinkIngress]
	applied := func(bps uint64) uint64 { return bps / 8 * 8 } // as EnsureRateLimit keeps it
	if w.limits[l.Ifindex] != applied(egress) {
		bad = append(bad, fmt.Sprintf("%s: limit %d, want %d", l.Name, w.limits[l.Ifindex], egress))
	}
	f, ok := w.ifbs[e.Index]
	switch {
	case ingress == 0 && ok:
		bad = append(bad, fmt.Sprintf("%s: ifb %s left (%+v)", l.Name, datapath.IfbName(e.Index), f))
	case ingress > 0 && (f.from != l.Ifindex || f.bps != applied(ingress)):
		bad = append(bad, fmt.Sprintf("%s: ingress limit %+v, want %d", l.Name, f, ingress))
	}
	if t, ok := w.taps[e.Index]; ok && rx == planner.SiteTapEgress && w.limits[t.Ifindex] != applied(w.rxRate) {
		bad = append(bad, fmt.Sprintf("%s: limit %d, want %d", t.Name, w.limits[t.Ifindex], w.rxRate))
	}
	return bad
}

// checkRestored checks that every container link no live macvtap
// endpoint holds is as it was made: MAC, addresses, routes; and that no
// limit of ours is left where no endpoint wants it.
func (w *world) checkRestored(live, pending map[int]bool) []string {
	var bad []string
	held := map[int]bool{}
	for _, e := range w.rec.Endpoints {
		if e.Kind == state.KindMacvtap && (live[e.Index] || pending[e.Index]) {
			held[e.LinkIfindex] = true
		}
	}
	wanted := map[int]bool{}
	for _, e := range w.rec.Endpoints {
		if live[e.Index] {
			wanted[e.LinkIfindex] = true
			if t, ok := w.taps[e.Index]; ok {
				wanted[t.Ifindex] = true
			}
		}
	}
	for _, l := range w.links {
		if held[l.Ifindex] {
			continue
		}
		o := w.orig[l.Ifindex]
		if !bytes.Equal(l.MAC, o.mac) {
			bad = append(bad, fmt.Sprintf("%s: MAC %s, was made with %s", l.Name, l.MAC, o.mac))
		}
		for _, a := range o.addrs {
			if !slices.Contains(l.Addrs, a) {
				bad = append(bad, fmt.Sprintf("%s: lost address %s", l.Name, a))
			}
		}
		for _, r := range o.routes {
			if !slices.Contains(w.routes, r) {
				bad = append(bad, fmt.Sprintf("%s: lost route %s", l.Name, r))
			}
		}
		if w.limits[l.Ifindex] > 0 && !wanted[l.Ifindex] {
			bad = append(bad, fmt.Sprintf("%s: limit %d left behind", l.Name, w.limits[l.Ifindex]))
		}
	}
	for n, f := range w.ifbs {
		// A removal the guest holds up holds up its endpoint's other
		// steps: its ifb goes once the NIC has.
		if !live[n] && !pending[n] {
			bad = append(bad, fmt.Sprintf("ifb %s (%+v) left behind", datapath.IfbName(n), f))
		}
	}
	return bad
}

// fakeGuest is the VM's guest as its agent sees it, kept the way a guest
// kernel keeps it: each plug of a virtio-net device of the world is a
// netdevice of its own (named ethN, down and unconfigured until the agent
// is told otherwise), and routes and neighbours belong to a netdevice:
// they leave with it, and with it going down. The agent takes an up link
// down to configure it, as Kata's does. A reboot forgets everything.
type fakeGuest struct {
	w       *world
	devs    []*guestDev // the guest's netdevices, oldest first
	routes  []agent.Route
	neigh   []agent.Neighbor
	calls   map[string]int // guest-changing calls
	next    int
	slow    int  // the next UpdateInterface calls find no link
	noNeigh bool // AddARPNeighbors is unimplemented
	// halfway: the next UpdateInterface takes its link down, then fails
	// (an agent that timed out in the middle of the call).
	halfway bool
	// replyLost: the next UpdateInterface does all its work, then its
	// answer is lost (a timeout).
	replyLost bool
}

// guestDev is one netdevice of the guest: the plug of a world NIC it is
// (plugKey), and its configuration.
type guestDev struct {
	plug  string
	iface agent.Interface
	up    bool
}

func (g *fakeGuest) clone(w *world) *fakeGuest {
	c := *g
	c.w = w
	c.devs = nil
	for _, d := range g.devs {
		dd := *d
		c.devs = append(c.devs, &dd)
	}
	c.routes = slices.Clone(g.routes)
	c.neigh = slices.Clone(g.neigh)
	c.calls = maps.Clone(g.calls)
	return &c
}

// plugKey names one plug of a world NIC: a NIC unplugged and plugged
// again, even with the same id and MAC, is another device to the guest.
func (w *world) plugKey(n NIC) string {
	id := nicID(n)
	if w.plugSerial == nil {
		w.plugSerial = map[string]int{}
	}
	if _, ok := w.plugSerial[id]; !ok {
		w.plugs++
		w.plugSerial[id] = w.plugs
	}
	return fmt.Sprintf("%s#%d", id, w.plugSerial[id])
}

// nicID tells a world NIC from the others: its device id, or for a
// device without one (the runtime's) its MAC.
func nicID(n NIC) string {
	if n.ID != "" {
		return n.ID
	}
	return "mac " + n.MAC.String()
}

// sync makes the guest's netdevices follow the VM's devices.
func (g *fakeGuest) sync() {
	for id := range g.w.plugSerial {
		if !slices.ContainsFunc(g.w.nics, func(n NIC) bool { return nicID(n) == id }) {
			delete(g.w.plugSerial, id)
		}
	}
	present := map[string]bool{}
	for _, n := range g.w.nics {
		k := g.w.plugKey(n)
		present[k] = true
		if !slices.ContainsFunc(g.devs, func(d *guestDev) bool { return d.plug == k }) {
			g.devs = append(g.devs, &guestDev{plug: k, iface: agent.Interface{Name: fmt.Sprintf("eth%d", g.next), MAC: n.MAC, MTU: 1500}})
			g.next++
		}
	}
	g.devs = slices.DeleteFunc(g.devs, func(d *guestDev) bool {
		if present[d.plug] {
			return false
		}
		g.flushDevice(d.iface.Name)
		return true
	})
}

// flushDevice drops the routes and neighbours through a device, as the
// kernel does when the device goes down or away.
func (g *fakeGuest) flushDevice(name string) {
	g.routes = slices.DeleteFunc(g.routes, func(r agent.Route) bool { return r.Device == name })
	g.neigh = slices.DeleteFunc(g.neigh, func(n agent.Neighbor) bool { return n.Device == name })
}

// dev is the guest's netdevice with mac, nil if none.
func (g *fakeGuest) dev(mac net.HardwareAddr) *guestDev {
	g.sync()
	i := slices.IndexFunc(g.devs, func(d *guestDev) bool { return bytes.Equal(d.iface.MAC, mac) })
	if i < 0 {
		return nil
	}
	return g.devs[i]
}

// iface is the guest interface with mac, nil if none.
func (g *fakeGuest) iface(mac net.HardwareAddr) *agent.Interface {
	if d := g.dev(mac); d != nil {
		return &d.iface
	}
	return nil
}

// reboot restarts the guest: every device comes back unconfigured and
// down, with no routes and no neighbours; the agent remembers nothing.
func (g *fakeGuest) reboot() {
	g.devs, g.routes, g.neigh, g.next = nil, nil, nil, 0
	g.sync()
}

// flushAddrs removes the addresses of the guest interface name, as a
// workload's `ip addr flush` does; with its last IPv4 address the kernel
// drops the routes and neighbours through it.
func (g *fakeGuest) flushAddrs(name string) {
	g.sync()
	for _, d := range g.devs {
		if d.iface.Name == name {
			d.iface.Addrs = nil
			g.flushDevice(name)
		}
	}
}

func (g *fakeGuest) state() GuestState {
	g.sync()
	var s GuestState
	for _, d := range g.devs {
		s.Interfaces = append(s.Interfaces, d.iface)
	}
	s.Routes = slices.Clone(g.routes)
	return s
}

func (g *fakeGuest) ListInterfaces(context.Context) ([]agent.Interface, error) {
	return g.state().Interfaces, nil
}

func (g *fakeGuest) ListRoutes(context.Context) ([]agent.Route, error) { return g.state().Routes, nil }

func (g *fakeGuest) UpdateInterface(_ context.Context, want agent.Interface) (agent.Interface, error) {
	g.sync()
	g.calls["UpdateInterface"]++
	if err := g.w.fail(planner.OpConfigureGuest); err != nil {
		return agent.Interface{}, err
	}
	d := g.dev(want.MAC)
	if g.slow > 0 || d == nil {
		g.slow = max(g.slow-1, 0)
		return agent.Interface{}, fmt.Errorf("link with MAC %s: %w", want.MAC, agent.ErrLinkNotFound)
	}
	g.w.mutations++
	if d.up {
		// Kata's agent sets an up link down before it configures it.
		d.up = false
		g.flushDevice(d.iface.Name)
	}
	if g.halfway {
		g.halfway = false
		return agent.Interface{}, fmt.Errorf("UpdateInterface %s: no answer within 5s: %w", want.MAC, context.DeadlineExceeded)
	}
	d.iface = want
	d.iface.DevicePath = ""
	d.up = true
	if g.replyLost {
		g.replyLost = false
		return agent.Interface{}, fmt.Errorf("UpdateInterface %s: no answer within 5s: %w", want.MAC, context.DeadlineExceeded)
	}
	return d.iface, nil
}

func (g *fakeGuest) UpdateRoutes(_ context.Context, rs []agent.Route) ([]agent.Route, error) {
	g.sync()
	g.calls["UpdateRoutes"]++
	for _, r := range rs {
		if !slices.ContainsFunc(g.devs, func(d *guestDev) bool { return d.iface.Name == r.Device && d.up }) {
			return nil, fmt.Errorf("route %s: no device %s up", r, r.Device)
		}
	}
	g.w.mutations++
	for _, r := range rs { // add or replace, as agents since 3.15 do
		g.routes = slices.DeleteFunc(g.routes, func(h agent.Route) bool { return sameAgentRoute(h, r) })
		g.routes = append(g.routes, r)
	}
	return slices.Clone(g.routes), nil
}

func (g *fakeGuest) AddARPNeighbors(_ context.Context, ns []agent.Neighbor) error {
	g.sync()
	g.calls["AddARPNeighbors"]++
	if g.noNeigh {
		return errUnimplemented
	}
	for _, n := range ns {
		if !slices.ContainsFunc(g.devs, func(d *guestDev) bool { return d.iface.Name == n.Device }) {
			return fmt.Errorf("neighbour %s: no device %s", n.IP, n.Device)
		}
	}
	g.w.mutations++
	for _, n := range ns { // replace, as `ip neigh replace`
		g.neigh = slices.DeleteFunc(g.neigh, func(h agent.Neighbor) bool { return h.Device == n.Device && h.IP == n.IP })
		g.neigh = append(g.neigh, n)
	}
	return nil
}

// check says how the guest differs from the netns: each wired link's
// interface (name, addresses, MTU), every route on a wired link with all
// its attributes, and every permanent neighbour on one.
func (g *fakeGuest) check() []string {
	g.sync()
	var bad []string
	wiredNames := map[int]string{}
	routes := slices.Clone(g.w.routes)
	obs := g.w.observed()
	for _, l := range g.w.links {
		for _, e := range g.w.rec.Endpoints {
			if !e.Removing && e.Kind == state.KindMacvtap && planner.SameLink(e, l) {
				l = planner.GuestLink(e, l) // the guest has what the link lent
				routes = append(routes, planner.MovedRoutes(e)...)
			}
		}
		i := g.iface(l.MAC)
		if r, _ := planner.Unwireable(obs, l); r != "" || i == nil {
			continue
		}
		wiredNames[l.Ifindex] = l.Name
		want := planner.DesiredInterface(l)
		if !sameGuestInterface(*i, want) {
			bad = append(bad, fmt.Sprintf("guest interface %+v, want %+v", *i, want))
		}
	}
	for _, r := range routes {
		name, ok := wiredNames[r.LinkIndex]
		if !ok || (r.Dst.IsValid() && (r.Dst.Addr().IsLinkLocalUnicast() || r.Dst.Addr().IsMulticast())) {
			continue
		}
		want := guestRoute(r, name)
		if !slices.Contains(g.routes, want) {
			bad = append(bad, fmt.Sprintf("guest lacks route %s (%+v)", want, want))
		}
	}
	for _, n := range g.w.neighbors {
		name, ok := wiredNames[n.LinkIndex]
		if !ok || g.noNeigh {
			continue
		}
		if !slices.ContainsFunc(g.neigh, func(h agent.Neighbor) bool { return h.Device == name && h.IP == n.IP && bytes.Equal(h.MAC, n.MAC) }) {
			bad = append(bad, fmt.Sprintf("guest lacks neighbour %s lladdr %s dev %s", n.IP, n.MAC, name))
		}
	}
	return bad
}

// guestRoute is netns route r as the guest has it through device dev.
func guestRoute(r datapath.Route, dev string) agent.Route {
	return agent.Route{Dest: r.Dst, Gateway: r.Gateway, Device: dev, Source: r.Src, Scope: r.Scope, IPv6: r.IPv6, MTU: r.MTU}
}

// sameAgentRoute reports whether a and b are one route to the agent, which
// replaces a route of the same destination, gateway and device.
func sameAgentRoute(a, b agent.Route) bool {
	return a.Dest.Masked() == b.Dest.Masked() && a.IPv6 == b.IPv6 && a.Gateway == b.Gateway && a.Device == b.Device
}

// sameGuestInterface reports whether the guest's interface have is want:
// name, MAC, MTU, NOARP and addresses.
func sameGuestInterface(have, want agent.Interface) bool {
	return have.Name == want.Name && bytes.Equal(have.MAC, want.MAC) && have.MTU == want.MTU && have.NoARP == want.NoARP &&
		slices.Equal(have.Addrs, want.Addrs)
}
