package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// portPrefix selects the virtio-serial ports this agent serves.
const portPrefix = "agent."

// pollInterval paces the waits that have no event to wait on: for a port
// to appear, and for a host to send on one.
const pollInterval = 100 * time.Millisecond

// firstHostPoll is the first of the looks for a host's data once the port
// has none: the looks double from it up to pollInterval, so that a host
// that comes back soon after leaving (a client that redials after a
// failed call) waits a few ms, not up to pollInterval, while an idle port
// settles at pollInterval.
const firstHostPoll = 2 * time.Millisecond

// port is one virtio-serial port, e.g. name "agent.channel.0" at /dev/vport1p1.
type port struct{ name, dev string }

// findPorts lists the agent's ports. Without udev there are no
// /dev/virtio-ports/<name> links; the port's name is in sysfs and devtmpfs
// names the node after the sysfs entry.
//
// Equivalent to: grep -H . /sys/class/virtio-ports/vport*/name
func findPorts() ([]port, error) {
	dirs, err := filepath.Glob("/sys/class/virtio-ports/vport*")
	if err != nil {
		return nil, err
	}
	var ports []port
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "name"))
		if err != nil {
			continue // the port went away, or its name is not there yet
		}
		name := strings.TrimSpace(string(b))
		if strings.HasPrefix(name, portPrefix) {
			ports = append(ports, port{name: name, dev: "/dev/" + filepath.Base(d)})
		}
	}
	return ports, nil
}

// sessionServer serves one host session: it must read from conn until
// Read fails, and close conn when done.
type sessionServer func(ctx context.Context, conn net.Conn)

// servePort serves p for ever: open it, serve session after session, and open
// it again when the stream breaks.
func servePort(ctx context.Context, p port, serve sessionServer) {
	failing := false // log a failing open once, not every poll
	for ctx.Err() == nil {
		err := servePortOnce(ctx, p, serve)
		if err != nil && !failing {
			logf("%s: %v", p.name, err)
		}
		failing = err != nil
		// A stream that breaks at once again (a server that cannot start)
		// must not spin.
		sleep(ctx, pollInterval)
	}
}

// servePortOnce is one open of the port: session after session, until the
// stream breaks. Closing the port then throws away whatever is left
// unread, so the next open starts clean.
func servePortOnce(ctx context.Context, p port, serve sessionServer) error {
	f, err := os.OpenFile(p.dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", p.dev, err)
	}
	defer f.Close()
	return serveStream(ctx, f, p.name, serve)
}

