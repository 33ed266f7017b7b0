package reconcile

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
)

// qmpVM adapts a QMP connection to VM.
type qmpVM struct {
	c          *qmp.Client
	unplugWait time.Duration
	placement  qmp.Placement
}

func (v qmpVM) NICs(ctx context.Context) ([]NIC, []int, error) {
	infos, err := v.c.ListNICs(ctx)
	if err != nil {
		return nil, nil, err
	}
	nics := make([]NIC, 0, len(infos))
	for _, i := range infos {
		nics = append(nics, NIC{ID: i.ID, Index: i.Index, Owned: i.Owned, MAC: i.MAC, PCIPath: i.PCIPath})
	}
	ids, err := v.c.ListNetdevs(ctx)
	if err != nil {
		return nil, nil, err
	}
	var netdevs []int
	for _, id := range ids {
		if n, ok := parseNetdevID(id); ok {
			netdevs = append(netdevs, n)
		}
	}
	return nics, netdevs, nil
}

// parseNetdevID returns n for qmp.NetdevID(n).
func parseNetdevID(id string) (int, bool) {
	s, ok := strings.CutPrefix(id, "tapsync-netdev")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || qmp.NetdevID(n) != id {
		return 0, false
	}
	return n, true
}

func (v qmpVM) PlugNIC(ctx context.Context, index int, mac net.HardwareAddr, mtu int, q *datapath.Queues) (string, error) {
	info, err := v.c.AddNIC(ctx, qmp.NIC{Index: index, MAC: mac, TapFDs: q.Tap, VhostFDs: q.Vhost, MTU: mtu, Placement: v.placement})
	if errors.Is(err, qmp.ErrNetdevOrphaned) {
		return "", fmt.Errorf("%w: %w", ErrIndexBurned, err)
	}
	return info.PCIPath, err
}

// UnplugNICs asks QEMU for all the unplugs at once; with wait it gives
// the guest one unplug timeout to acknowledge the first requests among
// them.
func (v qmpVM) UnplugNICs(ctx context.Context, reqs []Unplug, wait bool) []error {
	d := v.unplugWait
	if !wait {
		d = 0
	}
	us := make([]qmp.Unplug, len(reqs))
	for i, r := range reqs {
		us[i] = qmp.Unplug{Index: r.Index, Requested: r.Requested}
	}
	errs := v.c.RemoveNICs(ctx, us, d)
	for i, err := range errs {
		switch {
		case errors.Is(err, qmp.ErrRemovalPending):
			errs[i] = fmt.Errorf("%w: %w", ErrUnplugPending, err)
		case errors.Is(err, qmp.ErrNetdevOrphaned):
			errs[i] = fmt.Errorf("%w: %w", ErrIndexBurned, err)
		}
	}
	return errs
}
