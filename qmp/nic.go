package qmp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// QOM containers of user-created devices: with an id, and without one
// (device[0], device[1], ...; Kata cold-plugs its NICs without ids).
const (
	peripheral     = "/machine/peripheral"
	peripheralAnon = "/machine/peripheral-anon"
)

var (
	// ErrRemovalPending is wrapped by RemoveNIC when the guest did not
	// acknowledge the unplug within the wait. The device and its netdev
	// stay; QEMU completes the removal (DEVICE_DELETED) whenever the guest
	// acknowledges, or at the next guest reset. Call RemoveNIC again later.
	ErrRemovalPending = errors.New("device removal pending: the guest has not acknowledged the unplug")

	// ErrNetdevOrphaned is wrapped by AddNIC when the netdev id of the
	// endpoint is held by a leftover of a failed netdev_add, which QEMU 7.2
	// cannot delete ("is not a netdev"). The endpoint index cannot be used
	// again in this VM until it restarts; pick another index.
	ErrNetdevOrphaned = errors.New("netdev id held by a leftover of a failed netdev_add that QEMU cannot delete")
)

// NIC is a guest NIC to hot-plug for endpoint Index.
type NIC struct {
	Index    int
	MAC      net.HardwareAddr
	TapFDs   []*os.File // one per queue: fds of one tap (multiqueue when more than one)
	VhostFDs []*os.File // empty, or one /dev/vhost-net fd per queue
	// MTU, when set, is offered to the guest driver at the device
	// (host_mtu, VIRTIO_NET_F_MTU), so the guest NIC starts at the
	// container link's MTU even before the agent configures it.
	MTU int
	// Placement says where the NIC may be hot-plugged; the zero value is
	// HotplugBridge: PCI bridge slots (and pc's pci.0), never a root port.
	Placement Placement
	// At, when set, is the caller's word, from its own up-to-date model of
	// the VM, that neither the device id nor the netdev id of Index exists
	// and that the place is free: AddNIC then asks QEMU nothing and sends
	// only getfd, netdev_add and device_add. Should the word be wrong,
	// QEMU refuses and AddNIC rolls back as usual; the caller's model is
	// then stale.
	At *Place
}

// NICInfo is a virtio-net device as QEMU reports it.
type NICInfo struct {
	ID      string // qdev id; "" for devices created without one
	Index   int    // endpoint index when Owned, else -1
	Owned   bool   // ID was made by DeviceID
	MAC     net.HardwareAddr
	Netdev  string // backend id; "" when none
	Bus     string // bus name: a port's or bridge's qdev id, pcie.0, pci.0
	Addr    string // "slot.fn" in hex as QEMU spells addr=, e.g. "00.0", "1f.2"
	QOMPath string // e.g. /machine/peripheral/tapsync-net3; "" for a device without id
	PCIPath string // the device's slots from the root bus, as the Kata agent's devicePath takes them ("02/1f"); "" when unknown
}

