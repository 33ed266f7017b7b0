package datapath

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DevDir is where devtmpfs shows character devices; a variable so tests
// can make it show none.
var DevDir = "/dev"

// OpenMacvtapQueues opens spec.Queues queues of our tsm<N> and, depending
// on vhost, one vhost-net fd per queue; see OpenMacvtapLinkQueues.
func (n *Netns) OpenMacvtapQueues(ctx context.Context, spec MacvtapSpec, vhost Vhost) (*Queues, error) {
	if err := spec.validate(); err != nil {
		return nil, fmt.Errorf("netns %s: %w", n.path, err)
	}
	name := MacvtapName(spec.Index)
	m, err := n.macvtap(name)
	if err != nil {
		return nil, fmt.Errorf("netns %s: open queues of %s: %w", n.path, name, err)
	}
	if why := macvtapMismatch(m, spec); why != "" {
		return nil, fmt.Errorf("netns %s: open queues of %s: %w: %s", n.path, name, ErrMacvtapMismatch, why)
	}
	return n.openMacvtap(ctx, m, spec.Queues, vhost)
}

// OpenMacvtapLinkQueues opens queues queues of an existing macvtap link
// (one a macvtap CNI made, say) by name, and vhost-net fds as for taps.
// The link is never changed or deleted.
//
// A macvtap's queues are opens of its character device, named
// tap<ifindex> in the sysfs of the macvtap's netns. devtmpfs names its
// node /dev/tap<ifindex> too, but for one netns only: two macvtaps with
// the same ifindex in different netns share the name, and the node of
// one vanishes when the other is deleted (seen on 6.18). So the device
// numbers are read from the netns's own sysfs, the /dev node is used only
// when it has exactly those numbers, and otherwise a node is made in a
// private, unattached tmpfs that disappears with its last fd. After the
// opens the numbers are read again and each fd asked whether it is still
// attached, so a queue of a macvtap that took the numbers in between
// (another pod's, of any name) is never handed out.
func (n *Netns) OpenMacvtapLinkQueues(ctx context.Context, name string, queues int, vhost Vhost) (*Queues, error) {
	if queues < 1 || queues > MaxQueues {
		return nil, fmt.Errorf("netns %s: macvtap %s: %d queues is outside 1..%d", n.path, name, queues, MaxQueues)
	}
	m, err := n.macvtap(name)
	if err != nil {
		return nil, fmt.Errorf("netns %s: open queues of %s: %w", n.path, name, err)
	}
	return n.openMacvtap(ctx, m, queues, vhost)
}

// macvtapOpening, when set (tests only), runs between reading a macvtap's
// device numbers and opening them.
var macvtapOpening func(name string)

func (n *Netns) openMacvtap(ctx context.Context, m *netlink.Macvtap, queues int, vhost Vhost) (*Queues, error) {
	name, ifindex := m.Attrs().Name, m.Attrs().Index
	wrap := func(err error) error { return fmt.Errorf("netns %s: open queues of macvtap %s: %w", n.path, name, err) }
	dev, err := n.macvtapDevNum(name, ifindex)
	if err != nil {
		return nil, wrap(err)
	}
	if macvtapOpening != nil {
		macvtapOpening(name)
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if queues > 1 {
		flags |= unix.IFF_MULTI_QUEUE
	}
	q := &Queues{}
	err = openCharDev(dev, "tap"+strconv.Itoa(ifindex), queues, func(f *os.File) error {
		q.Tap = append(q.Tap, f)
		return nil
	})
	if err == nil {
		err = n.claimMacvtapQueues(q.Tap, name, ifindex, dev, flags)
	}
	if err == nil {
		err = openVhost(ctx, q, queues, vhost)
	}
	if err != nil {
		q.Close()
		return nil, wrap(err)
	}
	return q, nil
}

// claimMacvtapQueues proves that fds, opened by the device numbers dev,
// are queues of the macvtap name (ifindex) of this netns, and sets their
// flags. A macvtap's minor is freed when it is deleted, fds open or not
// (their queues are detached), and may go to another netns's macvtap of
// any name at once. So the numbers are read again after the opens: if
// this netns's macvtap has dev still and each fd is still attached, each
// reached it, since a device it reached instead would have had to be
// deleted, detaching the fd, for this one to get dev.
func (n *Netns) claimMacvtapQueues(fds []*os.File, name string, ifindex int, dev uint64, flags uint16) error {
	now, err := n.macvtapDevNum(name, ifindex)
	if err != nil {
		return fmt.Errorf("device %d:%d opened, then the link was not found again (deleted or re-created meanwhile?): %w",
			unix.Major(dev), unix.Minor(dev), err)
	}
	if now != dev {
		return fmt.Errorf("device %d:%d opened, but the link has %d:%d now (re-created meanwhile)",
			unix.Major(dev), unix.Minor(dev), unix.Major(now), unix.Minor(now))
	}
	for i, f := range fds {
		ifr, err := unix.NewIfreq("")
		if err != nil {
			return err
		}
		// Equivalent to: ioctl(fd, TUNGETIFF), which the macvtap driver
		// answers with its device's name, or ENOLINK once the queue's
		// device is gone.
		if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNGETIFF, ifr); err != nil {
			return fmt.Errorf("queue %d: device %d:%d: TUNGETIFF: %w", i, unix.Major(dev), unix.Minor(dev), err)
		}
		if got := ifr.Name(); got != name {
			return fmt.Errorf("queue %d: device %d:%d is %q, not %s", i, unix.Major(dev), unix.Minor(dev), got, name)
		}
		ifr.SetUint16(flags)
		if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr); err != nil {
			return fmt.Errorf("queue %d: TUNSETIFF: %w", i, err)
		}
	}
	return nil
}

