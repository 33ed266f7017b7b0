package qmp

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testproc"
	"golang.org/x/sys/unix"
)

// These tests run a real QEMU with no guest OS (SeaBIOS idles). Those that
// hand it tap fds need root (taps in a throwaway netns) and /dev/net/tun;
// all need qemu-system-x86_64. Otherwise they skip.

func requireQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("skipping: qemu-system-x86_64 not installed")
	}
}

// rootPorts places NICs on the root ports the tests give their VMs.
var rootPorts = Placement{Hotplug: HotplugRootPort}

func requireTaps(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create taps in a throwaway netns and hand their fds to QEMU")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("skipping: no /dev/net/tun")
	}
}

// testVM is a QEMU process with two QMP sockets, qmp for the Client under
// test and test for the test's own meddling, and an HMP socket, hmp.
type testVM struct {
	qmp, test string
	hmp       string
	stderr    string // file with QEMU's stderr
	cmd       *exec.Cmd
}

// startVM starts qemu-system-x86_64 with rootPorts pcie-root-ports (q35
// only) and extra arguments, and kills it when the test ends.
func startVM(t *testing.T, machine string, rootPorts int, extra ...string) *testVM {
	t.Helper()
	return startVMIn(t, "", machine, rootPorts, extra...)
}

// startVMIn is startVM with QEMU's working directory cwd, when not "",
// holding its HMP socket as Kata's runtime-rs has it: debug-monitor.sock,
// named relative to cwd (which may be too long a path for a socket).
func startVMIn(t *testing.T, cwd, machine string, rootPorts int, extra ...string) *testVM {
	t.Helper()
	requireQEMU(t)
	dir, err := os.MkdirTemp("", "qmpvm") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	vm := &testVM{
		qmp:    filepath.Join(dir, "qmp.sock"),
		test:   filepath.Join(dir, "test.sock"),
		hmp:    filepath.Join(dir, "hmp.sock"),
		stderr: filepath.Join(dir, "stderr"),
	}
	hmpArg := vm.hmp
	if cwd != "" {
		vm.hmp, hmpArg = filepath.Join(cwd, "debug-monitor.sock"), "debug-monitor.sock"
	}
	args := []string{
		"-machine", machine, "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "128",
		"-qmp", "unix:" + vm.qmp + ",server=on,wait=off",
		"-qmp", "unix:" + vm.test + ",server=on,wait=off",
		"-monitor", "unix:path=" + hmpArg + ",server=on,wait=off",
	}
	for n := 1; n <= rootPorts; n++ {
		args = append(args, "-device", fmt.Sprintf("pcie-root-port,id=rp%d,chassis=%d,bus=pcie.0,addr=%#x", n, n, n+1))
	}
	args = append(args, extra...)
	errFile, err := os.Create(vm.stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer errFile.Close()
	vm.cmd = exec.Command("qemu-system-x86_64", args...)
	vm.cmd.Dir = cwd
	vm.cmd.Stdout, vm.cmd.Stderr = errFile, errFile
	if err := testproc.Start(vm.cmd); err != nil { // no orphan QEMU if the test binary dies
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = vm.cmd.Process.Kill()
		_ = vm.cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(vm.stderr)
			t.Logf("QEMU stderr:\n%s", b)
		}
	})
	eventually(t, 10*time.Second, func() error {
		for _, p := range []string{vm.qmp, vm.test, vm.hmp} {
			if _, err := os.Stat(p); err != nil {
				return err
			}
		}
		return nil
	})
	return vm
}

// eventually polls f until it returns nil, failing with its last error
// after d.
func eventually(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var (
	netnsMu sync.Mutex // one thread at a time leaves the root netns, to keep failures simple to read
	tapSeq  int        // guarded by netnsMu; names differ so that mixed-up fds can be told apart
)

// openTap creates a tap tq<N> in a new network namespace and returns
// one fd per queue (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, plus IFF_MULTI_QUEUE
// when queues > 1). The netns lives until the test ends (an fd on it is
// held); closing the fds and the netns removes everything.
func openTap(t *testing.T, queues int) []*os.File {
	t.Helper()
	requireTaps(t)
	netnsMu.Lock()
	defer netnsMu.Unlock()
	type result struct {
		files []*os.File
		ns    *os.File
		err   error
	}
	tapSeq++
	name := fmt.Sprintf("tq%d", tapSeq)
	// On a thread of its own that goes back to the root netns after.
	var r result
	r.err = datapath.OnThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare netns: %w", err)
		}
		return nil
	}, func() error {
		var err error
		if r.ns, err = os.Open("/proc/thread-self/ns/net"); err != nil {
			return err
		}
		r.files, err = openTapHere(name, queues)
		return err
	})
	t.Cleanup(func() {
		closeFiles(r.files) // those AddNIC took are closed already
		if r.ns != nil {
			r.ns.Close()
		}
	})
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.files
}

