package qmp

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// These tests drive a real QEMU over its HMP monitor (-monitor
// unix:path=…,server=on,wait=off, as Kata's runtime-rs starts it) and look
// at the result through a QMP monitor of the same VM.

// kataBridge is the pci-bridge Kata gives a q35 VM, in slot 2 of pcie.0.
const kataBridge = "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m"

func TestQEMUHMPKataBridge(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 0, "-smp", "2", "-device", kataBridge)
	c := dialHMPT(t, vm.hmp, Options{})
	test := dialT(t, vm.test, Options{}) // the same VM over QMP, to look
	ctx := context.Background()

	if c.Protocol() != ProtocolHMP || c.HasEvents() || c.Version() != test.Version() || !strings.HasPrefix(c.Version(), "7.") {
		t.Errorf("Protocol %q, HasEvents %v, Version %q (QMP says %q)", c.Protocol(), c.HasEvents(), c.Version(), test.Version())
	}
	if n, err := c.VCPUs(ctx); err != nil || n != 2 {
		t.Errorf("VCPUs = %d, %v; want 2", n, err)
	}

	mac1, mac2 := mustMAC(t, "02:00:00:00:00:01"), mustMAC(t, "02:00:00:00:00:02")
	want := NICInfo{ID: "tapsync-net1", Index: 1, Owned: true, MAC: mac1, Netdev: "tapsync-netdev1",
		Bus: "pci-bridge-0", Addr: "1f.0", QOMPath: "/machine/peripheral/tapsync-net1", PCIPath: "02/1f"}
	addNICT(t, c, NIC{Index: 1, MAC: mac1, MTU: 1400}, want)
	info2, err := c.AddNIC(ctx, NIC{Index: 2, MAC: mac2, TapFDs: openTap(t, 2)})
	if err != nil {
		t.Fatal(err)
	}
	if info2.PCIPath != "02/1e" || info2.Bus != "pci-bridge-0" {
		t.Errorf("second NIC at %s %s (%s), want pci-bridge-0 02/1e", info2.Bus, info2.Addr, info2.PCIPath)
	}

	// What QEMU made, read over HMP and over QMP.
	read, err := c.ReadVM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(read.NICs) != 2 || !sameInfo(read.NICs[0], want) || !sameInfo(read.NICs[1], info2) {
		t.Errorf("ReadVM NICs = %+v\nwant [%+v %+v]", read.NICs, want, info2)
	}
	if !slices.Equal(read.Netdevs, []string{"tapsync-netdev1", "tapsync-netdev2"}) {
		t.Errorf("ReadVM netdevs = %q", read.Netdevs)
	}
	viaQMP, err := test.ReadVM(ctx)
	if err != nil || !read.Topology.Equal(viaQMP.Topology) || len(viaQMP.NICs) != 2 {
		t.Errorf("over QMP: %+v, %v", viaQMP, err)
	}
	var hostMTU, vectors int
	var mq bool
	var romfile string
	for _, q := range []struct {
		path, prop string
		out        any
	}{{want.QOMPath, "host_mtu", &hostMTU}, {want.QOMPath, "romfile", &romfile}, {info2.QOMPath, "mq", &mq}, {info2.QOMPath, "vectors", &vectors}} {
		if err := test.qomGet(ctx, q.path, q.prop, q.out); err != nil {
			t.Error(err)
		}
	}
	if hostMTU != 1400 || romfile != "" || !mq || vectors != 6 {
		t.Errorf("host_mtu %d, romfile %q, mq %v, vectors %d; want 1400, \"\", true, 6", hostMTU, romfile, mq, vectors)
	}
	var mtuHMP int
	if err := c.qomGet(ctx, want.QOMPath, "host_mtu", &mtuHMP); err != nil || mtuHMP != 1400 {
		t.Errorf("qom-get over HMP: %d, %v", mtuHMP, err)
	}

	// Again: a no-op that still takes (closes) the new fds.
	before := c.Commands()
	addNICT(t, c, NIC{Index: 1, MAC: mac1}, want)
	if n := c.Commands() - before; n != 2 { // info qtree, info network
		t.Errorf("second AddNIC sent %d commands, want the 2 of ReadVM", n)
	}

	// No guest OS acknowledges the ACPI unplug: pending after the wait.
	const wait = time.Second
	start := time.Now()
	err = c.RemoveNIC(ctx, 1, wait)
	if d := time.Since(start); !errors.Is(err, ErrRemovalPending) || d < wait || d > time.Minute {
		t.Fatalf("RemoveNIC = %v after %s, want ErrRemovalPending after %s", err, d, wait)
	}
	t.Log(err)
	if nics, err := test.ListNICs(ctx); err != nil || len(nics) != 2 {
		t.Errorf("a pending removal changed things: %+v, %v", nics, err)
	}

	// A guest reset completes pending ACPI unplugs: RemoveNICs, asking
	// while it waits, sees both devices go and deletes their netdevs.
	before = c.Commands()
	done := make(chan []error, 1)
	go func() { done <- c.RemoveNICs(ctx, unplugs(false, 1, 2), time.Minute) }()
	eventually(t, 10*time.Second, func() error {
		if c.Commands()-before < 2 {
			return errors.New("the device_del of both not sent yet")
		}
		return nil
	})
	if _, err := test.run(ctx, "system_reset", "", nil, nil); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	select {
	case errs := <-done:
		for i, err := range errs {
			if err != nil {
				t.Errorf("NIC %d: %v", i+1, err)
			}
		}
		t.Logf("both gone %s after the reset, %d commands", time.Since(start).Round(time.Millisecond), c.Commands()-before)
	case <-time.After(30 * time.Second):
		t.Fatal("RemoveNICs did not see the devices go")
	}
	checkNoNICs(t, test, "after the reset: ")
	// Removing twice succeeds.
	if errs := c.RemoveNICs(ctx, unplugs(false, 1, 2), time.Second); errs[0] != nil || errs[1] != nil {
		t.Errorf("second RemoveNICs: %v", errs)
	}
}