// macvtapDevNum reads the device numbers of a macvtap's character device
// from the sysfs of this netns. sysfs shows the network devices of the
// netns its mounter was in, and the host's /sys is the host's; so a
// sysfs instance is made for this netns on a thread inside it, never
// attached to any mount namespace, and read through its fd.
// Equivalent to: ip netns exec NS cat /sys/class/net/NAME/macvtap/tapIFINDEX/dev
func (n *Netns) macvtapDevNum(name string, ifindex int) (uint64, error) {
	if strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return 0, fmt.Errorf("bad link name %q", name)
	}
	rel := filepath.Join("class/net", name, "macvtap", "tap"+strconv.Itoa(ifindex), "dev")
	var text string
	err := n.Do(func() error {
		mnt, err := detachedMount("sysfs", unix.MOUNT_ATTR_RDONLY|unix.MOUNT_ATTR_NOEXEC|unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV)
		if err != nil {
			return err
		}
		defer unix.Close(mnt)
		fd, err := unix.Openat(mnt, rel, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open sysfs %s: %w", rel, err)
		}
		f := os.NewFile(uintptr(fd), rel)
		defer f.Close()
		buf := make([]byte, 64)
		k, err := f.Read(buf)
		if err != nil {
			return fmt.Errorf("read sysfs %s: %w", rel, err)
		}
		text = strings.TrimSpace(string(buf[:k]))
		return nil
	})
	if err != nil {
		return 0, err
	}
	maj, min, ok := strings.Cut(text, ":")
	ma, err1 := strconv.ParseUint(maj, 10, 32)
	mi, err2 := strconv.ParseUint(min, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return 0, fmt.Errorf("sysfs %s holds %q, not major:minor", rel, text)
	}
	return unix.Mkdev(uint32(ma), uint32(mi)), nil
}

// detachedMount makes a new instance of filesystem fs that no mount
// namespace can see, and returns an fd of its root; it goes away with
// the fd. Equivalent to fsopen(fs) + fsconfig(CREATE) + fsmount(attrs).
func detachedMount(fs string, attrs int) (int, error) {
	fsfd, err := unix.Fsopen(fs, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("fsopen %s: %w", fs, err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return -1, fmt.Errorf("create %s instance: %w", fs, err)
	}
	mnt, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return -1, fmt.Errorf("fsmount %s: %w", fs, err)
	}
	return mnt, nil
}

// openCharDev opens the character device dev count times, read-write and
// non-blocking, passing each fd to use (which owns it from then on). It
// uses DevDir/<name> when that node has exactly dev's numbers, and
// otherwise a node of its own in a private unattached tmpfs, so no node
// of ours is ever left behind, not even by a crash.
func openCharDev(dev uint64, name string, count int, use func(*os.File) error) error {
	const oflags = unix.O_RDWR | unix.O_CLOEXEC | unix.O_NONBLOCK
	dir, path := unix.AT_FDCWD, filepath.Join(DevDir, name)
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != dev {
		mnt, err := detachedMount("tmpfs", unix.MOUNT_ATTR_NOEXEC|unix.MOUNT_ATTR_NOSUID)
		if err != nil {
			return fmt.Errorf("private node for device %d:%d: %w", unix.Major(dev), unix.Minor(dev), err)
		}
		defer unix.Close(mnt)
		if err := unix.Mknodat(mnt, name, unix.S_IFCHR|0o600, int(dev)); err != nil {
			return fmt.Errorf("mknod %s %d:%d: %w", name, unix.Major(dev), unix.Minor(dev), err)
		}
		dir, path = mnt, name
	}
	for i := range count {
		fd, err := unix.Openat(dir, path, oflags, 0)
		if err != nil {
			return fmt.Errorf("queue %d: open %s (%d:%d): %w", i, path, unix.Major(dev), unix.Minor(dev), err)
		}
		if err := use(os.NewFile(uintptr(fd), name)); err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
	}
	return nil
}
