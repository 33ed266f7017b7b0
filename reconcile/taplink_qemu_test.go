package reconcile

import (
	"bytes"
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/qmp"
)

// A CNI's tap link handed to QEMU, whose NIC went while the daemon was
// down and whose record was lost: the netdev left holds the tap, and
// nothing of ours shows it but the tap link without a NIC. The first
// reading lists the netdevs, and the first pass deletes it and plugs the
// link again (before, every pass failed on the busy tap until the
// periodic verify).
func TestFirstReadingNetdevsBehindTapLink(t *testing.T) {
	g := newModelRig(t, 0)
	testnet.IP(t, "-n", g.ns.Name, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr")
	testnet.IP(t, "-n", g.ns.Name, "link", "set", "dev", "tap0", "address", macN(1).String(), "up")
	if _, err := g.pass(t); err != nil {
		t.Fatalf("wiring tap0: %v\n%s", err, g.log)
	}
	// Wired and recorded, the first reading stays one round trip.
	g.restart(t)
	if n, err := g.pass(t); err != nil || n != 1 {
		t.Errorf("first pass after a restart, tap0 wired: %d QMP commands, err %v; want 1 (info qtree)", n, err)
	}
	g.r.Close()
	g.vm.do(t, "device_del", map[string]any{"id": qmp.DeviceID(0)})
	g.vm.awaitNoNICs(t)
	if err := g.store.Delete(g.sb.ID); err != nil {
		t.Fatal(err)
	}
	g.restart(t)
	if n, err := g.pass(t); err != nil {
		t.Fatalf("first pass after a restart, tap0's NIC gone, its netdev left and the record lost: %v (%d commands)\n%s", err, n, g.log)
	}
	vm, err := g.vm.outside.ReadVM(g.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vm.NICs) != 1 || !bytes.Equal(vm.NICs[0].MAC, macN(1)) || len(vm.Netdevs) != 1 || vm.Netdevs[0] != qmp.NetdevID(vm.NICs[0].Index) {
		t.Errorf("VM after the pass: NICs %+v, netdevs %q; want tap0's NIC and its netdev only\n%s", vm.NICs, vm.Netdevs, g.log)
	}
}
