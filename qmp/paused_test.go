package qmp

import (
	"context"
	"fmt"
	"testing"
)

// A VM paused by -S before its firmware ran has every bus number at 0, so
// query-pci shows nothing behind a bridge: the NIC added first must still
// count as taking its slot (issue: "slot 31 ... in use by tapsync-net0",
// retried forever).
func TestQEMUPausedBeforeFirmware(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 0, "-S",
		"-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m")
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	seen := map[string]int{}
	for i := 1; i <= 3; i++ {
		info, err := c.AddNIC(ctx, NIC{Index: i, MAC: mustMAC(t, fmt.Sprintf("02:00:00:00:01:%02x", i)), TapFDs: openTap(t, 1)})
		if err != nil {
			t.Fatalf("AddNIC %d in a VM paused by -S: %v", i, err)
		}
		if j, ok := seen[info.PCIPath]; ok {
			t.Fatalf("NICs %d and %d both at %s", j, i, info.PCIPath)
		}
		seen[info.PCIPath] = i
	}
	capa, err := c.HotplugCapacity(ctx, Placement{})
	if err != nil || capa.Free() != 28 || capa.Buses[0].Taken != 3 {
		t.Errorf("HotplugCapacity after three NICs = %s, %v; want 3 taken, 28 free", capa, err)
	}
}

// With a place from the caller's Topology, AddNIC sends getfd,
// netdev_add and device_add and nothing else; the place is honoured.
func TestQEMUAddAtPlace(t *testing.T) {
	requireTaps(t)
	t.Parallel()
	vm := startVM(t, "q35", 0,
		"-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m")
	c := dialT(t, vm.qmp, Options{})
	ctx := context.Background()
	topo, err := c.Topology(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"02/1f", "02/1e"} {
		at, err := topo.Choose(Placement{})
		if err != nil {
			t.Fatal(err)
		}
		before := c.Commands()
		info, err := c.AddNIC(ctx, NIC{Index: i, MAC: mustMAC(t, fmt.Sprintf("02:00:00:00:02:%02x", i)), TapFDs: openTap(t, 1), At: &at})
		if err != nil {
			t.Fatal(err)
		}
		if n := c.Commands() - before; n != 3 {
			t.Errorf("AddNIC at a known place sent %d commands, want 3 (getfd, netdev_add, device_add)", n)
		}
		if info.PCIPath != want || at.PCIPath != want {
			t.Errorf("NIC %d at %s (chosen %s), want %s", i, info.PCIPath, at.PCIPath, want)
		}
		topo.Take(at.Bus, at.Slot)
	}
	fresh, err := c.Topology(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !fresh.Equal(topo) {
		t.Errorf("the topology kept by Take differs from QEMU's:\nkept %+v\nread %+v", topo.used, fresh.used)
	}
	// A wrong word (the slot is taken) is refused by QEMU and rolled back.
	taken := Place{Bus: "pci-bridge-0", Slot: 0x1f, PCIPath: "02/1f"}
	if _, err := c.AddNIC(ctx, NIC{Index: 7, MAC: mustMAC(t, "02:00:00:00:02:07"), TapFDs: openTap(t, 1), At: &taken}); err == nil {
		t.Fatal("AddNIC into a taken slot succeeded")
	}
	if netdevs, err := c.ListNetdevs(ctx); err != nil || len(netdevs) != 2 {
		t.Errorf("netdevs after the refused add = %q, %v; want the two NICs' only", netdevs, err)
	}
}