// AddNIC hot-plugs a virtio-net-pci device backed by the given tap fds:
//
//	getfd (one per tap fd, then per vhost fd) → netdev_add type=tap fds=a:b → device_add virtio-net-pci
//
// Over HMP the same commands go as HMP command lines, each value checked
// before the first is sent.
//
// AddNIC takes ownership of every file in nic, on success and on failure:
// they are closed before it returns (QEMU holds its own copies).
//
// It is idempotent: when the device exists with the same MAC, its info is
// returned unchanged; a netdev left without its device (a crash between
// netdev_add and device_add) is deleted and made again. On failure whatever
// this call added is removed again, and the error names both what failed
// and what could not be rolled back.
func (c *Client) AddNIC(ctx context.Context, nic NIC) (_ NICInfo, err error) {
	defer closeFiles(nic.TapFDs, nic.VhostFDs)
	id, netdev := DeviceID(nic.Index), NetdevID(nic.Index)
	defer func() {
		if err != nil {
			err = fmt.Errorf("add %s to VM at %s: %w", id, c.path, err)
		}
	}()
	if err := nic.validate(); err != nil {
		return NICInfo{}, err
	}

	select {
	case c.addSem <- struct{}{}:
		defer func() { <-c.addSem }()
	case <-ctx.Done():
		return NICInfo{}, ctx.Err()
	case <-c.gone.Done():
		return NICInfo{}, c.Err()
	}

	qomPath := peripheral + "/" + id
	var place placement
	if nic.At != nil {
		place = nic.At.placement()
	} else {
		var existing *NICInfo
		if place, existing, err = c.lookBeforeAdd(ctx, nic, id, netdev); err != nil || existing != nil {
			if existing == nil {
				return NICInfo{}, err
			}
			return *existing, err
		}
	}

	var fds, vhostFDs []string // names in QEMU's fd table (getfd)
	for q := range nic.TapFDs {
		fds = append(fds, fdName(nic.Index, q))
	}
	for q := range nic.VhostFDs {
		vhostFDs = append(vhostFDs, vhostFDName(nic.Index, q))
	}

	// Equivalent to: netdev_add tap,id=tapsync-netdev3,fds=tapsync-fd3-0:tapsync-fd3-1[,vhost=on,vhostfds=...]
	// QEMU consumes the named fds: they leave the monitor's fd table.
	netdevArgs := map[string]any{"type": "tap", "id": netdev, "fds": strings.Join(fds, ":")}
	if len(vhostFDs) > 0 {
		netdevArgs["vhost"] = true
		netdevArgs["vhostfds"] = strings.Join(vhostFDs, ":")
	}

	// Equivalent to: device_add virtio-net-pci,id=tapsync-net3,netdev=tapsync-netdev3,mac=...,bus=rp1,romfile=[,mq=on,vectors=2q+2]
	// romfile="": no option ROM is needed for a hot-plugged NIC, and the
	// ROM file may not be installed.
	queues := len(nic.TapFDs)
	devArgs := map[string]any{
		"driver":  "virtio-net-pci",
		"id":      id,
		"netdev":  netdev,
		"mac":     nic.MAC.String(),
		"bus":     place.bus,
		"romfile": "",
	}
	if place.addr != "" {
		devArgs["addr"] = place.addr
	}
	if nic.MTU > 0 {
		devArgs["host_mtu"] = nic.MTU
	}
	if queues > 1 {
		// One MSI-X vector per rx and tx queue, one for config, one for control.
		devArgs["mq"] = true
		devArgs["vectors"] = 2*queues + 2
	}
	// Over HMP a value that cannot go on a command line (a caller's
	// NIC.At naming a bus "a,b") is refused before the first command.
	if err := errors.Join(c.checkHMP("netdev_add", netdevArgs), c.checkHMP("device_add", devArgs)); err != nil {
		return NICInfo{}, err
	}

	// From here on, undo on failure.
	var sent []string // fd names passed with getfd
	netdevTried := false
	defer func() {
		if err != nil {
			err = errors.Join(err, c.rollbackAdd(ctx, netdev, netdevTried, sent))
		}
	}()

	for q, f := range nic.TapFDs {
		sent = append(sent, fds[q])
		if err := c.getFD(ctx, fds[q], f); err != nil {
			return NICInfo{}, err
		}
	}
	for q, f := range nic.VhostFDs {
		sent = append(sent, vhostFDs[q])
		if err := c.getFD(ctx, vhostFDs[q], f); err != nil {
			return NICInfo{}, err
		}
	}

	netdevTried = true
	if _, err := c.run(ctx, "netdev_add", "id="+netdev, netdevArgs, nil); err != nil {
		return NICInfo{}, err
	}

	if _, err := c.run(ctx, "device_add", "id="+id, devArgs, nil); err != nil {
		return NICInfo{}, err
	}
	c.unplugs.forget(id) // a new device: no unplug asked of it yet
	pciPath := PCIPath(place.path)
	if nic.At != nil {
		pciPath = nic.At.PCIPath
	}

	return NICInfo{
		ID:      id,
		Index:   nic.Index,
		Owned:   true,
		MAC:     slices.Clone(nic.MAC),
		Netdev:  netdev,
		Bus:     place.bus,
		Addr:    fmt.Sprintf("%02x.0", place.slot),
		QOMPath: qomPath,
		PCIPath: pciPath,
	}, nil
}

