package watcher

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"github.com/tapsync/tapsync/datapath"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// listenSocket is one rtnetlink socket in a netns (home) that hears,
// besides home, every netns that has an nsid in home
// (NETLINK_LISTEN_ALL_NSID). Each datagram from another netns carries
// that nsid in a control message.
//
// Equivalent to: ip monitor all-nsid link address route nsid; tc monitor
//
// The fd is non-blocking and parked in Go's netpoller: a reader waits
// without a thread or a timer, and close wakes it.
type listenSocket struct {
	f  *os.File
	rc syscall.RawConn
}

// sizeofRtGenMsg is struct rtgenmsg (one byte) padded to NLMSG_ALIGNTO.
const sizeofRtGenMsg = 4

// listenRcvBuf is the receive buffer of a listenSocket. One socket takes
// the bursts of every sandbox at once (a storm of links added everywhere,
// our own taps and filters on a daemon start), where one socket per
// sandbox had the kernel's default (about 208 KiB) each. The kernel
// charges only what is queued, so a large limit costs nothing while the
// reader keeps up.
const listenRcvBuf = 16 << 20

// openListenSocket opens a socket in the netns at home ("" for the
// calling process's own netns) joined to groups, listening to every
// netns with an nsid there. rcvBuf, when non-zero, forces the receive
// buffer size (SO_RCVBUFFORCE; the kernel's minimum is about 2 KiB);
// zero asks for listenRcvBuf, or what rmem_max allows without
// CAP_NET_ADMIN.
func openListenSocket(home string, groups []uint, rcvBuf int) (*listenSocket, error) {
	fd, err := inNetns(home, func() (int, error) {
		return unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	})
	if err != nil {
		return nil, fmt.Errorf("open netlink socket: %w", err)
	}
	setup := func() error {
		if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			return fmt.Errorf("bind netlink socket: %w", err)
		}
		for _, g := range groups {
			if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, int(g)); err != nil {
				return fmt.Errorf("join netlink group %d: %w", g, err)
			}
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_LISTEN_ALL_NSID, 1); err != nil {
			return fmt.Errorf("set NETLINK_LISTEN_ALL_NSID: %w", err)
		}
		if rcvBuf != 0 {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcvBuf); err != nil {
				return fmt.Errorf("set receive buffer: %w", err)
			}
			return nil
		}
		if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, listenRcvBuf) != nil {
			// Not allowed: the kernel caps SO_RCVBUF at rmem_max.
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, listenRcvBuf)
		}
		return nil
	}
	if err := setup(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "netlink-listen")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	return &listenSocket{f: f, rc: rc}, nil
}

// close closes the socket; a receive blocked on it returns an error
// wrapping os.ErrClosed.
func (s *listenSocket) close() { s.f.Close() }

// noNsid marks a datagram without an nsid control message: it comes from
// home itself.
const noNsid = int32(unix.NETNSA_NSID_NOT_ASSIGNED)

// receive waits for one datagram from the kernel and returns its
// messages and the nsid of the netns it comes from (noNsid: home). buf
// and oob are scratch space reused across calls; the messages point into
// buf. Each call is one recvmsg that returns data (wakeups counts them),
// apart from EAGAIN retries after a spurious readiness.
func (s *listenSocket) receive(buf, oob []byte) ([]syscall.NetlinkMessage, int32, error) {
	var n, oobn, flags int
	var from unix.Sockaddr
	var rerr error
	err := s.rc.Read(func(fd uintptr) bool {
		n, oobn, flags, from, rerr = unix.Recvmsg(int(fd), buf, oob, 0)
		return rerr != unix.EAGAIN
	})
	if err != nil {
		return nil, noNsid, err
	}
	if rerr != nil {
		return nil, noNsid, rerr
	}
	if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != nl.PidKernel {
		return nil, noNsid, nil // only the kernel speaks for a namespace
	}
	nsid := noNsid
	if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, cm := range cms {
			if cm.Header.Level == unix.SOL_NETLINK && cm.Header.Type == unix.NETLINK_LISTEN_ALL_NSID && len(cm.Data) >= 4 {
				nsid = int32(binary.NativeEndian.Uint32(cm.Data))
			}
		}
	}
	if flags&unix.MSG_TRUNC != 0 {
		return nil, nsid, errTruncated
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return nil, nsid, fmt.Errorf("parse netlink datagram: %w", err)
	}
	return msgs, nsid, nil
}

// errTruncated: a datagram did not fit the receive buffer.
var errTruncated = errors.New("netlink datagram truncated")

// nsidAttr is the NETNSA_NSID of an RTM_NEWNSID/RTM_DELNSID message.
func nsidAttr(m syscall.NetlinkMessage) (int32, bool) {
	for typ, v := range attrs(m.Data, sizeofRtGenMsg) {
		if typ == unix.NETNSA_NSID && len(v) >= 4 {
			return int32(binary.NativeEndian.Uint32(v)), true
		}
	}
	return 0, false
}

// privateHome makes, once per process, a network namespace of its own for
// the listen socket to live in, and returns a path to it
// (/proc/self/fd/N; no mount, so it dies with the process). A socket in
// the daemon's own netns hears every change there (a node's host netns
// changes with every pod: veths, routes, tc) and, with
// NETLINK_LISTEN_ALL_NSID, in every netns that has an nsid there (every
// pod netns with a veth peer on the host), and woke the idle daemon for
// each. In a netns of its own, where nothing ever changes, the socket
// hears only the sandbox netns that Watch gives an nsid there.
//
// Equivalent to: unshare --net, holding the namespace by descriptor.
var privateHome = sync.OnceValues(func() (string, error) {
	fd := -1
	err := datapath.OnThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare a network namespace: %w", err)
		}
		return nil
	}, func() error {
		var err error
		if fd, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
			return fmt.Errorf("open the private network namespace: %w", err)
		}
		return nil
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return "", err
	}
	// The descriptor is kept for the life of the process: the namespace
	// lives as long as it or a socket in it does.
	return fmt.Sprintf("/proc/self/fd/%d", fd), nil
})

// inNetns runs open in the netns at home ("" runs it here). A socket
// belongs to the netns of the thread that created it.
func inNetns(home string, open func() (int, error)) (int, error) {
	fd := -1
	err := datapath.InNetns(home, func() error {
		var err error
		fd, err = open()
		return err
	})
	if err != nil && fd >= 0 {
		unix.Close(fd)
		fd = -1
	}
	return fd, err
}
