package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/tapsync/tapsync/qmp"
)

// hmpMonitor is the floor over QEMU's human monitor: qmp.Client's HMP
// transport, which spells each command as a line and reads QEMU's echo
// and prompt. AddNIC with At sends only getfd, netdev_add and device_add
// (it looks nothing up); RemoveNICs sends device_del, polls qom-get every
// 40 ms until the device is gone (HMP has no DEVICE_DELETED) and sends
// netdev_del. The floor needs no other monitor call, and HMP offers no
// shorter way to the same three commands.
type hmpMonitor struct{ c *qmp.Client }

func dialHMP(ctx context.Context, path string) (*hmpMonitor, error) {
	c, err := qmp.DialHMP(ctx, path, qmp.Options{})
	if err != nil {
		return nil, err
	}
	return &hmpMonitor{c}, nil
}

func (m *hmpMonitor) close() { m.c.Close() }

// plug: getfd → netdev_add → device_add, as HMP lines. AddNIC closes tap
// (the caller's Queues.Close after it is harmless).
func (m *hmpMonitor) plug(ctx context.Context, index int, tap *os.File, link nic, bus string, slot int) error {
	_, err := m.c.AddNIC(ctx, qmp.NIC{Index: index, MAC: link.mac, TapFDs: []*os.File{tap}, MTU: link.mtu,
		At: &qmp.Place{Bus: bus, Slot: slot}})
	return err
}

// unplug: device_del → qom-get until the device is gone → netdev_del.
func (m *hmpMonitor) unplug(ctx context.Context, index int) error {
	if err := m.c.RemoveNICs(ctx, []qmp.Unplug{{Index: index}}, time.Minute)[0]; err != nil {
		return fmt.Errorf("floor over HMP: %w", err)
	}
	return nil
}