// device is an open virtio-serial port as a stream uses it: the device
// node in the guest, a port that plays the guest kernel's part in tests.
type device interface {
	io.ReadWriteCloser
	SetDeadline(t time.Time) error
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// serveStream serves dev, session after session, until the stream breaks.
func serveStream(ctx context.Context, dev device, name string, serve sessionServer) error {
	s := &stream{ctx: ctx, f: dev, r: bufio.NewReaderSize(dev, 64*1024), name: name, calls: controlCalls}
	for {
		conn := s.session()
		serve(ctx, conn)
		<-conn.closed // the server may return before it closed the conn
		if s.end.Load() != endNext {
			// The stream broke (not ttrpc, out of step, I/O error), or
			// the server gave up on it by itself.
			return ctx.Err()
		}
	}
}

// ttrpc framing, enough to see where a host session begins: each message
// is a 10-byte header (length and stream ID, big-endian uint32s; type;
// flags) and length bytes of payload. Clients number their streams 1, 3,
// 5, ... from 1 on every new connection.
const (
	frameHeaderLen   = 10
	frameMaxLen      = 4 << 20 // ttrpc's own default limit
	frameTypeRequest = 1
)

// stream is an open port shared by its successive host sessions.
//
// Only the bytes on the port tell where a session begins: ttrpc clients
// number their streams 1, 3, 5, ... from 1 on every connection, so a
// request on stream 1 after other messages is a new host, and it gets a
// new server (the last one would refuse its stream IDs: "StreamID cannot
// be re-used").
//
// Whether a host is connected is no guide. The guest takes a port's data
// in the interrupt handler but learns of the host connecting and hanging
// up from control messages that a workqueue handles later
// (drivers/char/virtio_console.c: in_intr vs control_intr), so a new
// host's first request can be read while the guest still sees the last
// host connected, or sees none: a read then returns 0 bytes ("no host")
// although the host that sent the request is there, waiting for the
// reply. Ending the session there dropped that reply (TCPSink in
// TestMacvtapRateLimits hung so). Nor is a host that hung up and came
// back at once always seen to leave. So "no host" only makes the reader
// wait for more data; replies wait, in the kernel, for a host.
//
// The price: a reply owed to a host that left before it was written waits
// for the next host and may reach it, unless the reader sees that host's
// first request first (finish then fails the blocked write). That takes a
// host that gave up on a call; a ttrpc client drops a reply on a stream
// it is not waiting on.
type stream struct {
	ctx   context.Context // ends the waits for a host
	f     device
	r     *bufio.Reader
	name  string
	calls map[string]func([]byte) (any, error) // the control service's JSON methods (controlCalls)

	wmu sync.Mutex    // serialises whole writes, so two sessions' frames never interleave
	end atomic.Int32  // why the current session ended: endNone, endNext, endBroken
	gen atomic.Uint64 // counts ended sessions, so a late control reply finds whether its session is over

	// Owned by the reading session.
	left int           // bytes of the current message not yet read
	seen int           // messages read in the current session
	idle time.Duration // the next look for a host's data (firstHostPoll … pollInterval); 0 after data
}

// Why a session ended.
const (
	endNone   int32 = iota // still running, or the server stopped by itself
	endNext                // a new host session begins on the same stream
	endBroken              // an I/O error, or a stream that is not ttrpc
)

// finish records why the session ends. Replies still owed to it are
// dropped, and a writer blocked for want of a host gives up: its reply
// would reach the next host. No lock here: the blocked writer holds wmu.
func (s *stream) finish(why int32) {
	s.gen.Add(1)
	_ = s.f.SetWriteDeadline(time.Now())
	s.end.Store(why)
}

// session returns the conn for the next host session. A writer of the
// last session has failed on the deadline that finish set and let go of
// wmu before writes may block again.
func (s *stream) session() *sessionConn {
	s.left, s.seen = 0, 0
	s.wmu.Lock()
	_ = s.f.SetWriteDeadline(time.Time{})
	s.wmu.Unlock()
	s.end.Store(endNone)
	return &sessionConn{s: s, closed: make(chan struct{})}
}

// read reads at most len(b) bytes of the current session, io.EOF when a
// new session begins or the stream broke.
func (s *stream) read(b []byte) (int, error) {
	for s.left == 0 {
		h, err := s.r.Peek(frameHeaderLen)
		if len(h) == 0 && errors.Is(err, io.EOF) {
			// No host as the guest sees it, and nothing to read. There
			// is no event for a host's data or arrival here (the port
			// polls readable while no host is connected), hence the
			// sleep, short at first (firstHostPoll).
			s.idle = min(max(2*s.idle, firstHostPoll), pollInterval)
			if !sleep(s.ctx, s.idle) {
				s.finish(endBroken)
				return 0, io.EOF
			}
			continue
		}
		if err != nil {
			s.finish(endBroken)
			return 0, broken(err)
		}
		s.idle = 0
		size := binary.BigEndian.Uint32(h[0:4])
		id := binary.BigEndian.Uint32(h[4:8])
		if size > frameMaxLen {
			s.finish(endBroken)
			return 0, broken(fmt.Errorf("message of %d bytes on stream %d: not ttrpc, or out of step", size, id))
		}
		if id == 1 && h[8] == frameTypeRequest && s.seen > 0 {
			s.finish(endNext)
			return 0, io.EOF // leave the header for the next session
		}
		s.seen++
		if h[8] == frameTypeRequest {
			if done, err := s.control(id, int(size)); err != nil {
				s.finish(endBroken)
				return 0, broken(err)
			} else if done {
				continue
			}
		}
		s.left = frameHeaderLen + int(size)
	}
	n, err := s.r.Read(b[:min(len(b), s.left)])
	s.left -= n
	if err != nil {
		s.finish(endBroken) // the host left in the middle of a message
		return n, broken(err)
	}
	return n, err
}

// broken marks err as the end of the stream for the ttrpc server, which
// closes the connection only on EOF, ErrUnexpectedEOF or ECONNRESET and
// otherwise waits for ever.
func broken(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%w: %w", io.ErrUnexpectedEOF, err)
}

// sessionConn is one host session on a stream, as a net.Conn for the
// ttrpc server.
type sessionConn struct {
	s         *stream
	closeOnce sync.Once
	closed    chan struct{}
}

func (c *sessionConn) Read(b []byte) (int, error) {
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
	}
	return c.s.read(b)
}

func (c *sessionConn) Write(b []byte) (int, error) {
	c.s.wmu.Lock()
	defer c.s.wmu.Unlock()
	select {
	case <-c.closed:
		return 0, net.ErrClosed // a late reply of a finished session
	default:
	}
	return c.s.f.Write(b)
}

// Close ends the session, not the port: the next session may follow on the
// same open port.
func (c *sessionConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

func (c *sessionConn) LocalAddr() net.Addr                { return portAddr(c.s.name) }
func (c *sessionConn) RemoteAddr() net.Addr               { return portAddr("host:" + c.s.name) }
func (c *sessionConn) SetDeadline(t time.Time) error      { return c.s.f.SetDeadline(t) }
func (c *sessionConn) SetReadDeadline(t time.Time) error  { return c.s.f.SetReadDeadline(t) }
func (c *sessionConn) SetWriteDeadline(t time.Time) error { return c.s.f.SetWriteDeadline(t) }

type portAddr string

func (a portAddr) Network() string { return "virtio-serial" }
func (a portAddr) String() string  { return string(a) }

// sleep waits d or until ctx ends, and reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