// openTapHere opens queues fds of tap name in the calling thread's netns.
//
// Equivalent to: ip tuntap add dev tq1 mode tap vnet_hdr multi_queue (but not persistent).
func openTapHere(name string, queues int) ([]*os.File, error) {
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if queues > 1 {
		flags |= unix.IFF_MULTI_QUEUE
	}
	var files []*os.File
	for q := range queues {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			closeFiles(files)
			return nil, err
		}
		ifr, err := unix.NewIfreq(name)
		if err == nil {
			ifr.SetUint16(flags)
			err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
		}
		if err != nil {
			unix.Close(fd)
			closeFiles(files)
			return nil, fmt.Errorf("TUNSETIFF %s queue %d: %w", name, q, err)
		}
		files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("%s-q%d", name, q)))
	}
	return files, nil
}

func mustMAC(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	mac, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

func checkClosed(t *testing.T, files []*os.File) {
	t.Helper()
	for _, f := range files {
		if err := f.Close(); !errors.Is(err, os.ErrClosed) {
			t.Errorf("%s still open after AddNIC (Close: %v)", f.Name(), err)
		}
	}
}

func findNIC(nics []NICInfo, id string) (NICInfo, bool) {
	for _, n := range nics {
		if n.ID == id {
			return n, true
		}
	}
	return NICInfo{}, false
}

func sameInfo(a, b NICInfo) bool {
	return a.ID == b.ID && a.Index == b.Index && a.Owned == b.Owned && bytes.Equal(a.MAC, b.MAC) &&
		a.Netdev == b.Netdev && a.Bus == b.Bus && a.Addr == b.Addr && a.QOMPath == b.QOMPath && a.PCIPath == b.PCIPath
}

// addNICT adds nic through c with the fds of a new single-queue tap, and
// fails t unless AddNIC took (closed) the fds and reports want.
func addNICT(t *testing.T, c *Client, nic NIC, want NICInfo) {
	t.Helper()
	nic.TapFDs = openTap(t, 1)
	info, err := c.AddNIC(context.Background(), nic)
	if err != nil {
		t.Fatalf("AddNIC %d: %v", nic.Index, err)
	}
	checkClosed(t, nic.TapFDs)
	if !sameInfo(info, want) {
		t.Errorf("AddNIC = %+v\nwant      %+v", info, want)
	}
}

func TestQEMUAddListRemove(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 4)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	mac := mustMAC(t, "02:00:00:00:00:01")

	// rp4 sits in root slot 5 (rp<i> at addr i+1): the agent's devicePath.
	want := NICInfo{ID: "tapsync-net1", Index: 1, Owned: true, MAC: mac, Netdev: "tapsync-netdev1",
		Bus: "rp4", Addr: "00.0", QOMPath: "/machine/peripheral/tapsync-net1", PCIPath: "05/00"}
	addNICT(t, c, NIC{Index: 1, MAC: mac, MTU: 1400, Placement: rootPorts}, want)
	nics, err := c.ListNICs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(nics) != 1 || !sameInfo(nics[0], want) {
		t.Errorf("ListNICs = %+v\nwant      [%+v]", nics, want)
	}
	var hostMTU int
	if err := c.qomGet(ctx, want.QOMPath, "host_mtu", &hostMTU); err != nil || hostMTU != 1400 {
		t.Errorf("host_mtu = %d, %v; want 1400", hostMTU, err)
	}
	netdevs, err := c.ListNetdevs(ctx)
	if err != nil || !slices.Equal(netdevs, []string{"tapsync-netdev1"}) {
		t.Errorf("ListNetdevs = %q, %v", netdevs, err)
	}

	// Again: a no-op that still takes (closes) the new fds.
	addNICT(t, c, NIC{Index: 1, MAC: mac, Placement: rootPorts}, want)
	if nics, _ := c.ListNICs(ctx); len(nics) != 1 {
		t.Errorf("after second AddNIC: %d NICs", len(nics))
	}
	// Same index, other MAC: refused, nothing changed.
	if _, err := c.AddNIC(ctx, NIC{Index: 1, MAC: mustMAC(t, "02:00:00:00:00:99"), TapFDs: openTap(t, 1), Placement: rootPorts}); err == nil {
		t.Error("AddNIC with another MAC for an existing index succeeded")
	}

	// No guest OS acknowledges the ACPI unplug: pending, not hanging.
	for i, wait := range []time.Duration{2 * time.Second, time.Second} {
		start := time.Now()
		err := c.RemoveNIC(ctx, 1, wait)
		d := time.Since(start)
		if !errors.Is(err, ErrRemovalPending) {
			t.Fatalf("RemoveNIC #%d: %v, want ErrRemovalPending", i+1, err)
		}
		if d < wait || d > wait+time.Minute { // it waited, and did not hang
			t.Errorf("RemoveNIC #%d with wait %s returned after %s", i+1, wait, d)
		}
		t.Logf("RemoveNIC #%d: %v (after %s)", i+1, err, d.Round(time.Millisecond))
	}
	nics, _ = c.ListNICs(ctx)
	netdevs, _ = c.ListNetdevs(ctx)
	if _, ok := findNIC(nics, "tapsync-net1"); !ok || !slices.Contains(netdevs, "tapsync-netdev1") {
		t.Errorf("pending removal changed things: NICs %+v, netdevs %q", nics, netdevs)
	}

	// Never added: nothing to do.
	start := time.Now()
	if err := c.RemoveNIC(ctx, 7, 2*time.Second); err != nil {
		t.Errorf("RemoveNIC of a never-added index: %v", err)
	}
	if d := time.Since(start); d > time.Minute { // a hang, not a speed target
		t.Errorf("RemoveNIC of a never-added index took %s", d)
	}
}

