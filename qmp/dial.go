package qmp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// maxSunPath is the longest socket path connect(2) takes: sun_path's 108
// bytes less the terminating NUL.
const maxSunPath = len(unix.RawSockaddrUnix{}.Path) - 1

// dialUnix connects to the unix socket at path. A path too long for
// sun_path (a Kata bundle dir is ~117 bytes before the socket's own name)
// is reached through its directory: the directory is opened with O_PATH
// and the socket connected to as /proc/self/fd/<dirfd>/<name>; the
// directory's fd is closed once connected.
func dialUnix(ctx context.Context, path string) (*net.UnixConn, error) {
	addr := path
	if len(path) > maxSunPath {
		dir, name := filepath.Split(path)
		if dir == "" {
			dir = "."
		}
		if name == "" {
			return nil, fmt.Errorf("socket path %q names a directory", path)
		}
		// Equivalent to: exec {dirfd}</path/to/dir; connect /proc/self/fd/$dirfd/name
		fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &os.PathError{Op: "open", Path: dir, Err: err}
		}
		defer unix.Close(fd)
		addr = "/proc/self/fd/" + strconv.Itoa(fd) + "/" + name
		if len(addr) > maxSunPath {
			return nil, fmt.Errorf("socket name %q is too long for a unix socket address even without its directory (%d bytes, at most %d)", name, len(addr), maxSunPath)
		}
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", addr)
	if err != nil {
		return nil, err
	}
	return nc.(*net.UnixConn), nil
}

// dialMonitor is Dial and DialHMP but for their protocol's handshake: it
// connects to the monitor socket at path, lets opts.CheckConn refuse the
// peer, and runs handshake on the connection, all within opts.Timeout or
// ctx's deadline, whichever comes first. Its errors start "<proto> dial
// <path>:".
func dialMonitor(ctx context.Context, proto, path string, opts Options, handshake func(*handshaking) (*Client, error)) (*Client, error) {
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	conn, err := dialUnix(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("%s dial %s: %w", proto, path, err)
	}
	if opts.CheckConn != nil {
		if err := opts.CheckConn(conn); err != nil {
			conn.Close()
			return nil, fmt.Errorf("%s dial %s: refused: %w", proto, path, err)
		}
	}
	c, err := startHandshake(ctx, conn, path, timeout, handshake)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("%s dial %s: %w", proto, path, err)
	}
	return c, nil
}

// handshaking is a monitor connection while its handshake runs: reads and
// writes fail at ctx's deadline, or as soon as ctx is cancelled.
type handshaking struct {
	ctx     context.Context
	conn    *net.UnixConn
	path    string
	timeout time.Duration // the dial's, for the Client
	stop    func() bool   // unregisters the cancellation
}

func startHandshake(ctx context.Context, conn *net.UnixConn, path string, timeout time.Duration, handshake func(*handshaking) (*Client, error)) (*Client, error) {
	deadline, _ := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, err
	}
	// A cancelled (rather than expired) ctx ends a blocked read too.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	return handshake(&handshaking{ctx: ctx, conn: conn, path: path, timeout: timeout, stop: stop})
}

// ctxErr says why a read or write timed out: the socket's deadline may
// fire a hair before ctx's.
func (h *handshaking) ctxErr() error {
	if err := h.ctx.Err(); err != nil {
		return err
	}
	return context.DeadlineExceeded
}

// finish ends the handshake after its last step: the connection loses its
// deadline and ctx's hold on it, for the Client. It fails when ctx ended
// first.
func (h *handshaking) finish(step string) error {
	if !h.stop() {
		return fmt.Errorf("after %s: %w", step, h.ctxErr())
	}
	return h.conn.SetDeadline(time.Time{})
}

// timedOut reports whether err is a read or write past the handshake's
// deadline.
func timedOut(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// silence says what a monitor that sent nothing before the deadline was
// seen doing: the listening process (the socket's peer, by SO_PEERCRED)
// and its state in /proc/<pid>/stat. A stopped or uninterruptible QEMU
// never greets; one that runs is most likely serving another client (a
// monitor socket serves one at a time).
func silence(conn *net.UnixConn) string {
	const busy = "another client probably holds the monitor (a monitor socket serves one client at a time)"
	pid := peerPID(conn)
	if pid <= 0 {
		return busy
	}
	comm, state, err := procState("/proc", pid)
	if err != nil {
		return fmt.Sprintf("its listener, pid %d, cannot be read (%v); %s", pid, err, busy)
	}
	who := fmt.Sprintf("pid %d (%s)", pid, comm)
	switch state {
	case 'T', 't':
		return who + " is stopped (state " + string(state) + ": SIGSTOP or a tracer)"
	case 'D':
		return who + " is in uninterruptible sleep (state D)"
	case 'Z', 'X':
		return who + " has exited (state " + string(state) + ")"
	}
	return who + " is running (state " + string(state) + "): " + busy
}

// peerPID is the pid of the process that listens on conn's socket, or 0
// when it cannot be told (a listener in a pid namespace this one cannot
// see).
func peerPID(conn *net.UnixConn) int {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0
	}
	var cred *unix.Ucred
	// Equivalent to: ss -xp (the peer of a connected unix socket)
	if err := raw.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cred == nil {
		return 0
	}
	return int(cred.Pid)
}

// procState reads the command name and state letter of pid from
// <proc>/<pid>/stat ("1234 (qemu-system-x86) T ...": the name may hold
// spaces and parentheses, so the state follows the last ')').
func procState(proc string, pid int) (comm string, state byte, err error) {
	b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pid), "stat"))
	if err != nil {
		return "", 0, err
	}
	s := string(b)
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open || len(s) < end+3 {
		return "", 0, fmt.Errorf("unexpected %s/%d/stat %.100q", proc, pid, s)
	}
	return s[open+1 : end], s[end+2], nil
}
