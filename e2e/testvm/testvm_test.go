package testvm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
)

func TestAddresses(t *testing.T) {
	tests := []struct {
		n           int
		mac         string
		guest, peer string
	}{
		{0, "02:54:53:00:00:02", "10.99.0.2", "10.99.0.1"},
		{1, "02:54:53:00:01:02", "10.99.1.2", "10.99.1.1"},
		{200, "02:54:53:00:c8:02", "10.99.200.2", "10.99.200.1"},
		{255, "02:54:53:00:ff:02", "10.99.255.2", "10.99.255.1"},
	}
	for _, tt := range tests {
		mac := TestMAC(tt.n)
		if mac.String() != tt.mac {
			t.Errorf("TestMAC(%d) = %s, want %s", tt.n, mac, tt.mac)
		}
		if mac[0]&0x02 == 0 || mac[0]&0x01 != 0 {
			t.Errorf("TestMAC(%d) = %s is not a locally administered unicast address", tt.n, mac)
		}
		if got := GuestIP(mac).String(); got != tt.guest {
			t.Errorf("GuestIP(%s) = %s, want %s", mac, got, tt.guest)
		}
		if got := PeerIP(mac).String(); got != tt.peer {
			t.Errorf("PeerIP(%s) = %s, want %s", mac, got, tt.peer)
		}
		subnet := &net.IPNet{IP: PeerIP(mac), Mask: net.CIDRMask(PrefixLen, 32)}
		if !subnet.Contains(GuestIP(mac)) {
			t.Errorf("GuestIP %s not in the peer's /%d %s", GuestIP(mac), PrefixLen, subnet)
		}
	}
	// Any MAC works, not only TestMAC's.
	mac, _ := net.ParseMAC("52:54:00:12:0a:ff")
	if got := GuestIP(mac).String(); got != "10.99.10.255" {
		t.Errorf("GuestIP(%s) = %s, want 10.99.10.255", mac, got)
	}
	if GuestIP(net.HardwareAddr{1, 2, 3}) != nil || PeerIP(nil) != nil {
		t.Error("GuestIP/PeerIP of a non-Ethernet address should be nil")
	}
	for _, n := range []int{-1, 256} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("TestMAC(%d) did not panic", n)
				}
			}()
			TestMAC(n)
		}()
	}
}

func TestMarkerRegexps(t *testing.T) {
	mac := TestMAC(7)
	tests := []struct {
		re   *regexp.Regexp
		line string
		want []string // nil: no match
	}{
		{ReadyRE(), "TAPSYNC-READY", []string{"TAPSYNC-READY"}},
		{ReadyRE(), "TAPSYNC-READY \r", []string{"TAPSYNC-READY \r"}},
		{ReadyRE(), "echo TAPSYNC-READY-not", nil},
		{NICUpRE(mac), "TAPSYNC-NIC-UP eth0 02:54:53:00:07:02 10.99.7.2", []string{"", "eth0", "10.99.7.2"}},
		// A kernel message glued to the front of the line still matches.
		{NICUpRE(mac), "[ 1.2] virtio_netTAPSYNC-NIC-UP eth1 02:54:53:00:07:02 10.99.7.2", []string{"", "eth1", "10.99.7.2"}},
		{NICUpRE(mac), "TAPSYNC-NIC-UP eth0 02:54:53:00:08:02 10.99.8.2", nil},
		{NICUpRE(mac), "TAPSYNC-NIC-GONE eth0 02:54:53:00:07:02", nil},
		{NICGoneRE(mac), "TAPSYNC-NIC-GONE eth0 02:54:53:00:07:02", []string{"", "eth0"}},
		{NICGoneRE(mac), "TAPSYNC-NIC-GONE eth0 02:54:53:00:07:021", nil},
		{AgentStartRE(0), "TAPSYNC-AGENT-START 12", []string{"", "12"}},
		{AgentStartRE(2), "TAPSYNC-AGENT-START 2\r", []string{"", "2"}},
		{AgentStartRE(2), "TAPSYNC-AGENT-START 12", nil},
		{AgentStartRE(1), "TAPSYNC-AGENT-START 12", nil},
		{AgentExitRE(1), "TAPSYNC-AGENT-EXIT 1 0", []string{"", "1", "0"}},
		{AgentExitRE(0), "TAPSYNC-AGENT-EXIT 3 2", []string{"", "3", "2"}},
		{AgentExitRE(1), "TAPSYNC-AGENT-EXIT 11 0", nil},
	}
	for _, tt := range tests {
		m := tt.re.FindStringSubmatch(tt.line)
		if (m == nil) != (tt.want == nil) {
			t.Errorf("%v on %q: match %q, want %q", tt.re, tt.line, m, tt.want)
			continue
		}
		for i := 1; i < len(tt.want); i++ {
			if m[i] != tt.want[i] {
				t.Errorf("%v on %q: submatch %d = %q, want %q", tt.re, tt.line, i, m[i], tt.want[i])
			}
		}
	}
}