// lookBeforeAdd makes AddNIC idempotent without a caller's model: it
// returns the device when it exists already (with the same MAC), deletes a
// netdev left without its device, and picks a place.
//
// Equivalent to: ReadVM (HMP info qtree, info network).
func (c *Client) lookBeforeAdd(ctx context.Context, nic NIC, id, netdev string) (placement, *NICInfo, error) {
	vm, err := c.ReadVM(ctx)
	if err != nil {
		return placement{}, nil, err
	}
	// Made already, perhaps by a run that crashed before recording it?
	if i := slices.IndexFunc(vm.NICs, func(n NICInfo) bool { return n.ID == id }); i >= 0 {
		info := vm.NICs[i]
		if !bytes.Equal(info.MAC, nic.MAC) {
			return placement{}, nil, fmt.Errorf("device exists with MAC %s, not %s: remove it first", info.MAC, nic.MAC)
		}
		return placement{}, &info, nil
	}
	// Any other device with our id makes device_add fail below.

	if slices.Contains(vm.Netdevs, netdev) {
		// Half-made: the netdev without its device.
		if err := c.delNetdev(ctx, netdev); err != nil {
			return placement{}, nil, err
		}
	}

	// The error names the VM (AddNIC's wrapping) and, for ErrNoFreeSlot,
	// every bus looked at and the policy.
	place, err := vm.Topology.choose(nic.Placement)
	return place, nil, err
}

func (nic NIC) validate() error {
	switch {
	case nic.Index < 0:
		return fmt.Errorf("endpoint index %d is negative", nic.Index)
	case len(nic.MAC) != 6:
		return fmt.Errorf("MAC %q is not 6 bytes", nic.MAC.String())
	case len(nic.TapFDs) == 0:
		return errors.New("no tap fds")
	case len(nic.VhostFDs) != 0 && len(nic.VhostFDs) != len(nic.TapFDs):
		return fmt.Errorf("%d vhost fds for %d tap fds: want none or one per queue", len(nic.VhostFDs), len(nic.TapFDs))
	}
	if err := nic.Placement.Validate(); err != nil {
		return err
	}
	for _, f := range append(slices.Clone(nic.TapFDs), nic.VhostFDs...) {
		if f == nil {
			return errors.New("nil file among the fds")
		}
	}
	return checkTapFDs(nic.TapFDs)
}

// checkTapFDs makes sure the fds are queues of one tap (by name: taps of
// the same name in two netns are not told apart) before QEMU sees them. QEMU 7.2 sets netdev queues up one by one and does not undo the
// earlier ones when a later one fails: a bad fd past the first would leave a
// netdev that cannot be deleted (see ErrNetdevOrphaned).
func checkTapFDs(files []*os.File) error {
	var first string
	for q, f := range files {
		name, flags, err := tunGetIff(f)
		if err != nil {
			return fmt.Errorf("tap fd %d (%s) is not a tap queue: %w", q, f.Name(), err)
		}
		switch {
		case flags&unix.IFF_TAP == 0:
			return fmt.Errorf("fd %d (%s) is a tun device %s, not a tap", q, f.Name(), name)
		case q == 0:
			first = name
		case name != first:
			return fmt.Errorf("tap fds belong to different devices: %s and %s", first, name)
		case flags&unix.IFF_MULTI_QUEUE == 0:
			return fmt.Errorf("%d fds for tap %s, which is not multiqueue", len(files), name)
		}
	}
	return nil
}

// tunGetIff is the TUNGETIFF ioctl: the attached device's name and flags.
func tunGetIff(f *os.File) (string, uint16, error) {
	conn, err := f.SyscallConn()
	if err != nil {
		return "", 0, err
	}
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return "", 0, err
	}
	var ioctlErr error
	if err := conn.Control(func(fd uintptr) {
		ioctlErr = unix.IoctlIfreq(int(fd), unix.TUNGETIFF, ifr)
	}); err != nil {
		return "", 0, err
	}
	if ioctlErr != nil {
		return "", 0, fmt.Errorf("TUNGETIFF: %w", ioctlErr)
	}
	return ifr.Name(), ifr.Uint16(), nil
}

// Equivalent to: {"execute": "getfd", "arguments": {"fdname": name}} with f in SCM_RIGHTS.
// A name already in the table is replaced (QEMU closes the old fd).
func (c *Client) getFD(ctx context.Context, name string, f *os.File) error {
	_, err := c.run(ctx, "getfd", "fdname="+name, map[string]any{"fdname": name}, f)
	return err
}

// rollbackAdd undoes a failed AddNIC. It runs even when ctx is done (each
// command still has the client's timeout).
func (c *Client) rollbackAdd(ctx context.Context, netdev string, netdevTried bool, fdNames []string) error {
	ctx = context.WithoutCancel(ctx)
	var errs []error
	if netdevTried {
		// Also after a failed netdev_add: it may have set up some queues.
		if err := c.delNetdev(ctx, netdev); err != nil {
			errs = append(errs, fmt.Errorf("rollback: %w", err))
		}
	}
	for _, name := range fdNames {
		// Names consumed by netdev_add are gone already: not found is expected.
		_, _ = c.run(ctx, "closefd", "fdname="+name, map[string]any{"fdname": name}, nil)
	}
	return errors.Join(errs...)
}