func TestQEMUMultiQueue(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 4)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()

	info, err := c.AddNIC(ctx, NIC{Index: 2, MAC: mustMAC(t, "02:00:00:00:00:02"), TapFDs: openTap(t, 2), Placement: rootPorts})
	if err != nil {
		t.Fatal(err)
	}
	var mq bool
	var vectors int
	if err := c.qomGet(ctx, info.QOMPath, "mq", &mq); err != nil || !mq {
		t.Errorf("mq = %v, %v", mq, err)
	}
	if err := c.qomGet(ctx, info.QOMPath, "vectors", &vectors); err != nil || vectors != 6 {
		t.Errorf("vectors = %d, %v; want 6", vectors, err)
	}
	var out string
	if err := c.runInto(ctx, "human-monitor-command", "", map[string]any{"command-line": "info network"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "tapsync-netdev2: index=1,type=tap") {
		t.Errorf("no second queue in info network:\n%s", out)
	}
	if netdevs, err := c.ListNetdevs(ctx); err != nil || !slices.Equal(netdevs, []string{"tapsync-netdev2"}) {
		t.Errorf("ListNetdevs = %q, %v", netdevs, err)
	}

	// Tap fds of two different taps are refused before QEMU sees them.
	mixed := []*os.File{openTap(t, 2)[0], openTap(t, 2)[0]}
	if _, err := c.AddNIC(ctx, NIC{Index: 3, MAC: mustMAC(t, "02:00:00:00:00:03"), TapFDs: mixed, Placement: rootPorts}); err == nil {
		t.Error("AddNIC accepted fds of two taps")
	} else {
		t.Log(err)
	}
	checkClosed(t, mixed)
}