// TestInitScriptMarkers keeps init.sh and the Go markers in step, and checks
// that the script parses under the same shell the guest runs.
func TestInitScriptMarkers(t *testing.T) {
	for _, m := range []string{MarkerReady, MarkerAgentStart, MarkerAgentExit, MarkerNICUp, MarkerNICGone, MarkerNICError} {
		if !bytes.Contains(initScript, []byte("echo \""+m+" ")) && !bytes.Contains(initScript, []byte("echo "+m+"\n")) {
			t.Errorf("init.sh does not print %s", m)
		}
	}
	if _, err := os.Stat(busyboxPath); err != nil {
		t.Skipf("no %s to syntax-check init.sh (install busybox-static)", busyboxPath)
	}
	cmd := exec.Command(busyboxPath, "sh", "-n", "-s")
	cmd.Stdin = bytes.NewReader(initScript)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("busybox sh -n init.sh: %v: %s", err, out)
	}
}

func TestChooseAccelExplicit(t *testing.T) {
	tests := []struct {
		opt, env, want string // want "": an error
	}{
		{"tcg", "", "tcg"},
		{"kvm", "", "kvm"},
		{"kvm", "tcg", "tcg"}, // the environment wins, so CI can force TCG
		{"", "kvm", "kvm"},
		{"", "qemu", ""},
		{"fast", "", ""},
	}
	for _, tt := range tests {
		t.Setenv(EnvAccel, tt.env)
		got, err := chooseAccel(context.Background(), Options{Accel: tt.opt})
		if got != tt.want || (err != nil) != (tt.want == "") {
			t.Errorf("Accel %q, $%s=%q: %q, %v; want %q", tt.opt, EnvAccel, tt.env, got, err, tt.want)
		}
	}
}

func TestModuleName(t *testing.T) {
	tests := map[string]string{
		"kernel/drivers/net/virtio_net.ko":     "virtio_net",
		"kernel/drivers/char/virtio-rng.ko.xz": "virtio_rng",
		"x/net_failover.ko.zst":                "net_failover",
		"failover.ko.gz":                       "failover",
		"modules.builtin":                      "",
		"kernel/foo.ko.bz2":                    "",
	}
	for in, want := range tests {
		got, ok := moduleName(in)
		if ok != (want != "") || got != want {
			t.Errorf("moduleName(%q) = %q, %v; want %q", in, got, ok, want)
		}
	}
}

func TestParseKernelDepends(t *testing.T) {
	tests := []struct {
		out  string
		want kernelPackage // zero: not found
	}{
		{"Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n",
			kernelPackage{"linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"}},
		{"Depends: initramfs-tools | linux-initramfs-tool, linux-image-6.12.9-cloud-amd64 (= 6.12.9-1), kmod\n",
			kernelPackage{"linux-image-6.12.9-cloud-amd64", "6.12.9-1"}},
		{"Depends: linux-image-6.1.0-56-cloud-amd64\n", kernelPackage{}}, // no exact version
		{"Pre-Depends: linux-image-x (= 1)\n", kernelPackage{}},
		{"", kernelPackage{}},
	}
	for _, tt := range tests {
		got, ok := parseKernelDepends(tt.out)
		if ok != (tt.want != kernelPackage{}) || got != tt.want {
			t.Errorf("parseKernelDepends(%q) = %+v, %v; want %+v", tt.out, got, ok, tt.want)
		}
	}
}