// delNetdev deletes a netdev; one that does not exist is success.
//
// Equivalent to: netdev_del tapsync-netdev3
func (c *Client) delNetdev(ctx context.Context, id string) error {
	_, err := c.run(ctx, "netdev_del", "id="+id, map[string]any{"id": id}, nil)
	switch {
	case err == nil, IsNotFound(err):
		return nil
	case isNotANetdev(err):
		return fmt.Errorf("%w: %w", ErrNetdevOrphaned, err)
	}
	return err
}

// DefaultUnplugResend is how long RemoveNICs lets an unplug it asked for
// run before it sends device_del for the same device again.
//
// Why ever again: with ACPI hot-plug (q35's and pc's default, and Kata's
// pci-bridge) a request the guest was not ready for (still booting, no
// hot-plug driver yet) may never be acted on, and QEMU 7.2 shows no sign
// of a pending unplug (no QOM property; "hotplugged" stays true) while it
// accepts a repeated device_del every time (measured), only raising the
// guest's hot-plug event again. Why not sooner: with native PCIe hot-plug
// a device_del presses the slot's attention button, and a second press
// while the guest's 5 s blink runs cancels the unplug (QEMU refuses one
// only for its own 5 s, counted on the VM's clock, which a slow guest
// outlasts). A minute is far past any blink, so a repeat is either a
// fresh request or ignored, and still soon enough to rescue a lost ACPI
// request.
const DefaultUnplugResend = time.Minute

// Unplug names one NIC for RemoveNICs.
type Unplug struct {
	Index int // endpoint index: the device DeviceID(Index), the netdev NetdevID(Index)
	// Requested says device_del was sent for this device before, perhaps
	// by an earlier connection or daemon (the caller's record says so).
	// It is then sent again only once DefaultUnplugResend has passed
	// since the last one this Client knows of; a request this Client
	// never saw is taken as made just now, so a restart never sends a
	// second device_del right behind the first.
	Requested bool
}

// unplugLog remembers when this connection last sent device_del per
// device id. The zero value is ready; its fields are guarded by mu.
type unplugLog struct {
	mu     sync.Mutex
	sent   map[string]time.Time
	resend time.Duration // 0: DefaultUnplugResend (tests shorten it)
}

// shouldSend says whether device_del goes out for u's device now.
func (l *unplugLog) shouldSend(id string, u Unplug, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !u.Requested {
		return true
	}
	last, ok := l.sent[id]
	if !ok {
		// Asked before, by someone we cannot ask when: start the clock.
		l.setLocked(id, now)
		return false
	}
	resend := l.resend
	if resend <= 0 {
		resend = DefaultUnplugResend
	}
	return now.Sub(last) >= resend
}

func (l *unplugLog) setLocked(id string, t time.Time) {
	if l.sent == nil {
		l.sent = map[string]time.Time{}
	}
	l.sent[id] = t
}

func (l *unplugLog) mark(id string, t time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.setLocked(id, t)
}

func (l *unplugLog) forget(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.sent, id)
}

// RemoveNIC unplugs the device of endpoint index and then deletes its
// netdev, waiting up to wait for the guest: RemoveNICs of one fresh
// request.
func (c *Client) RemoveNIC(ctx context.Context, index int, wait time.Duration) error {
	return c.RemoveNICs(ctx, []Unplug{{Index: index}}, wait)[0]
}

// unplugState is how one NIC of a RemoveNICs call stands.
type unplugState int

const (
	unplugGone     unplugState = iota // device gone: delete the netdev
	unplugAwaited                     // device_del sent now for the first time: worth waiting for
	unplugInFlight                    // asked before (or again): checked, not waited for
	unplugFailed                      // err holds why
)

