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

	"golang.org/x/sys/unix"
)

// portPrefix selects the virtio-serial ports this agent serves.
const portPrefix = "agent."

// pollInterval paces the waits that have no event to wait on: for a port
// to appear, and for the host to connect to one.
const pollInterval = 100 * time.Millisecond

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

// servePort serves p for ever: open it, serve host after host, and open
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

// servePortOnce is one open of the port: host after host, session after
// session, until the stream breaks. Closing the port then throws away
// whatever is left unread, so the next open starts clean.
func servePortOnce(ctx context.Context, p port, serve sessionServer) error {
	f, err := os.OpenFile(p.dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", p.dev, err)
	}
	defer f.Close()
	s := &stream{f: f, r: bufio.NewReaderSize(f, 64*1024), name: p.name}
	for {
		if err := waitHost(ctx, f); err != nil {
			return fmt.Errorf("wait for the host on %s: %w", p.dev, err)
		}
		s.rearm()
	sessions:
		for {
			conn := s.session()
			serve(ctx, conn)
			<-conn.closed // the server may return before it closed the conn
			switch s.end.Load() {
			case endNext:
			case endHostLeft:
				break sessions
			default:
				// The stream broke (not ttrpc, out of step, I/O
				// error), or the server gave up on it by itself.
				return ctx.Err()
			}
		}
	}
}

// waitHost returns once the host side of the port is connected. While no
// host is connected, a virtio console port polls POLLHUP (and POLLIN:
// reads return 0 at once); there is no event for "connected", hence the
// sleep between polls. Data a departed host left behind is not worth
// waking for: nobody is there to read the reply.
func waitHost(ctx context.Context, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	for {
		var revents int16
		var perr error
		// Control, not f.Fd(): Fd would put the file back in blocking
		// mode and take it out of Go's poller.
		err := rc.Control(func(fd uintptr) {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			_, perr = unix.Poll(pfd, 0)
			revents = pfd[0].Revents
		})
		if err == nil {
			err = perr
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("poll: %w", err)
		}
		if err == nil && revents&unix.POLLHUP == 0 {
			return nil
		}
		if !sleep(ctx, pollInterval) {
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
// A host that hangs up and connects again quickly may never be seen to
// leave: the guest learns of both changes together and the port never
// reads EOF. The new client then talks to a server that has seen its
// stream IDs already (ttrpc refuses them: "StreamID cannot be re-used").
// So the reader watches frame boundaries: a request on stream 1 after
// other messages starts a new session with a new server.
type stream struct {
	f    *os.File
	r    *bufio.Reader
	name string

	wmu sync.Mutex    // serialises whole writes, so two sessions' frames never interleave
	end atomic.Int32  // why the current session ended: endNone, endNext, ...
	gen atomic.Uint64 // counts sessions, so a late control reply finds whether its session is over

	// Owned by the reading session.
	left int // bytes of the current message not yet read
	seen int // messages read in the current session
}

// Why a session ended.
const (
	endNone     int32 = iota // still running, or the server stopped by itself
	endNext                  // a new host session begins on the same stream
	endHostLeft              // the host hung up between two messages
	endBroken                // an I/O error, or a stream that is not ttrpc
)

// finish records why the session ends. Unless another session follows at
// once, it also unblocks a writer: writes to a port without a host block
// until one connects, and a reply owed to a departed client is worth
// nothing. No lock here: the blocked writer holds wmu.
func (s *stream) finish(why int32) {
	s.gen.Add(1) // replies still owed to this session are dropped
	if why != endNext {
		_ = s.f.SetWriteDeadline(time.Now())
	}
	s.end.Store(why)
}

// rearm prepares the stream for a new host: nothing of the last one is
// buffered (its last read found no data) and writes may block again. A
// writer still stuck from the last host fails on the deadline and lets go
// of wmu first.
func (s *stream) rearm() {
	s.r.Reset(s.f)
	s.wmu.Lock()
	_ = s.f.SetWriteDeadline(time.Time{})
	s.wmu.Unlock()
}

// session returns the conn for the next host session.
func (s *stream) session() *sessionConn {
	s.left, s.seen = 0, 0
	s.gen.Add(1)
	s.end.Store(endNone)
	return &sessionConn{s: s, closed: make(chan struct{})}
}

// read reads at most len(b) bytes of the current session, io.EOF when the
// host hung up or a new session begins.
func (s *stream) read(b []byte) (int, error) {
	for s.left == 0 {
		h, err := s.r.Peek(frameHeaderLen)
		if err != nil {
			if len(h) == 0 && errors.Is(err, io.EOF) {
				s.finish(endHostLeft)
				return 0, io.EOF
			}
			s.finish(endBroken)
			if errors.Is(err, io.EOF) {
				return 0, io.ErrUnexpectedEOF
			}
			return 0, err
		}
		size := binary.BigEndian.Uint32(h[0:4])
		id := binary.BigEndian.Uint32(h[4:8])
		if size > frameMaxLen {
			s.finish(endBroken)
			return 0, fmt.Errorf("message of %d bytes on stream %d: not ttrpc, or out of step", size, id)
		}
		if id == 1 && h[8] == frameTypeRequest && s.seen > 0 {
			s.finish(endNext)
			return 0, io.EOF // leave the header for the next session
		}
		s.seen++
		if h[8] == frameTypeRequest {
			if done, err := s.control(id, int(size)); err != nil {
				s.finish(endBroken)
				return 0, err
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
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
	}
	return n, err
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