// cpioEntry is one entry as read back from an archive.
type cpioEntry struct {
	name         string
	mode         uint32
	nlink        uint32
	rmaj, rmin   uint32
	data         []byte
	headerOffset int
}

// parseNewc is an independent reader for the format, strict about what the
// kernel is strict about: magic, 4-byte alignment, NUL-terminated names,
// and the trailer at the end.
func parseNewc(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	for {
		if off%4 != 0 {
			t.Fatalf("header at %d not 4-byte aligned", off)
		}
		if len(b)-off < 110 {
			t.Fatalf("truncated header at %d", off)
		}
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			t.Fatalf("bad magic %q at %d", h[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatalf("field %d at %d: %v", i, off, err)
			}
			return uint32(v)
		}
		size, nameSize := int(field(6)), int(field(11))
		e := cpioEntry{mode: field(1), nlink: field(4), rmaj: field(9), rmin: field(10), headerOffset: off}
		if field(2) != 0 || field(3) != 0 || field(5) != 0 || field(12) != 0 {
			t.Errorf("entry at %d: uid/gid/mtime/check not zero", off)
		}
		name := b[off+110 : off+110+nameSize]
		if name[len(name)-1] != 0 {
			t.Fatalf("entry at %d: name not NUL-terminated", off)
		}
		e.name = string(name[:len(name)-1])
		off = (off + 110 + nameSize + 3) &^ 3
		e.data = b[off : off+size]
		off = (off + size + 3) &^ 3
		if e.name == "TRAILER!!!" {
			if off != len(b) {
				t.Errorf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, e)
	}
}

func TestCPIOWriter(t *testing.T) {
	var buf bytes.Buffer
	cw := newCPIOWriter(&buf)
	check := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	check(cw.Dir("bin", 0o755))
	check(cw.Dir("/dev/", 0o755)) // leading and trailing slashes are dropped
	check(cw.CharDev("dev/console", 0o600, 5, 1))
	check(cw.File("bin/busybox", 0o755, []byte("#!fake\n")))   // 7 bytes: needs padding
	check(cw.File("init", 0o755, []byte("abcd")))              // already aligned
	check(cw.File("empty", 0o644, nil))                        // no data at all
	check(cw.Symlink("bin/sh", "/bin/busybox"))                //
	check(cw.File("a-rather-long-name.txt", 0o600, []byte{0})) //
	check(cw.Close())
	check(cw.Close()) // idempotent
	if err := cw.File("late", 0o644, nil); err == nil {
		t.Error("File after Close succeeded")
	}

	want := []cpioEntry{
		{name: "bin", mode: cpioTypeDir | 0o755, nlink: 2},
		{name: "dev", mode: cpioTypeDir | 0o755, nlink: 2},
		{name: "dev/console", mode: cpioTypeCharDev | 0o600, nlink: 1, rmaj: 5, rmin: 1},
		{name: "bin/busybox", mode: cpioTypeRegular | 0o755, nlink: 1, data: []byte("#!fake\n")},
		{name: "init", mode: cpioTypeRegular | 0o755, nlink: 1, data: []byte("abcd")},
		{name: "empty", mode: cpioTypeRegular | 0o644, nlink: 1},
		{name: "bin/sh", mode: cpioTypeSymlink | 0o777, nlink: 1, data: []byte("/bin/busybox")},
		{name: "a-rather-long-name.txt", mode: cpioTypeRegular | 0o600, nlink: 1, data: []byte{0}},
	}
	got := parseNewc(t, buf.Bytes())
	if len(got) != len(want) {
		t.Fatalf("read back %d entries, want %d", len(got), len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.name != w.name || g.mode != w.mode || g.nlink != w.nlink || g.rmaj != w.rmaj || g.rmin != w.rmin || !bytes.Equal(g.data, w.data) {
			t.Errorf("entry %d = %+v, want %+v", i, g, w)
		}
	}

	// Cross-check with GNU cpio when it is installed: it must list the same
	// names with the same types.
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Log("cpio not installed; checked with the built-in reader only")
		return
	}
	cmd := exec.Command("cpio", "-t", "-v", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -tv: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != len(want) {
		t.Fatalf("cpio -tv listed %d entries, want %d:\n%s", len(lines), len(want), out)
	}
	for i, w := range want {
		typ := map[uint32]string{cpioTypeDir: "d", cpioTypeRegular: "-", cpioTypeSymlink: "l", cpioTypeCharDev: "c"}[w.mode&0o170000]
		if !strings.HasPrefix(lines[i], typ) || !strings.Contains(lines[i], " "+w.name) {
			t.Errorf("cpio -tv line %d = %q, want type %s name %s", i, lines[i], typ, w.name)
		}
	}
}

// fakeVM is a VM with a serial file and no QEMU, for WaitSerialFrom.
func fakeVM(t *testing.T) (*VM, *os.File) {
	dir := t.TempDir()
	v := &VM{Serial: filepath.Join(dir, "serial.log"), Log: filepath.Join(dir, "qemu.log"), exited: make(chan struct{})}
	f, err := os.Create(v.Serial)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return v, f
}

func TestWaitSerial(t *testing.T) {
	v, f := fakeVM(t)
	mac := TestMAC(3)
	fmt.Fprintf(f, "boot noise\r\nTAPSYNC-READY\r\nTAPSYNC-NIC-UP eth0 %s 10.99.3.2\r\n", mac)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := v.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	m, err := v.WaitSerial(ctx, NICUpRE(mac))
	if err != nil || m[1] != "eth0" || m[2] != "10.99.3.2" {
		t.Fatalf("WaitSerial(NIC-UP) = %q, %v", m, err)
	}

	// From an offset: the earlier NIC-UP must not count, a later one must,
	// also when it arrives in pieces.
	off := v.SerialOffset()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fmt.Fprintf(f, "TAPSYNC-NIC-GONE eth0 %s\r\nTAPSYNC-NIC-UP eth1 %s", mac, mac)
		time.Sleep(120 * time.Millisecond) // lets the reader see a partial line
		fmt.Fprintf(f, " 10.99.3.2\r\n")
	}()
	m, err = v.WaitSerialFrom(ctx, off, NICUpRE(mac))
	<-done
	if err != nil || m[1] != "eth1" {
		t.Fatalf("WaitSerialFrom(NIC-UP) = %q, %v; want eth1", m, err)
	}

	// A timeout names what was awaited and shows the last lines.
	short, cancel2 := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel2()
	_, err = v.WaitSerialFrom(short, v.SerialOffset(), regexp.MustCompile("never"))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "TAPSYNC-NIC-UP eth1") {
		t.Errorf("timeout error = %v; want deadline exceeded with the serial tail", err)
	}

	// QEMU exiting ends the wait at once, even without a deadline.
	close(v.exited)
	_, err = v.WaitSerial(context.Background(), regexp.MustCompile("never"))
	if err == nil || !strings.Contains(err.Error(), "exited") {
		t.Errorf("wait after exit = %v; want an exit error", err)
	}
}

