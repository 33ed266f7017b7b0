package main

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// Lines as QEMU 7.2 writes them with -msg timestamp=on and the two trace
// events; the last one is cut mid-line, as a read can find it.
const traceSample = `31456@1796039536.400000:monitor_qmp_respond mon 0x55a7 resp: {"QMP": {"version": {}}}
31467@1796039536.401000:handle_qmp_command mon 0x55a7 req: {"execute": "device_add", "arguments": {"id": "tapsync-net1"}, "id": "7"}
31467@1796039536.401500:handle_qmp_command mon 0x99 req: {"execute": "query-status", "id": "7"}
31456@1796039536.403000:monitor_qmp_respond mon 0x55a7 resp: {"return": {}, "id": "7"}
31456@1796039536.403100:monitor_qmp_respond mon 0x99 resp: {"id": "7", "error": {"class": "GenericError", "desc": "x"}}
31467@1796039536.410000:handle_qmp_command mon 0x55a7 req: {"execute": "device_del", "arguments": {"id": "tapsync-net1"}, "id": 8}
31456@1796039536.410200:monitor_qmp_respond mon 0x55a7 resp: {"return": {}, "id": 8}
31456@1796039536.480000:monitor_qmp_respond mon 0x55a7 resp: {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/tapsync-net1/virtio-backend"}}
31456@1796039536.480100:monitor_qmp_respond mon 0x55a7 resp: {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"device": "tapsync-net1", "path": "/machine/peripheral/tapsync-net1"}}
31467@1796039536.490000:handle_qmp_com`

func TestTrace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.log")
	if err := os.WriteFile(path, []byte(traceSample), 0o644); err != nil {
		t.Fatal(err)
	}
	tr := newTrace(path)
	if err := tr.poll(); err != nil {
		t.Fatal(err)
	}
	at := func(us int) time.Time { return time.Unix(1796039536, int64(us)*1000) }
	if got := okReplies(tr.Recs, "device_add"); len(got) != 1 || !got[0].Equal(at(403000)) {
		t.Errorf("device_add answered at %v, want %v", got, at(403000))
	}
	if got := okReplies(tr.Recs, "query-status"); len(got) != 0 {
		t.Errorf("an error reply on another monitor counted as success: %v", got)
	}
	if got := requests(tr.Recs, "device_del"); len(got) != 1 || !got[0].Equal(at(410000)) {
		t.Errorf("device_del received at %v", got)
	}
	if got, ok := deviceDeleted(tr.after(at(410000))); !ok || !got.Equal(at(480100)) {
		t.Errorf("DEVICE_DELETED of the device at %v (%v), want %v", got, ok, at(480100))
	}
	if got := commandCounts(tr.Recs); got["device_add"] != 1 || got["query-status"] != 1 || got["device_del"] != 1 || len(got) != 3 {
		t.Errorf("command counts %v", got)
	}
	// The cut line completes on the next read.
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`mand mon 0x55a7 req: {"execute": "netdev_del", "id": "9"}` + "\n")
	f.Close()
	if err := tr.poll(); err != nil {
		t.Fatal(err)
	}
	if got := requests(tr.after(at(480101)), "netdev_del"); len(got) != 1 || !got[0].Equal(at(490000)) {
		t.Errorf("netdev_del across two reads: %v", got)
	}
}

func TestQuantile(t *testing.T) {
	v := []float64{5, 1, 4, 2, 3, 6, 7, 8, 9, 10}
	for p, want := range map[float64]float64{0.5: 5, 0.9: 9, 1: 10, 0: 1} {
		if got := quantile(v, p); got != want {
			t.Errorf("quantile(%v) = %v, want %v", p, got, want)
		}
	}
}

// Lines as QEMU 7.2.22 writes them with hmpTraceArgs and ejectTraceArgs:
// an HMP socket (0x5638…bb0), a QMP one (0x5638…dd0) whose commands
// suspend it too, a human-monitor-command run on a monitor of its own
// (0x7ffd…), and QEMU's own message glued to the last line.
const hmpTraceSample = `4652@1796590983.115032:monitor_suspend mon 0x56381c812bb0: 1
4652@1796590983.115045:handle_hmp_command mon 0x56381c812bb0 cmdline: info version
4652@1796590983.115106:monitor_suspend mon 0x56381c812bb0: -1
4652@1796590983.116833:monitor_suspend mon 0x56381c812bb0: 1
4652@1796590983.116837:handle_hmp_command mon 0x56381c812bb0 cmdline: device_add virtio-net-pci,id=tapsync-net1,addr=0x1f,bus=pci-bridge-0,mac=02:00:00:00:00:01,netdev=tapsync-netdev1,romfile=
4655@1796590983.117000:handle_qmp_command mon 0x56381c812dd0 req: {"execute": "human-monitor-command", "arguments": {"command-line": "info network"}}
4655@1796590983.117001:monitor_suspend mon 0x56381c812dd0: 1
4652@1796590983.117100:handle_hmp_command mon 0x7ffd992cd5c0 cmdline: info network
4652@1796590983.117200:monitor_qmp_respond mon 0x56381c812dd0 resp: {"return": ""}
4652@1796590983.117210:monitor_suspend mon 0x56381c812dd0: -1
4652@1796590983.118387:monitor_suspend mon 0x56381c812bb0: -1
4652@1796590983.200000:handle_hmp_command mon 0x56381c812bb0 cmdline: device_del tapsync-net1
4652@1796590983.200100:monitor_suspend mon 0x56381c812bb0: -1
4652@1796590983.250000:acpi_pci_eject_slot bsel: 1 slot: 32
4652@1796590983.300000:acpi_pci_eject_slot bsel: 1 slot: 31
4652@1796590983.310000:handle_hmp_command mon 0x56381c812bb0 cmdline: qom-get /machine/peripheral/tapsync-net1 type
4652@1796590983.310050:monitor_suspend mon 0x56381c812bb0: -12026-12-06T21:03:03.384592Z qemu-system-x86_64: terminating on signal 15
`