// RemoveNICs unplugs the devices of several endpoints together and then
// deletes the netdev of each device that went. It returns one error per
// request, in order: nil once device and netdev are gone (gone already is
// success, so removing twice succeeds), an error wrapping
// ErrRemovalPending while the guest has not acknowledged, wrapping
// ErrNetdevOrphaned for a netdev QEMU cannot delete (after its device is
// gone), or what else failed.
//
// Every device_del goes out first; then one wait of at most wait covers
// every device asked for the first time (Requested false), ending as soon
// as each has its DEVICE_DELETED. So removing n NICs from a guest that
// never answers takes one wait, not n: a worker is held for one
// unplug_timeout at most. A device asked before is not waited for (the
// caller learns of its DEVICE_DELETED as an event and asks again), and its
// device_del is not repeated before DefaultUnplugResend (see there).
//
// Over HMP, which has no events, the wait asks QEMU every 40 ms
// whether each device is gone (qom-get), with the same results.
//
// Unplugging needs the guest's acknowledgement (ACPI or PCIe hot-plug):
// until then the device and its netdev stay.
func (c *Client) RemoveNICs(ctx context.Context, nics []Unplug, wait time.Duration) []error {
	errs := make([]error, len(nics))
	states := make([]unplugState, len(nics))
	ids := make([]string, len(nics))
	byID := map[string][]int{}
	for i, u := range nics {
		ids[i] = DeviceID(u.Index)
		if u.Index < 0 {
			states[i], errs[i] = unplugFailed, fmt.Errorf("remove %s: endpoint index is negative", ids[i])
			continue
		}
		byID[ids[i]] = append(byID[ids[i]], i)
	}
	// Listen before device_del: QEMU emits DEVICE_DELETED before replying
	// when the removal completes at once. Room for two events per device
	// (DEVICE_DELETED, and DEVICE_UNPLUG_GUEST_ERROR) so none is dropped.
	w := &waiter{ch: make(chan Event, 2*len(nics)+1), match: func(e Event) bool {
		id, _ := e.Data["device"].(string)
		return (e.Name == "DEVICE_DELETED" || e.Name == "DEVICE_UNPLUG_GUEST_ERROR") && byID[id] != nil
	}}
	c.mu.Lock()
	c.waiters[w] = struct{}{}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.waiters, w)
		c.mu.Unlock()
	}()

	for i, u := range nics {
		if states[i] == unplugFailed {
			continue
		}
		id := ids[i]
		if j := byID[id][0]; j != i { // the same device twice: one answer
			continue
		}
		now := time.Now()
		if !c.unplugs.shouldSend(id, u, now) {
			states[i], errs[i] = c.checkGone(ctx, id)
			continue
		}
		// Equivalent to: device_del tapsync-net3
		_, err := c.run(ctx, "device_del", "id="+id, map[string]any{"id": id}, nil)
		switch {
		case IsNotFound(err):
			states[i] = unplugGone
		case err == nil || hasClass(err, ClassUnplugPending):
			// Accepted, or refused because QEMU is still in its own
			// unplug window (native PCIe): either way a request stands,
			// and its clock restarts. A first request is waited for.
			states[i] = unplugInFlight
			if !u.Requested {
				states[i] = unplugAwaited
			}
			c.unplugs.mark(id, now)
		default:
			states[i], errs[i] = unplugFailed, fmt.Errorf("remove %s from VM at %s: %w", id, c.path, err)
		}
	}

	// One wait for all first requests.
	settle := func(e Event) {
		id, _ := e.Data["device"].(string)
		i := byID[id][0]
		if states[i] != unplugAwaited && states[i] != unplugInFlight {
			return
		}
		switch e.Name {
		case "DEVICE_DELETED":
			states[i] = unplugGone
		case "DEVICE_UNPLUG_GUEST_ERROR":
			states[i], errs[i] = unplugFailed, fmt.Errorf("remove %s from VM at %s: the guest reported an error unplugging it (DEVICE_UNPLUG_GUEST_ERROR)", id, c.path)
		}
	}
	awaiting := func() bool { return slices.Contains(states, unplugAwaited) }
	awaited := "DEVICE_DELETED"
	if !c.HasEvents() {
		awaited = "the device to go"
	}
	if awaiting() && wait > 0 {
		timer := time.NewTimer(wait)
		defer timer.Stop()
		var poll <-chan time.Time // over HMP, which has no events: when to ask
		if !c.HasEvents() {
			ticker := time.NewTicker(hmpUnplugPoll)
			defer ticker.Stop()
			poll = ticker.C
		}
	wait:
		for awaiting() {
			select {
			case e := <-w.ch:
				settle(e)
			case <-poll:
				for i := range states {
					if states[i] == unplugAwaited {
						if st, err := c.checkGone(ctx, ids[i]); st != unplugInFlight {
							states[i], errs[i] = st, err
						}
					}
				}
			case <-timer.C:
				break wait
			case <-ctx.Done():
				for i := range states {
					if states[i] == unplugAwaited || states[i] == unplugInFlight {
						states[i], errs[i] = unplugFailed, fmt.Errorf("remove %s from VM at %s: waiting for %s: %w", ids[i], c.path, awaited, ctx.Err())
					}
				}
				break wait
			case <-c.gone.Done():
				for i := range states {
					if states[i] == unplugAwaited || states[i] == unplugInFlight {
						states[i], errs[i] = unplugFailed, fmt.Errorf("remove %s: waiting for %s: %w", ids[i], awaited, c.Err())
					}
				}
				break wait
			}
		}
	}
	for drained := false; !drained; {
		select {
		case e := <-w.ch:
			settle(e)
		default:
			drained = true
		}
	}

	for i, u := range nics {
		if j := byID[ids[i]]; len(j) > 0 && j[0] != i {
			states[i], errs[i] = states[j[0]], errs[j[0]]
			continue
		}
		id := ids[i]
		switch states[i] {
		case unplugAwaited:
			// No event in time. The device may have gone without one
			// reaching us (a DEVICE_DELETED sent to an earlier
			// connection): ask.
			if states[i], errs[i] = c.checkGone(ctx, id); states[i] == unplugInFlight {
				errs[i] = fmt.Errorf("remove %s from VM at %s: no DEVICE_DELETED within %s: %w", id, c.path, wait, ErrRemovalPending)
				if !c.HasEvents() {
					errs[i] = fmt.Errorf("remove %s from VM at %s: still there after %s: %w", id, c.path, wait, ErrRemovalPending)
				}
				continue
			}
		case unplugInFlight:
			since := time.Since(c.unplugs.lastSent(id)).Round(time.Second)
			errs[i] = fmt.Errorf("remove %s from VM at %s: asked %s ago, not acknowledged yet: %w", id, c.path, since, ErrRemovalPending)
			continue
		}
		if states[i] != unplugGone {
			continue
		}
		c.unplugs.forget(id)
		if err := c.delNetdev(ctx, NetdevID(u.Index)); err != nil {
			// ErrNetdevOrphaned: the device is gone but QEMU keeps a
			// netdev it cannot delete; the caller must stop using this
			// index.
			errs[i] = fmt.Errorf("remove %s from VM at %s: %w", id, c.path, err)
		}
	}
	return errs
}