func TestQEMUFailedDeviceAddRollsBack(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 4)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()

	// Someone else takes our device id, with a device that is not a NIC.
	other := dialT(t, vm.test, Options{})
	if _, err := other.run(ctx, "device_add", "", map[string]any{"driver": "virtio-rng-pci", "id": "tapsync-net5", "bus": "rp4"}, nil); err != nil {
		t.Fatal(err)
	}

	taps := openTap(t, 2)
	_, err := c.AddNIC(ctx, NIC{Index: 5, MAC: mustMAC(t, "02:00:00:00:00:05"), TapFDs: taps, Placement: rootPorts})
	var qerr *Error
	if !errors.As(err, &qerr) || qerr.Class != ClassDuplicateID || !strings.HasPrefix(qerr.Cmd, "device_add") {
		t.Fatalf("AddNIC = %v, want device_add failing with DuplicateID", err)
	}
	t.Log(err)
	checkClosed(t, taps)
	netdevs, err := c.ListNetdevs(ctx)
	if err != nil || slices.Contains(netdevs, "tapsync-netdev5") {
		t.Errorf("netdev left behind: ListNetdevs = %q, %v", netdevs, err)
	}
	for q := range 2 {
		_, err := c.run(ctx, "closefd", "", map[string]any{"fdname": fdName(5, q)}, nil)
		if err == nil {
			t.Errorf("fd name %s still in QEMU's table", fdName(5, q))
		}
	}
	checkNoNICs(t, c, "")
}

func TestQEMUUnplugAcknowledged(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	// With native PCIe hot-plug (ACPI hot-plug off) and no guest OS to
	// power the slot on, QEMU completes an unplug at once and sends
	// DEVICE_DELETED: the success path with real QEMU.
	vm := startVM(t, "q35", 2, "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off")
	events := make(chan Event, 100)
	c := dialT(t, vm.qmp, Options{OnEvent: func(e Event) {
		select {
		case events <- e:
		default:
		}
	}})
	addRemoveRounds(t, c, c, Placement{Hotplug: HotplugAny})
	seen := false
	for len(events) > 0 {
		if e := <-events; e.Name == "DEVICE_DELETED" && e.Data["device"] == "tapsync-net2" {
			seen = true
		}
	}
	if !seen {
		t.Error("OnEvent never saw DEVICE_DELETED for tapsync-net2")
	}
}

// addRemoveRounds adds NIC 2 through c at placement and removes it, in two
// rounds (its ids are free for reuse once QEMU deleted the device). Each
// removal must complete within 10 s, leave nothing that look sees, and
// succeed again when repeated.
func addRemoveRounds(t *testing.T, c, look *Client, placement Placement) {
	t.Helper()
	ctx := context.Background()
	for round := 1; round <= 2; round++ {
		if _, err := c.AddNIC(ctx, NIC{Index: 2, MAC: mustMAC(t, "02:00:00:00:00:02"), TapFDs: openTap(t, 2), Placement: placement}); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		start := time.Now()
		if err := c.RemoveNIC(ctx, 2, 10*time.Second); err != nil {
			t.Fatalf("round %d: RemoveNIC: %v", round, err)
		}
		t.Logf("round %d: gone after %s", round, time.Since(start).Round(time.Millisecond))
		checkNoNICs(t, look, fmt.Sprintf("round %d: ", round))
		if err := c.RemoveNIC(ctx, 2, time.Second); err != nil {
			t.Errorf("round %d: second RemoveNIC: %v", round, err)
		}
	}
}

// checkNoNICs fails t unless c finds no NIC and no netdev in its VM; prefix
// says when.
func checkNoNICs(t *testing.T, c *Client, prefix string) {
	t.Helper()
	ctx := context.Background()
	if nics, err := c.ListNICs(ctx); err != nil || len(nics) != 0 {
		t.Errorf("%sListNICs = %+v, %v; want none", prefix, nics, err)
	}
	if netdevs, err := c.ListNetdevs(ctx); err != nil || len(netdevs) != 0 {
		t.Errorf("%sListNetdevs = %q, %v; want none", prefix, netdevs, err)
	}
}

func TestQEMUDialBusy(t *testing.T) {
	t.Parallel()
	vm := startVM(t, "q35", 0)

	// Another client holds the monitor.
	holder, err := net.Dial("unix", vm.qmp)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if _, err := bufio.NewReader(holder).ReadString('\n'); err != nil {
		t.Fatalf("holder got no greeting: %v", err)
	}

	start := time.Now()
	_, err = Dial(context.Background(), vm.qmp, Options{Timeout: time.Second})
	d := time.Since(start)
	if !errors.Is(err, ErrNoGreeting) || !strings.Contains(err.Error(), "another client probably holds the monitor") {
		t.Fatalf("Dial = %v, want ErrNoGreeting", err)
	}
	if d > time.Minute { // a hang, not a speed target
		t.Errorf("Dial with a 1s timeout took %s", d)
	}
	t.Logf("after %s: %v", d.Round(time.Millisecond), err)

	// Once the holder lets go, the monitor serves us.
	holder.Close()
	eventually(t, 10*time.Second, func() error {
		c, err := Dial(context.Background(), vm.qmp, Options{Timeout: time.Second})
		if err == nil {
			c.Close()
		}
		return err
	})
}

