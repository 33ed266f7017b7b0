package reconcile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

// qmpVM adapts a QMP connection to VM.
type qmpVM struct {
	c          *qmp.Client
	unplugWait time.Duration
	placement  qmp.Placement
	// model, when set, is the connection's model of the VM: NICs reads it
	// when fresh, and plugs and unplugs keep it current (nil: ask QEMU
	// every time).
	model *vmModel
	// recorded, when set, says whether the sandbox's record has endpoints
	// for a first reading of the VM to verify, and accounted whether it
	// accounts for the NICs a first reading found (see vmModel.observe).
	recorded  func() bool
	accounted func([]qmp.NICInfo) bool
}

func (v qmpVM) NICs(ctx context.Context) ([]NIC, []int, error) {
	if v.model != nil {
		infos, netdevs, ok := v.model.fresh()
		var err error
		if !ok {
			infos, netdevs, err = v.model.observe(ctx, v.recorded, v.accounted)
		}
		if err != nil {
			return nil, nil, err
		}
		return nicsOf(infos), netdevs, nil
	}
	vm, err := v.c.ReadVM(ctx)
	if err != nil {
		return nil, nil, err
	}
	return nicsOf(vm.NICs), netdevIndexes(vm.Netdevs), nil
}

// accounted says whether record rec and the netns's taps account for our
// NICs among nics, so that no netdev of ours can be without its device:
// each owned NIC has its recorded endpoint (not removing, unplug-requested
// or burned) and each recorded endpoint its NIC; each of our taps (taps:
// the tsn<N> and tsm<N> indexes observed) has its NIC; and each tap or
// macvtap container link (tapLinks: their MACs) has a NIC with its MAC.
func accounted(rec state.Record, nics []qmp.NICInfo, taps []int, tapLinks []net.HardwareAddr) bool {
	owned := 0
	for _, n := range nics {
		if n.Owned {
			owned++
			if e, ok := rec.Endpoint(n.Index); !ok || e.Removing || e.UnplugRequested || e.Burned {
				return false
			}
		}
	}
	for _, t := range taps {
		if !slices.ContainsFunc(nics, func(n qmp.NICInfo) bool { return n.Owned && n.Index == t }) {
			return false
		}
	}
	for _, mac := range tapLinks {
		if !slices.ContainsFunc(nics, func(n qmp.NICInfo) bool { return bytes.Equal(n.MAC, mac) }) {
			return false
		}
	}
	return owned == len(rec.Endpoints)
}

// netdevIndexes returns the endpoint indexes of our netdevs among ids.
func netdevIndexes(ids []string) []int {
	var netdevs []int
	for _, id := range ids {
		if n, ok := parseNetdevID(id); ok {
			netdevs = append(netdevs, n)
		}
	}
	return netdevs
}

func nicsOf(infos []qmp.NICInfo) []NIC {
	nics := make([]NIC, 0, len(infos))
	for _, i := range infos {
		nics = append(nics, NIC{ID: i.ID, Index: i.Index, Owned: i.Owned, MAC: i.MAC, PCIPath: i.PCIPath})
	}
	return nics
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
	info, err := v.c.AddNIC(ctx, qmp.NIC{Index: index, MAC: mac, TapFDs: q.Tap, VhostFDs: q.Vhost, MTU: mtu, Placement: v.placement,
		At: v.model.place(index, v.placement)})
	if err != nil {
		v.model.drop(causeQMPFailed) // QEMU refused what the model allowed, or left something half-made
	} else {
		v.model.plugged(info)
	}
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
	if !v.c.HasEvents() && slices.ContainsFunc(errs, func(err error) bool { return errors.Is(err, qmp.ErrRemovalPending) }) {
		// No DEVICE_DELETED will tell the model when the guest lets go:
		// the next pass reads the VM again.
		v.model.drop(causeUnplugUnheard)
	}
	for i, err := range errs {
		switch {
		case err == nil:
			v.model.unplugged(reqs[i].Index)
		case !errors.Is(err, qmp.ErrRemovalPending):
			v.model.drop(causeQMPFailed)
		}
		switch {
		case errors.Is(err, qmp.ErrRemovalPending):
			errs[i] = fmt.Errorf("%w: %w", ErrUnplugPending, err)
		case errors.Is(err, qmp.ErrNetdevOrphaned):
			errs[i] = fmt.Errorf("%w: %w", ErrIndexBurned, err)
		}
	}
	return errs
}