func (l *unplugLog) lastSent(id string) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sent[id]
}

// checkGone asks QEMU whether device id still exists: unplugGone or
// unplugInFlight.
func (c *Client) checkGone(ctx context.Context, id string) (unplugState, error) {
	var typ string
	switch err := c.qomGet(ctx, peripheral+"/"+id, "type", &typ); {
	case IsNotFound(err):
		return unplugGone, nil
	case err != nil:
		return unplugFailed, fmt.Errorf("remove %s from VM at %s: %w", id, c.path, err)
	}
	return unplugInFlight, nil
}

// ListNICs lists the VM's virtio-net devices: ours (Owned) and any others,
// such as those Kata cold-plugs at boot (without ids), so a caller can
// adopt them. A device without an id has no QOMPath.
//
// Equivalent to: HMP info qtree (see readTree).
func (c *Client) ListNICs(ctx context.Context) ([]NICInfo, error) {
	t, err := c.readTree(ctx)
	if err != nil {
		return nil, fmt.Errorf("list NICs of VM at %s: %w", c.path, err)
	}
	sortNICs(t.nics)
	return t.nics, nil
}

// VMState is one reading of a VM: everything a caller keeping a model of
// it needs.
type VMState struct {
	NICs     []NICInfo // as ListNICs
	Netdevs  []string  // as ListNetdevs
	Topology Topology  // as Topology
}

// ReadVM reads the VM's NICs, netdevs and hot-plug topology in two round
// trips.
//
// Equivalent to: HMP info qtree, HMP info network.
func (c *Client) ReadVM(ctx context.Context) (VMState, error) {
	vm, err := c.ReadDevices(ctx)
	if err != nil {
		return VMState{}, err
	}
	if vm.Netdevs, err = c.ListNetdevs(ctx); err != nil {
		return VMState{}, err
	}
	return vm, nil
}