func TestQEMUNoFreeSlot(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 0)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	taps := openTap(t, 1)
	_, err := c.AddNIC(ctx, NIC{Index: 1, MAC: mustMAC(t, "02:00:00:00:00:01"), TapFDs: taps})
	if !errors.Is(err, ErrNoFreeSlot) || !strings.Contains(err.Error(), vm.qmp) {
		t.Fatalf("AddNIC = %v, want ErrNoFreeSlot naming %s", err, vm.qmp)
	}
	t.Log(err)
	checkClosed(t, taps)
	if netdevs, err := c.ListNetdevs(ctx); err != nil || len(netdevs) != 0 {
		t.Errorf("ListNetdevs = %q, %v; want none", netdevs, err)
	}
}

func TestQEMUPCMachine(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "pc", 0)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	info, err := c.AddNIC(ctx, NIC{Index: 4, MAC: mustMAC(t, "02:00:00:00:00:04"), TapFDs: openTap(t, 1)})
	if err != nil {
		t.Fatal(err)
	}
	// Slot 0 is the host bridge, slot 1 PIIX3.
	if info.Bus != "pci.0" || info.Addr != "1f.0" {
		t.Errorf("AddNIC placed the NIC at %s %s, want pci.0 1f.0 (the top free slot)", info.Bus, info.Addr)
	}
	nics, err := c.ListNICs(ctx)
	if err != nil || len(nics) != 1 || !sameInfo(nics[0], info) {
		t.Errorf("ListNICs = %+v, %v\nwant [%+v]", nics, err, info)
	}
}

func TestQEMUListsForeignNICs(t *testing.T) {
	t.Parallel()
	// As Kata cold-plugs them: no id, and one with an id not ours.
	vm := startVM(t, "q35", 1,
		"-netdev", "hubport,id=hp0,hubid=0",
		"-device", "virtio-net-pci,netdev=hp0,mac=02:00:00:00:00:a0,romfile=,bus=rp1",
		"-device", "virtio-net-pci,id=kata1,mac=02:00:00:00:00:a1,romfile=,bus=pcie.0,addr=0x7",
	)
	c := dialT(t, vm.qmp, Options{})
	nics, err := c.ListNICs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []NICInfo{
		{ID: "", Index: -1, MAC: mustMAC(t, "02:00:00:00:00:a0"), Netdev: "hp0", Bus: "rp1", Addr: "00.0", PCIPath: "02/00"}, // no id: no QOM path
		{ID: "kata1", Index: -1, MAC: mustMAC(t, "02:00:00:00:00:a1"), Bus: "pcie.0", Addr: "07.0", QOMPath: "/machine/peripheral/kata1", PCIPath: "07"},
	}
	if len(nics) != len(want) {
		t.Fatalf("ListNICs = %+v\nwant      %+v", nics, want)
	}
	for i := range want {
		if !sameInfo(nics[i], want[i]) {
			t.Errorf("ListNICs[%d] = %+v\nwant        %+v", i, nics[i], want[i])
		}
	}
	if netdevs, err := c.ListNetdevs(context.Background()); err != nil || !slices.Equal(netdevs, []string{"hp0"}) {
		t.Errorf("ListNetdevs = %q, %v", netdevs, err)
	}
}

func TestQEMUExit(t *testing.T) {
	t.Parallel()
	vm := startVM(t, "q35", 0)
	killQEMU(t, vm, dialT(t, vm.qmp, Options{}))
}

// killQEMU kills vm's QEMU and fails t unless c finds its connection dead:
// Done closed, commands failing with ErrClosed.
func killQEMU(t *testing.T, vm *testVM, c *Client) {
	t.Helper()
	if err := vm.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, c.Done(), 5*time.Second, "Done() after QEMU died")
	if _, err := c.ListNICs(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("ListNICs = %v, want ErrClosed", err)
	}
	t.Log(c.Err())
}