// testBuild builds (or reuses) the image for the privileged tests.
func testBuild(t *testing.T) Image {
	t.Helper()
	skipUnlessRoot(t)
	ctx, cancel := context.WithTimeout(t.Context(), buildTimeout)
	defer cancel()
	start := time.Now()
	img, err := Build(ctx, "", t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Build: %v (%s)", time.Since(start).Round(time.Millisecond), img.Name)
	return img
}

func TestVMLifecycle(t *testing.T) {
	img := testBuild(t)
	ctx, cancel := context.WithTimeout(t.Context(), readyTimeout)
	defer cancel()
	start := time.Now()
	vm, err := Start(ctx, Options{Image: &img, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = vm.Stop() })
	started := time.Since(start)
	if err := vm.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("accel %s: QMP up after %v, READY after %v", vm.Accel, started.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))

	if !vm.Alive() || syscall.Kill(vm.Pid, 0) != nil {
		t.Fatalf("QEMU pid %d not alive after READY", vm.Pid)
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", vm.Pid)); !strings.HasPrefix(string(comm), "qemu-system") {
		t.Errorf("pid %d is %q, want QEMU itself", vm.Pid, comm)
	}
	for _, s := range []string{vm.QMP, vm.TestQMP} {
		if err := qmpAnswers(s); err != nil { // each socket takes a new client after Start's probe
			t.Errorf("QMP socket %s: %v", s, err)
		}
	}

	if err := vm.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := vm.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if vm.Alive() {
		t.Error("Alive after Stop")
	}
	if err := syscall.Kill(vm.Pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("kill -0 %d after Stop: %v, want ESRCH", vm.Pid, err)
	}
	for _, p := range []string{vm.Dir, vm.Serial, vm.QMP, vm.TestQMP, vm.Log} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after Stop (err %v)", p, err)
		}
	}
}

