package datapath

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"
)

// TapLink is a container link of kind tap: a tap a CNI plugin made (the
// reference tap plugin, `ip tuntap add`) to be the VM's device itself.
type TapLink struct {
	Link
	MultiQueue bool
	VnetHdr    bool // QEMU must be told (vnet_hdr=on/off)
	Persistent bool
}

// OpenTapLink opens queues queues of the existing tap link name and,
// depending on vhost, one vhost-net fd per queue. There is no redirect:
// the tap is the VM's NIC. The tap is the CNI's, so it is never created,
// changed or deleted: each queue is attached with exactly the tap's own
// flags (TUNSETIFF rewrites a tap's vnet_hdr and packet-information
// flags to whatever the opener asks), and more than one queue is refused
// unless the tap was made multiqueue.
func (n *Netns) OpenTapLink(ctx context.Context, name string, queues int, vhost Vhost) (TapLink, *Queues, error) {
	wrap := func(err error) error { return fmt.Errorf("netns %s: open tap link %s: %w", n.path, name, err) }
	if queues < 1 || queues > MaxQueues {
		return TapLink{}, nil, wrap(fmt.Errorf("%d queues is outside 1..%d", queues, MaxQueues))
	}
	t, err := n.tap(name)
	if err != nil {
		return TapLink{}, nil, wrap(err)
	}
	tp := toTap(t, -1)
	tl := TapLink{Link: tp.Link, MultiQueue: tp.MultiQueue, VnetHdr: tp.VnetHdr, Persistent: tp.Persistent}
	switch {
	case tl.Kind != "tap":
		return TapLink{}, nil, wrap(fmt.Errorf("%w: kind %s, want tap", ErrTapMismatch, tl.Kind))
	case !tp.NoPI:
		// QEMU reads and writes bare frames; a packet-information
		// header in front of each would corrupt every one.
		return TapLink{}, nil, wrap(fmt.Errorf("%w: packet information header enabled", ErrTapMismatch))
	case queues > 1 && !tl.MultiQueue:
		return TapLink{}, nil, wrap(fmt.Errorf("%w: %d queues asked of a single-queue tap", ErrTapMismatch, queues))
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if tp.VnetHdr {
		flags |= unix.IFF_VNET_HDR
	}
	if tl.MultiQueue {
		flags |= unix.IFF_MULTI_QUEUE
	}
	q := &Queues{}
	err = n.Do(func() error {
		for i := range queues {
			f, err := openTunQueue(name, flags)
			if err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
			q.Tap = append(q.Tap, f)
		}
		return nil
	})
	if err == nil {
		// TUNSETIFF on a name that vanished since the lookup creates a
		// new, transient tap: make sure the queues reached the one we saw.
		now, lerr := n.tap(name)
		switch {
		case lerr != nil:
			err = lerr
		case now.Attrs().Index != tl.Ifindex:
			err = fmt.Errorf("tap was replaced (ifindex %d, now %d)", tl.Ifindex, now.Attrs().Index)
		}
	}
	if err == nil {
		err = openVhost(ctx, q, queues, vhost)
	}
	if err != nil {
		q.Close()
		return TapLink{}, nil, wrap(err)
	}
	return tl, q, nil
}