func TestTraceHMP(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.log")
	if err := os.WriteFile(path, []byte(hmpTraceSample), 0o644); err != nil {
		t.Fatal(err)
	}
	tr := newTrace(path)
	if err := tr.poll(); err != nil {
		t.Fatal(err)
	}
	at := func(us int) time.Time { return time.Unix(1796590983, int64(us)*1000) }
	exs := hmpExchanges(tr.HMP)
	var got []string
	for _, e := range exs {
		got = append(got, fmt.Sprintf("%s %d→%d", e.Cmd, e.Req.Sub(at(0)).Microseconds(), e.Ans.Sub(at(0)).Microseconds()))
	}
	// The glued line is no answer, the human-monitor-command line never
	// answered, the QMP monitor's suspensions answer nothing.
	want := []string{"info version 115045→115106", "device_add 116837→118387", "device_del 200000→200100"}
	if !slices.Equal(got, want) {
		t.Errorf("exchanges %q, want %q", got, want)
	}
	add, ok := firstExchange(exs, "device_add")
	if !ok || hmpArg(add.Line, "id") != "tapsync-net1" || hmpArg(add.Line, "netdev") != "tapsync-netdev1" || hmpArg(exs[2].Line, "") != "tapsync-net1" {
		t.Errorf("device_add %+v: id %q netdev %q", add, hmpArg(add.Line, "id"), hmpArg(add.Line, "netdev"))
	}
	if busy, between := monitorTime(exs, add.Mon); busy != (61+1550+100)*time.Microsecond || between != (1731+81613)*time.Microsecond {
		t.Errorf("monitorTime = %v, %v", busy, between)
	}
	if e, ok := tr.ejectAfter(add.Req); !ok || !e.Equal(at(300000)) {
		t.Errorf("eject at %v (%v)", e, ok)
	}
	if len(tr.Recs) != 2 {
		t.Errorf("QMP records %v: the HMP lines leaked into them", tr.Recs)
	}
}

// TestTraceACPI: the guest's accesses to the ACPI PCI hot-plug registers
// (acpiTraceArgs) are kept with their arguments; the first at or after a
// time is the guest's handler running.
func TestTraceACPI(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.log")
	lines := `8223@1796600506.737626:acpi_pci_sel_write 0x10 <== 0
8223@1796600506.737759:acpi_pci_up_read 2147483648
8223@1796600506.738949:acpi_pci_sel_write 0x10 <== 1
`
	if err := os.WriteFile(path, []byte(lines), 0o644); err != nil {
		t.Fatal(err)
	}
	tr := newTrace(path)
	if err := tr.poll(); err != nil {
		t.Fatal(err)
	}
	if len(tr.ACPI) != 3 || tr.ACPI[1] != (acpiRecord{T: time.Unix(1796600506, 737759000), Event: "acpi_pci_up_read", Args: "2147483648"}) {
		t.Fatalf("ACPI records %+v", tr.ACPI)
	}
	if a, ok := tr.acpiAfter(time.Unix(1796600506, 737700000)); !ok || a.Event != "acpi_pci_up_read" {
		t.Errorf("first access from .737700: %+v %v", a, ok)
	}
	if _, ok := tr.acpiAfter(time.Unix(1796600507, 0)); ok {
		t.Error("an access after the last one")
	}
}

// TestConfiguredWith: tapsync is done with an add once a pass has ended
// after the guest interface was configured with its address and the
// routes through it sent; a pass that configured it without the address,
// or sent no route through it after, does not count.
func TestConfiguredWith(t *testing.T) {
	addr := netip.MustParseAddr("10.1.2.3")
	cfg := func(msg string) logLine { return logLine{Action: "configure-guest", Message: msg} }
	end := logLine{Message: "reconciled"}
	routes := logLine{Action: "update-guest-routes", Message: "set the guest's routes (2): 0.0.0.0/0 via 10.1.1.1 dev eth0; 10.196.0.0/16 via 10.1.2.1 dev net1"}
	for _, c := range []struct {
		name  string
		lines []logLine
		want  bool
	}{
		{"none", nil, false},
		{"without the address", []logLine{cfg("configure guest interface net1 (aa): no address, mtu 1500: NIC plugged"), end}, false},
		{"not ended", []logLine{cfg("configure guest interface net1 (aa): 10.1.2.3/24, mtu 1500: net1 changed"), routes}, false},
		{"another link", []logLine{cfg("configure guest interface eth0 (aa): 10.1.2.3/24, mtu 1500"), routes, end}, false},
		{"no routes after", []logLine{routes, cfg("configure guest interface net1 (aa): 10.1.2.3/24, mtu 1500"), end}, false},
		{"done", []logLine{cfg("configure guest interface net1 (aa): no address, mtu 1500"), end,
			cfg("configure guest interface net1 (aa): 10.1.2.3/24, mtu 1500: net1 changed"), routes, end}, true},
	} {
		if got := configuredWith(c.lines, "net1", addr); got != c.want {
			t.Errorf("%s: configuredWith = %v, want %v", c.name, got, c.want)
		}
	}
}
