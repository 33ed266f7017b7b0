package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// nlSocket is a blocking route netlink socket in one netns, for the
// dumps and requests this package encodes and decodes itself. A call is
// a send and the receives that answer it, into a buffer lent for the
// call: answers are only valid while it runs.
type nlSocket struct {
	mu  sync.Mutex
	fd  int
	pid uint32 // the socket's port id, which the kernel's answers carry
	seq uint32
	// sent, when set (by tests), hears the type of each request sent.
	sent func(typ uint16)
}

// nlBufs lends receive buffers to the calls under way: one per call, not
// one per socket, since every kept netns holds a socket and a buffer
// each cost 64 KB per sandbox.
var nlBufs = sync.Pool{New: func() any { b := make([]byte, nlBufSize); return &b }}

// nlBufSize holds any datagram the kernel sends a dump reader: a dump's
// messages come in buffers of at most 32 KB, or one message when a
// message is larger (a link with many VFs), which this also holds.
const nlBufSize = 64 << 10

// openNLSocket opens a route netlink socket in the calling thread's
// netns, with socketTimeout on its sends and receives and the kernel's
// reasons in its errors.
func openNLSocket() (*nlSocket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open route netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(socketTimeout.Nanoseconds())
	err = errors.Join(
		unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv),
	)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1) // the kernel's reason, where it gives one
	var pid uint32
	if err == nil {
		var sa unix.Sockaddr
		if sa, err = unix.Getsockname(fd); err == nil {
			nsa, ok := sa.(*unix.SockaddrNetlink)
			if !ok {
				err = fmt.Errorf("route netlink socket bound to %T", sa)
			} else {
				pid = nsa.Pid
			}
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set up route netlink socket: %w", err)
	}
	return &nlSocket{fd: fd, pid: pid}, nil
}

// Close closes the socket.
func (s *nlSocket) Close() error { return unix.Close(s.fd) }

// ack sends req, which asks for an acknowledgement, and waits for it.
func (s *nlSocket) ack(req *nl.NetlinkRequest) error {
	return s.exchange(req, 0, func([]byte) error { return nil })
}

// exchange sends req and passes the payload of each answer of type
// resType (0: any) to fn, until the kernel's last answer: the end of a
// dump, an acknowledgement, an error (the errno, with the kernel's reason
// when it gives one) or a single reply. A dump is always read to its end,
// so the next call starts clean: the first error of fn is returned after
// it. A dump the kernel reports interrupted returns
// netlink.ErrDumpInterrupted (see dump).
func (s *nlSocket) exchange(req *nl.NetlinkRequest, resType uint16, fn func([]byte) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	req.Seq = s.seq
	if s.sent != nil {
		s.sent(req.Type)
	}
	if err := unix.Sendto(s.fd, req.Serialize(), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	bp := nlBufs.Get().(*[]byte)
	defer nlBufs.Put(bp)
	buf := *bp
	var fnErr error
	intr := false
	for {
		n, _, flags, from, err := unix.Recvmsg(s.fd, buf, nil, 0)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return fmt.Errorf("netlink: no answer within %v", socketTimeout)
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return fmt.Errorf("netlink receive: %w", err)
		case flags&unix.MSG_TRUNC != 0:
			// Lost: what follows still ends the exchange.
			fnErr = cmpErr(fnErr, fmt.Errorf("netlink answer larger than %d bytes", len(buf)))
			continue
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // not the kernel's
		}
		done, err := s.answers(buf[:n], resType, fn, &fnErr, &intr)
		if done {
			switch {
			case err != nil:
				return err
			case fnErr != nil:
				return fnErr
			case intr:
				return netlink.ErrDumpInterrupted
			}
			return nil
		}
	}
}

// answers handles the messages of one datagram; done says the exchange
// has ended, with err the kernel's error if it ended in one.
func (s *nlSocket) answers(b []byte, resType uint16, fn func([]byte) error, fnErr *error, intr *bool) (done bool, err error) {
	for len(b) >= unix.NLMSG_HDRLEN {
		ln := int(binary.NativeEndian.Uint32(b))
		if ln < unix.NLMSG_HDRLEN || ln > len(b) {
			return true, fmt.Errorf("netlink: malformed answer (length %d of %d bytes)", ln, len(b))
		}
		typ := binary.NativeEndian.Uint16(b[4:])
		flags := binary.NativeEndian.Uint16(b[6:])
		seq, pid := binary.NativeEndian.Uint32(b[8:]), binary.NativeEndian.Uint32(b[12:])
		m := b[unix.NLMSG_HDRLEN:ln]
		b = b[min((ln+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1), len(b)):]
		if seq != s.seq || pid != s.pid {
			continue // the rest of an exchange given up on (a timeout)
		}
		if flags&unix.NLM_F_DUMP_INTR != 0 {
			*intr = true
		}
		switch typ {
		case unix.NLMSG_DONE, unix.NLMSG_ERROR:
			return true, nlError(typ, flags, m)
		}
		if resType == 0 || typ == resType {
			if err := fn(m); err != nil {
				*fnErr = cmpErr(*fnErr, err)
			}
		}
		if flags&unix.NLM_F_MULTI == 0 {
			return true, nil
		}
	}
	return false, nil
}

// nlError is the error an NLMSG_DONE or NLMSG_ERROR payload m carries
// (nil for none: an acknowledgement, or a dump's end), with the kernel's
// reason (NLMSGERR_ATTR_MSG) when it gives one.
func nlError(typ, flags uint16, m []byte) error {
	if len(m) < 4 {
		return nil
	}
	errno := int32(binary.NativeEndian.Uint32(m))
	if errno == 0 {
		return nil
	}
	err := error(unix.Errno(-errno))
	if typ != unix.NLMSG_ERROR || flags&unix.NLM_F_ACK_TLVS == 0 || len(m) < 4+unix.NLMSG_HDRLEN {
		return err
	}
	// After the errno, the request's header (its payload left out:
	// NLM_F_CAPPED), then the attributes.
	echo := int(binary.NativeEndian.Uint32(m[4:]))
	if flags&unix.NLM_F_CAPPED != 0 {
		echo = unix.NLMSG_HDRLEN
	}
	at := 4 + (echo+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1)
	if echo < unix.NLMSG_HDRLEN || at > len(m) {
		return err
	}
	_ = walkAttrs(m[at:], func(t uint16, v []byte) error {
		if t == nl.NLMSGERR_ATTR_MSG {
			err = fmt.Errorf("%w: %s", err, cstring(v))
		}
		return nil
	})
	return err
}

// cmpErr keeps the first error.
func cmpErr(first, next error) error {
	if first != nil {
		return first
	}
	return next
}