// ReadDevices is ReadVM in one round trip, without the netdev listing:
// Netdevs holds only the netdevs of the NICs read (a netdev without a
// device does not show).
//
// Equivalent to: HMP info qtree.
func (c *Client) ReadDevices(ctx context.Context) (VMState, error) {
	t, err := c.readTree(ctx)
	if err != nil {
		return VMState{}, fmt.Errorf("read VM at %s: %w", c.path, err)
	}
	sortNICs(t.nics)
	var netdevs []string
	for _, n := range t.nics {
		if n.Netdev != "" && !slices.Contains(netdevs, n.Netdev) {
			netdevs = append(netdevs, n.Netdev)
		}
	}
	return VMState{NICs: t.nics, Netdevs: netdevs, Topology: newTopology(t.buses, t.types)}, nil
}

// ReadNetwork reads the VM's NICs and every netdev in one round trip that
// asks QEMU for no more than that: each NIC's id, MAC and netdev, as QEMU's
// network layer lists them (a reply of a few hundred bytes, where ReadVM's
// device tree is tens of KB). It is a verification's reading, not a
// placement's: the Topology is empty, and the NICs have no Bus, Addr or
// PCIPath. A NIC's MAC is the one it uses now: the guest's, should the
// guest have changed it (ReadVM's is the one it was plugged with).
//
// Equivalent to: HMP info network.
func (c *Client) ReadNetwork(ctx context.Context) (VMState, error) {
	var out string
	if err := c.runInto(ctx, "human-monitor-command", "command-line=info network",
		map[string]any{"command-line": "info network"}, &out); err != nil {
		return VMState{}, fmt.Errorf("read network of VM at %s: %w", c.path, err)
	}
	nics, netdevs := parseNetwork(out)
	sortNICs(nics)
	return VMState{NICs: nics, Netdevs: netdevs}, nil
}

// sortNICs orders ours first, by index, then the others by PCI path.
func sortNICs(nics []NICInfo) {
	sort.Slice(nics, func(i, j int) bool {
		a, b := nics[i], nics[j]
		if a.Owned != b.Owned {
			return a.Owned
		}
		if a.Owned {
			return a.Index < b.Index
		}
		if a.PCIPath != b.PCIPath {
			return a.PCIPath < b.PCIPath
		}
		if a.Bus+a.Addr != b.Bus+b.Addr {
			return a.Bus+a.Addr < b.Bus+b.Addr
		}
		return a.ID < b.ID // ReadNetwork's, which have no place
	})
}

// isVirtioNet matches virtio-net-pci and its -transitional and
// -non-transitional variants.
func isVirtioNet(typ string) bool {
	return typ == "virtio-net-pci" || strings.HasPrefix(typ, "virtio-net-pci-")
}

// ListNetdevs returns the ids of all netdevs in QEMU, ours and others, in
// the order QEMU lists them. QEMU 7.2 has no query-netdev, so this parses
// the output of the HMP command "info network" (through
// human-monitor-command, or sent as it is over HMP); see parseInfoNetwork
// for its shape.
func (c *Client) ListNetdevs(ctx context.Context) ([]string, error) {
	var out string
	if err := c.runInto(ctx, "human-monitor-command", "command-line=info network",
		map[string]any{"command-line": "info network"}, &out); err != nil {
		return nil, fmt.Errorf("list netdevs of VM at %s: %w", c.path, err)
	}
	return parseInfoNetwork(out), nil
}

// parseInfoNetwork extracts netdev ids from HMP "info network". QEMU 7.2
// prints hubs first, then every NIC with its backend indented below it, then
// backends without a NIC; a multiqueue client appears once per queue. Lines
// end in \r\n:
//
//	hub 1
//	 \ hp1: kata0: index=0,type=nic,model=virtio-net-pci,macaddr=02:00:00:00:00:03
//	hub 0
//	 \ hp0
//	tapsync-net1: index=0,type=nic,model=virtio-net-pci,macaddr=02:00:00:00:00:01
//	 \ tapsync-netdev1: index=0,type=tap,fd=13
//	tapsync-net1: index=1,type=nic,
//	 \ tapsync-netdev1: index=1,type=tap,fd=14
//	virtio-net-pci.2: index=0,type=nic,model=virtio-net-pci,macaddr=02:00:00:00:00:02
//	tapsync-netdev3: index=0,type=tap,fd=15
//
// A client is "<name>: index=<q>,type=<type>,<info>"; netdevs are the
// clients whose type is not nic, plus the hub ports (hp0, hp1) named after
// " \ " under a "hub N" line.
func parseInfoNetwork(out string) []string {
	var ids []string
	seen := map[string]bool{}
	add := func(id string) {
		// Not a name QEMU would print (found by FuzzParseInfoNetwork: a
		// stray \r became a hub port).
		if strings.ContainsFunc(id, func(r rune) bool { return r <= ' ' || r == ':' || r == 0x7f }) {
			return
		}
		if id != "" && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	inHub := false
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimRight(line, "\r")
		if strings.HasPrefix(line, "hub ") {
			inHub = true
			continue
		}
		rest, indented := strings.CutPrefix(line, " \\ ")
		if !indented {
			inHub = false
		} else if inHub {
			port, peer, _ := strings.Cut(rest, ": ")
			add(port)
			rest = peer
		}
		if name, typ, ok := parseNetClient(rest); ok && typ != "nic" {
			add(name)
		}
	}
	return ids
}

