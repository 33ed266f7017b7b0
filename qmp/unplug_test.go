package qmp

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// fakeVMWith is a fakeVM holding the NICs of endpoints 0..n-1 whose
// guest never acknowledges an unplug (QEMU answers every device_del after
// the first with "already in the process of unplug", as it does for
// native PCIe within its window).
func fakeVMWith(n int) *fakeVM {
	v := &fakeVM{devices: map[string]bool{}, netdevs: map[string]bool{}, pending: map[string]bool{}, ack: map[string]bool{}, unplug: "pending"}
	for i := range n {
		v.devices[DeviceID(i)] = true
		v.netdevs[NetdevID(i)] = true
	}
	return v
}

// takeCommands returns the commands the fake received since the last call.
func (v *fakeVM) takeCommands() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	c := v.commands
	v.commands = nil
	return c
}

func count(cmds []string, prefix string) int {
	n := 0
	for _, c := range cmds {
		if strings.HasPrefix(c, prefix) {
			n++
		}
	}
	return n
}

func unplugs(requested bool, indexes ...int) []Unplug {
	us := make([]Unplug, len(indexes))
	for i, n := range indexes {
		us[i] = Unplug{Index: n, Requested: requested}
	}
	return us
}

// Four NICs whose guest never answers: every device_del goes out before
// the one wait, so the call takes one wait, not four.
func TestRemoveNICsWaitOnce(t *testing.T) {
	vm := fakeVMWith(4)
	f := startFake(t, greetingOOB, vm.handle)
	c := dialT(t, f.path, Options{})
	ctx := context.Background()

	// Generous: four waits one after another would take 4 s; this bounds
	// the structure (one wait), not the speed.
	const wait = time.Second
	start := time.Now()
	errs := c.RemoveNICs(ctx, unplugs(false, 0, 1, 2, 3), wait)
	took := time.Since(start)
	for i, err := range errs {
		if !errors.Is(err, ErrRemovalPending) || !strings.Contains(err.Error(), DeviceID(i)) {
			t.Errorf("NIC %d: err = %v, want ErrRemovalPending naming %s", i, err, DeviceID(i))
		}
	}
	// Sequential waits take 4× wait; 3× leaves a loaded machine room.
	if took < wait || took >= 3*wait {
		t.Errorf("RemoveNICs of 4 unanswered NICs took %s; want one wait of %s (under %s)", took, wait, 3*wait)
	}
	cmds := vm.takeCommands()
	want := []string{"device_del tapsync-net0", "device_del tapsync-net1", "device_del tapsync-net2", "device_del tapsync-net3"}
	if len(cmds) < 4 || !slices.Equal(cmds[:4], want) {
		t.Errorf("commands = %q; want the four device_del first, then the checks", cmds)
	}
	if n := count(cmds, "device_del"); n != 4 {
		t.Errorf("%d device_del, want 4", n)
	}
	if n := count(cmds, "netdev_del"); n != 0 {
		t.Errorf("%d netdev_del while the devices are still plugged", n)
	}

	// Retries of the pending unplugs: checked, never asked again, never
	// waited for.
	for round := range 3 {
		errs := c.RemoveNICs(ctx, unplugs(true, 0, 1, 2, 3), time.Hour)
		for i, err := range errs {
			if !errors.Is(err, ErrRemovalPending) {
				t.Errorf("retry %d, NIC %d: err = %v, want ErrRemovalPending", round, i, err)
			}
		}
		if cmds := vm.takeCommands(); count(cmds, "device_del") != 0 {
			t.Errorf("retry %d re-sent device_del: %q", round, cmds)
		}
	}

	// A new connection (a daemon restart) that finds the unplugs recorded
	// as requested does not send a second device_del right behind the
	// first either.
	c.Close()
	c2 := dialT(t, f.path, Options{})
	c2.RemoveNICs(ctx, unplugs(true, 0, 1, 2, 3), time.Hour)
	if cmds := vm.takeCommands(); count(cmds, "device_del") != 0 {
		t.Errorf("a fresh connection re-sent device_del: %q", cmds)
	}

	// Once the resend interval has passed, one device_del each, and no wait.
	c2.unplugs.mu.Lock()
	c2.unplugs.resend = time.Nanosecond
	c2.unplugs.mu.Unlock()
	errs = c2.RemoveNICs(ctx, unplugs(true, 0, 1, 2, 3), time.Hour)
	for i, err := range errs {
		if !errors.Is(err, ErrRemovalPending) {
			t.Errorf("resend, NIC %d: err = %v, want ErrRemovalPending", i, err)
		}
	}
	if cmds := vm.takeCommands(); count(cmds, "device_del") != 4 {
		t.Errorf("after the resend interval: %q; want one device_del per NIC", cmds)
	}
}