// TestVMExitReported: a QEMU that cannot start, and a guest whose kernel
// panics, both end the wait at once with QEMU's and the console's last words.
func TestVMExitReported(t *testing.T) {
	img := testBuild(t)
	ctx, cancel := context.WithTimeout(t.Context(), readyTimeout)
	defer cancel()

	_, err := Start(ctx, Options{Image: &Image{Kernel: "/nonexistent/vmlinuz", Initrd: img.Initrd}, Accel: "tcg"})
	if err == nil || !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "/nonexistent/vmlinuz") {
		t.Errorf("Start with a missing kernel: %v; want an exit error quoting QEMU", err)
	}
	t.Logf("missing kernel reported: %v", err)

	// Not a gzip'd cpio: the kernel finds no init, panics, and panic=-1 with
	// -no-reboot turns that into QEMU exiting.
	junk := filepath.Join(t.TempDir(), "junk.img")
	if err := os.WriteFile(junk, bytes.Repeat([]byte("junk"), 1024), 0o644); err != nil {
		t.Fatal(err)
	}
	vm, err := Start(ctx, Options{Image: &Image{Kernel: img.Kernel, Initrd: junk}, Accel: "tcg"})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Stop()
	start := time.Now()
	err = vm.WaitReady(ctx)
	if err == nil || !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "Kernel panic") {
		t.Errorf("WaitReady with a panicking guest: %v; want an exit error with the panic", err)
	}
	t.Logf("panic reported after %v: %v", time.Since(start).Round(time.Millisecond), err)
}

func TestVMInNetNS(t *testing.T) {
	skipUnlessRoot(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("no ip command (install iproute2)")
	}
	ns := "tapsync-testvm-" + strings.ToLower(rand.Text()[:8])
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "delete", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete %s: %v: %s", ns, err, out)
		}
	})
	nsPath := "/var/run/netns/" + ns

	// A caller's Dir: logs stay after Stop, sockets go.
	dir := filepath.Join(os.TempDir(), "tapsync-testvm-"+ns[len("tapsync-testvm-"):])
	t.Cleanup(func() { os.RemoveAll(dir) })
	vm := ForTest(t, Options{NetNS: nsPath, Dir: dir, RootPorts: 2})

	want, err := os.Stat(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.Stat(fmt.Sprintf("/proc/%d/ns/net", vm.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(want, got) {
		t.Errorf("QEMU pid %d is not in netns %s", vm.Pid, nsPath)
	}
	if err := vm.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{vm.QMP, vm.TestQMP} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket %s still exists after Stop (err %v)", p, err)
		}
	}
	if b, err := os.ReadFile(vm.Serial); err != nil || !bytes.Contains(b, []byte(MarkerReady)) {
		t.Errorf("serial log in the caller's Dir after Stop: %v, READY seen %v", err, bytes.Contains(b, []byte(MarkerReady)))
	}
}