func TestVCPUs(t *testing.T) {
	vm := startVM(t, "q35", 0, "-smp", "3")
	var c *Client
	eventually(t, 10*time.Second, func() (err error) {
		c, err = Dial(t.Context(), vm.qmp, Options{})
		return err
	})
	defer c.Close()
	n, err := c.VCPUs(t.Context())
	if err != nil || n != 3 {
		t.Fatalf("VCPUs = %d, %v; want 3", n, err)
	}
}

// TestQEMUKataBridge hot-plugs into a q35 started the way Kata starts it:
// one pci-bridge in slot 2 of pcie.0 (Kata's flags) and no root ports.
func TestQEMUKataBridge(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 0,
		"-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m")
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()

	capa, err := c.HotplugCapacity(ctx, Placement{})
	if err != nil || capa.Free() != 31 || len(capa.Buses) != 1 || capa.Buses[0].Bus != "pci-bridge-0" || capa.Buses[0].PCIPath != "02" {
		t.Fatalf("HotplugCapacity = %s, %v; want 31 free slots on pci-bridge-0 (02)", capa, err)
	}
	if _, err := c.AddNIC(ctx, NIC{Index: 9, MAC: mustMAC(t, "02:00:00:00:00:09"), TapFDs: openTap(t, 1), Placement: rootPorts}); !errors.Is(err, ErrNoFreeSlot) ||
		!strings.Contains(err.Error(), "no PCIe root port") {
		t.Errorf("AddNIC with hotplug = root-port = %v, want ErrNoFreeSlot saying there is no root port", err)
	}

	// Kata takes bridge slots from 1 upward; keep 1..28 for it so that the
	// bridge fills after three NICs.
	place := Placement{Reserved: SlotRange{1, 28}}
	for i, want := range []string{"02/1f", "02/1e", "02/1d"} {
		info, err := c.AddNIC(ctx, NIC{Index: i + 1, MAC: mustMAC(t, fmt.Sprintf("02:00:00:00:00:%02x", i+1)), TapFDs: openTap(t, 2), Placement: place})
		if err != nil {
			t.Fatal(err)
		}
		if info.PCIPath != want || info.Bus != "pci-bridge-0" {
			t.Errorf("NIC %d at %s %s (%s), want pci-bridge-0 %s", i+1, info.Bus, info.Addr, info.PCIPath, want)
		}
	}

	taps := openTap(t, 2)
	_, err = c.AddNIC(ctx, NIC{Index: 4, MAC: mustMAC(t, "02:00:00:00:00:04"), TapFDs: taps, Placement: place})
	if !errors.Is(err, ErrNoFreeSlot) || !strings.Contains(err.Error(), vm.qmp) ||
		!strings.Contains(err.Error(), "no free slot on pci-bridge pci-bridge-0 (3 taken, 28 reserved)") {
		t.Fatalf("AddNIC on a full bridge = %v, want ErrNoFreeSlot naming the bridge and %s", err, vm.qmp)
	}
	t.Log(err)
	checkClosed(t, taps)

	// QEMU is fine and nothing of the failed add is left.
	netdevs, err := c.ListNetdevs(ctx)
	if err != nil || !slices.Equal(netdevs, []string{"tapsync-netdev1", "tapsync-netdev2", "tapsync-netdev3"}) {
		t.Errorf("ListNetdevs = %q, %v; want the three NICs' netdevs", netdevs, err)
	}
	for q := range 2 {
		if _, err := c.run(ctx, "closefd", "", map[string]any{"fdname": fdName(4, q)}, nil); err == nil {
			t.Errorf("fd name %s left in QEMU's table", fdName(4, q))
		}
	}
	nics, err := c.ListNICs(ctx)
	if err != nil || len(nics) != 3 {
		t.Errorf("ListNICs = %+v, %v; want 3", nics, err)
	}
	if capa, err := c.HotplugCapacity(ctx, place); err != nil || capa.Free() != 0 || capa.Buses[0].Taken != 3 || capa.Buses[0].Held != 28 {
		t.Errorf("HotplugCapacity after filling = %s, %v", capa, err)
	}
	// Without the reservation the next NIC takes the slot below ours.
	info, err := c.AddNIC(ctx, NIC{Index: 5, MAC: mustMAC(t, "02:00:00:00:00:05"), TapFDs: openTap(t, 1)})
	if err != nil || info.PCIPath != "02/1c" {
		t.Errorf("AddNIC without reservation = %+v, %v; want 02/1c", info, err)
	}
}