// parseNetwork reads the virtio-net NICs and the netdevs of HMP "info
// network" (see parseInfoNetwork for its shape). A NIC is a client of type
// nic whose model is a virtio-net-pci: its name is its device's id (QEMU
// names a NIC made without an id "<model>.<n>", which is never one of
// ours), its MAC is in the first queue's line, and its netdev is the
// client printed under it (" \ "), or the hub port it is printed under
// (" \ hp0: NIC: ...").
func parseNetwork(out string) (nics []NICInfo, netdevs []string) {
	netdevs = parseInfoNetwork(out)
	last := -1 // the NIC whose queue was the last client line at the left margin
	inHub := false
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimRight(line, "\r")
		if strings.HasPrefix(line, "hub ") {
			inHub, last = true, -1
			continue
		}
		rest, indented := strings.CutPrefix(line, " \\ ")
		if indented && !inHub {
			// The netdev of the NIC above, or of one of its queues.
			if name, typ, ok := parseNetClient(rest); ok && typ != "nic" && last >= 0 && nics[last].Netdev == "" {
				nics[last].Netdev = name
			}
			continue
		}
		port := ""
		if !indented {
			inHub = false
		} else if p, peer, ok := strings.Cut(rest, ": "); ok {
			port, rest = p, peer // a hub port, then its NIC
		}
		name, info, ok := parseNetClientInfo(rest)
		if !ok {
			continue // "filters:" and its list, junk
		}
		if !indented {
			last = -1
		}
		if info["type"] != "nic" || !isVirtioNet(info["model"]) {
			continue
		}
		i := slices.IndexFunc(nics, func(n NICInfo) bool { return n.ID == name })
		if i < 0 {
			n := NICInfo{ID: name, Index: -1, Netdev: port}
			if idx, owned := ParseDeviceID(name); owned {
				n.Index, n.Owned, n.QOMPath = idx, true, peripheral+"/"+name
			}
			nics = append(nics, n)
			i = len(nics) - 1
		}
		if mac, err := net.ParseMAC(info["macaddr"]); err == nil && len(mac) == 6 && nics[i].MAC == nil {
			nics[i].MAC = mac
		}
		if !indented {
			last = i
		}
	}
	// A NIC without a readable MAC is not one this reader can vouch for:
	// leave it out rather than guess (a caller comparing MACs then sees a
	// difference, and reads the VM fully).
	nics = slices.DeleteFunc(nics, func(n NICInfo) bool { return n.MAC == nil })
	return nics, netdevs
}

// parseNetClientInfo splits "<name>: index=<q>,type=<type>,<k>=<v>,..."
// into the name and its key=value fields.
func parseNetClientInfo(s string) (string, map[string]string, bool) {
	name, typ, ok := parseNetClient(s)
	if !ok {
		return "", nil, false
	}
	_, rest, _ := strings.Cut(s, ": ")
	info := map[string]string{"type": typ}
	for _, field := range strings.Split(rest, ",") {
		if k, v, ok := strings.Cut(field, "="); ok && k != "type" {
			info[k] = v
		}
	}
	return name, info, true
}

// parseNetClient splits "<name>: index=<q>,type=<type>,<info>".
func parseNetClient(s string) (name, typ string, ok bool) {
	name, rest, found := strings.Cut(s, ": ")
	if !found || name == "" || strings.ContainsAny(name, " :") || !strings.HasPrefix(rest, "index=") {
		return "", "", false
	}
	for _, field := range strings.Split(rest, ",") {
		if t, isType := strings.CutPrefix(field, "type="); isType {
			return name, t, true
		}
	}
	return "", "", false
}

func closeFiles(lists ...[]*os.File) {
	for _, files := range lists {
		for _, f := range files {
			if f != nil {
				_ = f.Close()
			}
		}
	}
}