// QEMU's refusals come back as *Error naming the command's object, and
// AddNIC rolls back over HMP as over QMP.
func TestQEMUHMPErrors(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 0, "-device", kataBridge)
	c := dialHMPT(t, vm.hmp, Options{})
	test := dialT(t, vm.test, Options{})
	ctx := context.Background()
	leftovers := func(index int) {
		t.Helper()
		if netdevs, err := test.ListNetdevs(ctx); err != nil || slices.Contains(netdevs, NetdevID(index)) {
			t.Errorf("netdev left behind: %q, %v", netdevs, err)
		}
		if _, err := c.run(ctx, "closefd", "", map[string]any{"fdname": fdName(index, 0)}, nil); err == nil {
			t.Errorf("fd name %s left in QEMU's table", fdName(index, 0))
		}
	}

	// Someone else holds our device id.
	if _, err := test.run(ctx, "device_add", "", map[string]any{"driver": "virtio-rng-pci", "id": "tapsync-net5", "bus": "pci-bridge-0", "addr": "0x5"}, nil); err != nil {
		t.Fatal(err)
	}
	taps := openTap(t, 2)
	_, err := c.AddNIC(ctx, NIC{Index: 5, MAC: mustMAC(t, "02:00:00:00:00:05"), TapFDs: taps})
	var qerr *Error
	if !errors.As(err, &qerr) || qerr.Class != ClassDuplicateID || qerr.Cmd != "device_add id=tapsync-net5" ||
		!strings.Contains(err.Error(), "hmp device_add id=tapsync-net5: DuplicateID: Duplicate device ID 'tapsync-net5'") || !strings.Contains(err.Error(), vm.hmp) {
		t.Fatalf("AddNIC = %v, want device_add failing with DuplicateID", err)
	}
	t.Log(err)
	checkClosed(t, taps)
	leftovers(5)

	// A bus that is not there (a caller's stale word).
	_, err = c.AddNIC(ctx, NIC{Index: 6, MAC: mustMAC(t, "02:00:00:00:00:06"), TapFDs: openTap(t, 1), At: &Place{Bus: "nobus", Slot: 3, PCIPath: "02/03"}})
	if !errors.As(err, &qerr) || qerr.Class != ClassGeneric || qerr.Desc != "Bus 'nobus' not found" || !strings.Contains(err.Error(), "add tapsync-net6 to VM at "+vm.hmp) {
		t.Fatalf("AddNIC on a missing bus = %v", err)
	}
	t.Log(err)
	leftovers(6)

	// Our netdev id is taken. By a netdev made over QMP: netdev_add
	// says so. By one made over HMP: HMP's parser refuses the line and
	// says why on QEMU's stderr only.
	if _, err := test.run(ctx, "netdev_add", "", map[string]any{"type": "hubport", "id": "tapsync-netdev7", "hubid": 0}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.run(ctx, "netdev_add", "", map[string]any{"type": "hubport", "id": "tapsync-netdev8", "hubid": 0}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		index       int
		class, desc string
	}{
		{7, ClassDuplicateID, "Duplicate ID 'tapsync-netdev7'"},
		{8, ClassGeneric, `arguments refused (QEMU printed why on its stderr; for netdev_add, an id in use): Try "help netdev_add" for more information`},
	} {
		_, err = c.AddNIC(ctx, NIC{Index: tc.index, MAC: mustMAC(t, "02:00:00:00:00:07"), TapFDs: openTap(t, 1), At: &Place{Bus: "pci-bridge-0", Slot: 7, PCIPath: "02/07"}})
		if !errors.As(err, &qerr) || qerr.Cmd != "netdev_add id="+NetdevID(tc.index) || qerr.Class != tc.class || qerr.Desc != tc.desc {
			t.Fatalf("AddNIC with its netdev id taken = %v", err)
		}
		t.Log(err)
		leftovers(tc.index) // the rollback deleted the netdev: its id is ours
	}

	// A value that cannot go on an HMP line is refused before anything
	// is sent.
	for _, bus := range []string{"pci-bridge-0,addr=0x3", "pci bridge"} {
		before := c.Commands()
		taps := openTap(t, 1)
		_, err := c.AddNIC(ctx, NIC{Index: 9, MAC: mustMAC(t, "02:00:00:00:00:09"), TapFDs: taps, At: &Place{Bus: bus, Slot: 4}})
		if err == nil || !strings.Contains(err.Error(), `bus "`+bus+`" cannot go on an HMP command line`) {
			t.Errorf("AddNIC with bus %q = %v", bus, err)
		}
		if n := c.Commands() - before; n != 0 {
			t.Errorf("bus %q: %d commands sent", bus, n)
		}
		checkClosed(t, taps)
		t.Log(err)
	}

	// Not found is success for removal; an unknown command is CommandNotFound.
	if err := c.RemoveNIC(ctx, 10, time.Second); err != nil {
		t.Errorf("RemoveNIC of a never-added index: %v", err)
	}
	if err := c.delNetdev(ctx, NetdevID(10)); err != nil {
		t.Errorf("delNetdev of a missing netdev: %v", err)
	}
	var typ string
	if err := c.qomGet(ctx, peripheral+"/tapsync-net10", "type", &typ); !IsNotFound(err) {
		t.Errorf("qom-get of a missing device = %v, want not found", err)
	}
	if _, err := c.run(ctx, "human-monitor-command", "", map[string]any{"command-line": "info nothing"}, nil); !hasClass(err, ClassGeneric) && !hasClass(err, ClassCommandNotFound) {
		t.Errorf("info nothing: %v", err)
	}
	checkNoNICs(t, c, "")
}