// ReadDevices reads in one round trip what ReadVM reads in two, but for
// a netdev without a device: its Netdevs are those of the NICs.
func TestQEMUReadDevices(t *testing.T) {
	t.Parallel()
	vm := startVM(t, "q35", 1,
		"-netdev", "hubport,id=hp0,hubid=0",
		"-device", "virtio-net-pci,id=kata1,netdev=hp0,mac=02:00:00:00:00:a1,romfile=,bus=rp1",
		"-netdev", "hubport,id=alone,hubid=0",
	)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	before := c.Commands()
	dev, err := c.ReadDevices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := c.Commands() - before; n != 1 {
		t.Errorf("ReadDevices sent %d commands, want 1", n)
	}
	full, err := c.ReadVM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dev.Netdevs, []string{"hp0"}) {
		t.Errorf("ReadDevices netdevs = %q, want the NIC's only", dev.Netdevs)
	}
	if got := slices.Sorted(slices.Values(full.Netdevs)); !slices.Equal(got, []string{"alone", "hp0"}) {
		t.Errorf("ReadVM netdevs = %q, want both", full.Netdevs)
	}
	if len(dev.NICs) != 1 || !sameInfo(dev.NICs[0], full.NICs[0]) || len(full.NICs) != 1 {
		t.Errorf("NICs: ReadDevices %+v, ReadVM %+v", dev.NICs, full.NICs)
	}
}

// TestQEMUReadNetwork: info network, in one command, gives the NICs (ids,
// MACs, netdevs) and the netdevs that the device tree and the netdev
// listing give in two, for ours (multiqueue), Kata's cold-plugged ones
// (with and without an id, on hub ports) and a netdev without a NIC.
func TestQEMUReadNetwork(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 2,
		"-netdev", "hubport,id=hp0,hubid=0",
		"-device", "virtio-net-pci,netdev=hp0,mac=02:00:00:00:00:a0,romfile=,bus=rp1",
		"-netdev", "hubport,id=hp1,hubid=1",
		"-device", "virtio-net-pci,id=kata1,netdev=hp1,mac=02:00:00:00:00:a1,romfile=,bus=pcie.0,addr=0x7",
		"-netdev", "hubport,id=alone,hubid=2",
	)
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	if _, err := c.AddNIC(ctx, NIC{Index: 2, MAC: mustMAC(t, "02:00:00:00:00:02"), TapFDs: openTap(t, 2), Placement: rootPorts}); err != nil {
		t.Fatal(err)
	}
	before := c.Commands()
	got, err := c.ReadNetwork(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := c.Commands() - before; n != 1 {
		t.Errorf("ReadNetwork sent %d commands, want 1", n)
	}
	full, err := c.ReadVM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := slices.Sorted(slices.Values(got.Netdevs)), slices.Sorted(slices.Values(full.Netdevs)); !slices.Equal(a, b) {
		t.Errorf("netdevs: ReadNetwork %q, ReadVM %q", a, b)
	}
	if len(got.NICs) != len(full.NICs) || len(full.NICs) != 3 {
		t.Fatalf("NICs: ReadNetwork %+v\nReadVM %+v", got.NICs, full.NICs)
	}
	if !got.NICs[0].Owned || got.NICs[0].Index != 2 {
		t.Errorf("ReadNetwork lists %+v first, want ours", got.NICs[0])
	}
	for _, n := range full.NICs {
		i := slices.IndexFunc(got.NICs, func(g NICInfo) bool { return bytes.Equal(g.MAC, n.MAC) })
		if i < 0 {
			t.Errorf("ReadNetwork has no NIC with MAC %s: %+v", n.MAC, got.NICs)
			continue
		}
		g := got.NICs[i]
		if n.ID == "" {
			n.ID = g.ID // QEMU names a NIC without an id after its model
		}
		if !n.Owned {
			n.QOMPath = "" // only an id of ours is known to be the device's
		}
		if g.ID != n.ID || g.Index != n.Index || g.Owned != n.Owned || g.Netdev != n.Netdev || g.QOMPath != n.QOMPath {
			t.Errorf("NIC %s: ReadNetwork %+v, ReadVM %+v", n.MAC, g, n)
		}
	}
}