// Devices that go at once are finished (netdev deleted) in the same call
// as those left pending, and a call whose devices all go does not wait.
func TestRemoveNICsMixed(t *testing.T) {
	vm := fakeVMWith(3)
	vm.ack[DeviceID(1)] = true
	f := startFake(t, greetingOOB, vm.handle)
	c := dialT(t, f.path, Options{})
	ctx := context.Background()

	errs := c.RemoveNICs(ctx, []Unplug{{Index: 0}, {Index: 1}, {Index: 2, Requested: true}, {Index: 7}}, 300*time.Millisecond)
	if !errors.Is(errs[0], ErrRemovalPending) || errs[1] != nil || !errors.Is(errs[2], ErrRemovalPending) || errs[3] != nil {
		t.Fatalf("errs = %v; want pending, removed, pending (asked before), removed (never there)", errs)
	}
	cmds := vm.takeCommands()
	for _, want := range []string{"device_del tapsync-net0", "device_del tapsync-net1", "netdev_del tapsync-netdev1", "device_del tapsync-net7", "netdev_del tapsync-netdev7"} {
		if !slices.Contains(cmds, want) {
			t.Errorf("no %q among %q", want, cmds)
		}
	}
	if slices.Contains(cmds, "device_del tapsync-net2") {
		t.Errorf("device_del sent for a NIC asked before: %q", cmds)
	}
	vm.mu.Lock()
	if vm.netdevs[NetdevID(1)] || !vm.netdevs[NetdevID(0)] || !vm.netdevs[NetdevID(2)] {
		t.Errorf("netdevs = %v; want only those of the pending NICs", vm.netdevs)
	}
	vm.mu.Unlock()

	// All acknowledged: no waiting for the full hour.
	vm.mu.Lock()
	vm.devices[DeviceID(4)], vm.devices[DeviceID(5)] = true, true
	vm.ack[DeviceID(4)], vm.ack[DeviceID(5)] = true, true
	vm.mu.Unlock()
	done := make(chan []error, 1)
	go func() { done <- c.RemoveNICs(ctx, unplugs(false, 4, 5), time.Hour) }()
	select {
	case errs := <-done:
		if errs[0] != nil || errs[1] != nil {
			t.Errorf("acknowledged removals: %v", errs)
		}
	case <-time.After(time.Minute): // a hang, not a speed target
		t.Fatal("RemoveNICs of acknowledged NICs still waiting after a minute")
	}

	// The same device twice in one call: asked once.
	vm.takeCommands()
	errs = c.RemoveNICs(ctx, unplugs(false, 0, 0), 10*time.Millisecond)
	if !errors.Is(errs[0], ErrRemovalPending) || !errors.Is(errs[1], ErrRemovalPending) {
		t.Errorf("duplicate: %v", errs)
	}
	if n := count(vm.takeCommands(), "device_del"); n != 1 {
		t.Errorf("duplicate request sent %d device_del, want 1", n)
	}
}

// QEMU 7.2 with ACPI hot-plug (the q35 default) and no guest: the facts
// DefaultUnplugResend rests on. A repeated device_del is accepted (not
// refused as pending), and QOM shows no sign of the pending unplug; so
// tapsync must remember its requests itself. And four NICs are removed
// with one wait.
func TestQEMURemoveNICsWaitOnce(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 4)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	for i := range 4 {
		// While the firmware numbers the buses just after start, query-pci
		// can show empty ports as taken (see secondaryDevices): ask again.
		eventually(t, 30*time.Second, func() error {
			_, err := c.AddNIC(ctx, NIC{Index: i, MAC: mustMAC(t, fmt.Sprintf("02:00:00:00:01:%02x", i)), TapFDs: openTap(t, 1), Placement: rootPorts})
			if err != nil && !errors.Is(err, ErrNoFreeSlot) {
				t.Fatal(err)
			}
			return err
		})
	}

	// Structure, not speed: four sequential waits would take 8 s.
	const wait = 2 * time.Second
	start := time.Now()
	errs := c.RemoveNICs(ctx, unplugs(false, 0, 1, 2, 3), wait)
	took := time.Since(start)
	for i, err := range errs {
		if !errors.Is(err, ErrRemovalPending) {
			t.Errorf("NIC %d: %v, want ErrRemovalPending", i, err)
		}
	}
	t.Logf("4 unanswered unplugs took %s with wait %s", took.Round(time.Millisecond), wait)
	// Sequential waits take 4× wait; 3× leaves a loaded machine room.
	if took < wait || took >= 3*wait {
		t.Errorf("RemoveNICs took %s; want one wait of %s (under %s)", took, wait, 3*wait)
	}

	// Retries neither wait nor find anything changed.
	start = time.Now()
	for i, err := range c.RemoveNICs(ctx, unplugs(true, 0, 1, 2, 3), time.Hour) {
		if !errors.Is(err, ErrRemovalPending) {
			t.Errorf("retry, NIC %d: %v", i, err)
		}
	}
	if d := time.Since(start); d > time.Minute { // a hang, not a speed target
		t.Errorf("retries took %s", d)
	}
	nics, err := c.ListNICs(ctx)
	if err != nil || len(nics) != 4 {
		t.Errorf("ListNICs = %d NICs, %v; want the 4 pending ones", len(nics), err)
	}

	// The measured facts behind DefaultUnplugResend.
	test := dialT(t, vm.test, Options{})
	var props []qomEntry
	if err := test.runInto(ctx, "qom-list", "", map[string]any{"path": "/machine/peripheral/tapsync-net0"}, &props); err != nil {
		t.Fatal(err)
	}
	for _, p := range props {
		if strings.Contains(p.Name, "pending") || strings.Contains(p.Name, "unplug") {
			t.Errorf("QOM shows %q on a device with an unplug pending: RemoveNICs could ask QEMU instead of remembering", p.Name)
		}
	}
	if _, err := test.run(ctx, "device_del", "", map[string]any{"id": "tapsync-net0"}, nil); err != nil {
		t.Errorf("a repeated device_del under ACPI hot-plug: %v (DefaultUnplugResend's comment says it is accepted)", err)
	}
}