// TestGuestNICHotplug checks the guest side of the contract the e2e tests
// build on: a hot-added virtio-net NIC, on a root port or on the
// pci-bridge, is announced with GuestIP, and a device_del is acknowledged
// by the guest (DEVICE_DELETED) and announced.
func TestGuestNICHotplug(t *testing.T) {
	vm := ForTest(t, Options{SelfConfig: true})
	q := dialTestQMP(t, vm.TestQMP)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()

	// Two ports and the two top slots of the
	// bridge, where tapsync's default placement puts NICs.
	for _, p := range []struct {
		n         int
		bus, addr string
	}{{1, "rp1", ""}, {2, "rp2", ""}, {3, BridgeID, "0x1f"}, {4, BridgeID, "0x1e"}} {
		n := p.n
		mac := TestMAC(n)
		id := fmt.Sprintf("testvm-nic%d", n)
		start := time.Now()
		up := vm.SerialOffset()
		args := map[string]any{"driver": "virtio-net-pci", "id": id, "bus": p.bus, "mac": mac.String()}
		if p.addr != "" {
			args["addr"] = p.addr
		}
		if _, err := q.run("device_add", args); err != nil {
			t.Fatalf("device_add %s on %s: %v", id, p.bus, err)
		}
		m, err := vm.WaitSerialFrom(ctx, up, NICUpRE(mac))
		if err != nil {
			t.Fatal(err)
		}
		if m[2] != GuestIP(mac).String() {
			t.Errorf("guest gave %s address %s, want %s", mac, m[2], GuestIP(mac))
		}
		t.Logf("%s on %s %s: NIC-UP as %s %s after %v", id, p.bus, p.addr, m[1], m[2], time.Since(start).Round(time.Millisecond))

		off := vm.SerialOffset()
		start = time.Now()
		if _, err := q.run("device_del", map[string]any{"id": id}); err != nil {
			t.Fatalf("device_del %s: %v", id, err)
		}
		if err := q.waitEvent(ctx, "DEVICE_DELETED", id); err != nil {
			t.Fatalf("DEVICE_DELETED %s: %v", id, err)
		}
		deleted := time.Since(start)
		if _, err := vm.WaitSerialFrom(ctx, off, NICGoneRE(mac)); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: DEVICE_DELETED after %v, NIC-GONE after %v", id, deleted.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	}
}

// TestGuestAgent checks the guest agent the e2e tests talk to: it answers
// on both ports, lists no NIC in a guest without one, outlives its own
// restart (test-only Restart, /init starts it again) and hosts that hang up
// and connect again at once, on one port while a client of the other port
// stays connected.
func TestGuestAgent(t *testing.T) {
	vm := ForTest(t, Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if _, err := vm.WaitSerial(ctx, AgentStartRE(1)); err != nil {
		t.Fatal(err)
	}
	dial := func(url string) *agent.Client {
		t.Helper()
		u, err := agent.ParseURL(url)
		if err != nil {
			t.Fatal(err)
		}
		// Generous: under TCG the agent may still be starting.
		c, err := agent.Dial(ctx, u, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	check := func(c *agent.Client, what string) {
		t.Helper()
		start := time.Now()
		if err := c.Check(ctx); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		t.Logf("%s: Check answered after %v", what, time.Since(start).Round(time.Millisecond))
	}

	cut := dial(vm.Agent) // the code under test's socket
	check(cut, "Agent")
	test := dial(vm.TestAgent)
	check(test, "TestAgent")
	ifs, err := test.ListInterfaces(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifs {
		if i.Name != "lo" {
			t.Errorf("ListInterfaces in a guest without NICs lists %+v", i)
		}
	}
	t.Logf("ListInterfaces: %+v", ifs)

	// Hang up and connect again at once: the guest may learn of both in
	// one go and never read EOF, and must still serve the new client as a
	// new session. The client on Agent is untouched throughout.
	for i := range 5 {
		test.Close()
		test = dial(vm.TestAgent)
		check(test, fmt.Sprintf("TestAgent, connection %d", i+2))
	}
	check(cut, "Agent after TestAgent reconnected")
	test.Close()

	if err := vm.RestartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.WaitSerial(ctx, AgentExitRE(1)); err != nil {
		t.Fatal(err)
	}
	// The connection to Agent outlives the agent process: QEMU holds the
	// host side, and the new process serves it.
	check(cut, "Agent connection across the agent's restart")
	check(dial(vm.TestAgent), "TestAgent after restart")
	cut.Close()
	check(dial(vm.Agent), "Agent, new connection after restart")
}

func TestNoGuest(t *testing.T) {
	vm := StartNoGuest(t, Options{RootPorts: 1})
	q := dialTestQMP(t, vm.TestQMP)
	ret, err := q.run("query-status", nil)
	if err != nil {
		t.Fatal(err)
	}
	var st struct{ Status string }
	if err := json.Unmarshal(ret, &st); err != nil || st.Status != "running" {
		t.Errorf("query-status = %s (%v), want running", ret, err)
	}
	if !vm.Alive() {
		t.Error("QEMU without a guest exited")
	}
}

// TestArgs: extra arguments reach QEMU; -S leaves the VM paused before
// its first instruction (the benchmarks' paused sandboxes).
func TestArgs(t *testing.T) {
	vm := StartNoGuest(t, Options{RootPorts: 1, MemoryMB: 16, Args: []string{"-S"}})
	q := dialTestQMP(t, vm.TestQMP)
	ret, err := q.run("query-status", nil)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Status  string
		Running bool
	}
	if err := json.Unmarshal(ret, &st); err != nil || st.Status != "prelaunch" || st.Running {
		t.Errorf("query-status = %s (%v), want prelaunch, not running", ret, err)
	}
}

// testQMP is the smallest QMP client that serves these tests; the real one
// lives in package qmp, which this fixture must not depend on.
type testQMP struct {
	c      net.Conn
	r      *bufio.Reader
	events []qmpMessage
}

type qmpMessage struct {
	Return json.RawMessage               `json:"return"`
	Error  *struct{ Class, Desc string } `json:"error"`
	Event  string                        `json:"event"`
	Data   struct{ Device string }       `json:"data"`
}

func dialTestQMP(t *testing.T, sock string) *testQMP {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	q := &testQMP{c: c, r: bufio.NewReader(c)}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := q.r.ReadString('\n'); err != nil {
		t.Fatalf("QMP greeting on %s: %v", sock, err)
	}
	if _, err := q.run("qmp_capabilities", nil); err != nil {
		t.Fatal(err)
	}
	return q
}

func (q *testQMP) read() (qmpMessage, error) {
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		return qmpMessage{}, err
	}
	var m qmpMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return qmpMessage{}, fmt.Errorf("decode %q: %w", line, err)
	}
	return m, nil
}

func (q *testQMP) run(cmd string, args map[string]any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	_ = q.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("%s: %w", cmd, err)
	}
	for {
		m, err := q.read()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
		switch {
		case m.Event != "":
			q.events = append(q.events, m)
		case m.Error != nil:
			return nil, fmt.Errorf("%s: %s: %s", cmd, m.Error.Class, m.Error.Desc)
		default:
			return m.Return, nil
		}
	}
}

func (q *testQMP) waitEvent(ctx context.Context, event, device string) error {
	deadline, _ := ctx.Deadline()
	_ = q.c.SetDeadline(deadline)
	for {
		for _, m := range q.events {
			if m.Event == event && m.Data.Device == device {
				return nil
			}
		}
		m, err := q.read()
		if err != nil {
			return err
		}
		q.events = append(q.events, m)
	}
}