// With native PCIe hot-plug and no guest to power the slot on, QEMU
// completes an unplug at once: RemoveNIC over HMP finds the device gone at
// its first look.
func TestQEMUHMPUnplugAcknowledged(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 2, "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off")
	addRemoveRounds(t, dialHMPT(t, vm.hmp, Options{}), dialT(t, vm.test, Options{}), rootPorts)
}

// Kata's bundle dir is too long a path for a socket: QEMU, in it, names
// its sockets relative to it, and both Dial and DialHMP reach them.
func TestQEMULongSocketPath(t *testing.T) {
	t.Parallel()
	dir := longDir(t)
	vm := startVMIn(t, dir, "q35", 0, "-device", kataBridge, "-device", "pcie-root-port,id=rp9,chassis=9,bus=pcie.0,addr=0x9",
		"-qmp", "unix:qmp.sock,server=on,wait=off")
	if len(vm.hmp) <= maxSunPath {
		t.Fatalf("%s is short enough for a socket address", vm.hmp)
	}
	qmpPath := filepath.Join(dir, "qmp.sock")
	var q *Client
	eventually(t, 10*time.Second, func() (err error) {
		q, err = Dial(context.Background(), qmpPath, Options{})
		return err
	})
	defer q.Close()
	var peer *net.UnixConn
	c := dialHMPT(t, vm.hmp, Options{CheckConn: func(conn *net.UnixConn) error { peer = conn; return nil }})
	if peer == nil {
		t.Error("CheckConn not called")
	}
	ctx := context.Background()
	viaHMP, err := c.ReadVM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	viaQMP, err := q.ReadVM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !viaHMP.Topology.Equal(viaQMP.Topology) {
		t.Errorf("topologies differ: HMP %s, QMP %s", viaHMP.Topology.survey(Placement{Hotplug: HotplugAny}), viaQMP.Topology.survey(Placement{Hotplug: HotplugAny}))
	}
	capa, err := c.HotplugCapacity(ctx, Placement{Hotplug: HotplugAny})
	if err != nil || capa.Free() != 32 { // 31 bridge slots and one root port
		t.Errorf("HotplugCapacity = %s, %v", capa, err)
	}
}

// An HMP socket serves one client at a time, like a QMP one.
func TestQEMUHMPBusyAndExit(t *testing.T) {
	t.Parallel()
	vm := startVM(t, "q35", 0)
	c := dialHMPT(t, vm.hmp, Options{})
	start := time.Now()
	_, err := DialHMP(context.Background(), vm.hmp, Options{Timeout: time.Second})
	if !errors.Is(err, ErrNoGreeting) || !strings.Contains(err.Error(), "another client probably holds the monitor") {
		t.Errorf("second DialHMP = %v, want ErrNoGreeting", err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("second DialHMP took %s", d)
	}
	t.Log(err)

	killQEMU(t, vm, c)
}
