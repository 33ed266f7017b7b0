package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// dialStream opens the byte stream that ttrpc runs on. u is never
// kata-shim: Dial resolves that first.
func dialStream(ctx context.Context, u URL) (net.Conn, error) {
	switch u.Scheme {
	case SchemeUnix:
		var d net.Dialer
		return d.DialContext(ctx, "unix", u.Path)
	case SchemeHvsock:
		return dialHvsock(ctx, u)
	case SchemeVsock:
		return dialVsock(ctx, u.CID, u.Port)
	default:
		return nil, fmt.Errorf("scheme %q cannot carry the agent protocol", u.Scheme)
	}
}

// hvsockAnswerMax bounds the handshake answer line. Firecracker answers
// "OK <host port>\n".
const hvsockAnswerMax = 128

// dialHvsock connects to a hybrid vsock: the VMM's unix socket, then a
// one-line handshake naming the guest port.
//
// Equivalent to: socat - UNIX-CONNECT:PATH, then typing "CONNECT PORT".
func dialHvsock(ctx context.Context, u URL) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", u.Path)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	// Close the conn if ctx ends mid-handshake (it may have no deadline).
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	answer, err := hvsockHandshake(conn, u.Port)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("hybrid vsock handshake: %w", err)
	}
	if !strings.HasPrefix(answer, "OK") {
		conn.Close()
		return nil, fmt.Errorf("hybrid vsock handshake: answer %q, want OK (is port %d listening in the guest?)", answer, u.Port)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

func hvsockHandshake(conn net.Conn, port uint32) (string, error) {
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return "", err
	}
	// One byte at a time: the ttrpc stream starts right after the newline,
	// and a buffered reader would swallow its first bytes.
	var line []byte
	b := make([]byte, 1)
	for len(line) < hvsockAnswerMax {
		if _, err := conn.Read(b); err != nil {
			if errors.Is(err, io.EOF) {
				return "", fmt.Errorf("closed after %q", line)
			}
			return "", err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return "", fmt.Errorf("answer longer than %d bytes: %q…", hvsockAnswerMax, line)
}

// shimAgentURLMax bounds the shim's answer; an agent URL is short.
const shimAgentURLMax = 4096

// resolveKataShim asks the Kata shim for its agent's URL.
//
// Equivalent to: curl --unix-socket PATH http://shim/agent-url
func resolveKataShim(ctx context.Context, path string) (URL, error) {
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://shim/agent-url", nil)
	if err != nil {
		return URL{}, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return URL{}, fmt.Errorf("get /agent-url: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, shimAgentURLMax+1))
	if err != nil {
		return URL{}, fmt.Errorf("get /agent-url: read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return URL{}, fmt.Errorf("get /agent-url: %s: %q", resp.Status, truncate(body, 200))
	}
	if len(body) > shimAgentURLMax {
		return URL{}, fmt.Errorf("get /agent-url: answer longer than %d bytes", shimAgentURLMax)
	}
	u, err := ParseURL(strings.TrimSpace(string(body)))
	if err != nil {
		return URL{}, fmt.Errorf("get /agent-url: %w", err)
	}
	if u.Scheme == SchemeKataShim {
		return URL{}, fmt.Errorf("get /agent-url: answered another shim %s", u)
	}
	return u, nil
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "…"
	}
	return string(b)
}

// dialVsock connects an AF_VSOCK stream socket. The net package has no
// vsock support, so the socket is made by hand, non-blocking, and handed
// to the runtime poller through os.File, which also gives deadlines.
func dialVsock(ctx context.Context, cid, port uint32) (net.Conn, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("vsock:%d:%d", cid, port))
	sa := &unix.SockaddrVM{CID: cid, Port: port}
	if err := connectFile(ctx, f, sa); err != nil {
		f.Close()
		return nil, err
	}
	return &vsockConn{File: f, remote: vsockAddr{cid, port}}, nil
}

// connectFile connects a non-blocking socket and waits for the result the
// way the net package does: writable, then SO_ERROR, then getpeername
// (a spurious wake-up leaves the socket unconnected).
func connectFile(ctx context.Context, f *os.File, sa unix.Sockaddr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok {
		f.SetWriteDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	started := false
	var cerr error
	werr := rc.Write(func(fd uintptr) bool {
		if !started {
			started = true
			cerr = unix.Connect(int(fd), sa)
			return !errors.Is(cerr, unix.EINPROGRESS)
		}
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		switch {
		case err != nil:
			cerr = err
		case v != 0:
			cerr = unix.Errno(v)
		default:
			if _, err := unix.Getpeername(int(fd)); errors.Is(err, unix.ENOTCONN) {
				return false
			}
			cerr = nil
		}
		return true
	})
	f.SetWriteDeadline(time.Time{})
	if werr != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("connect: %w", ctx.Err())
		}
		return fmt.Errorf("connect: %w", werr)
	}
	if cerr != nil {
		return os.NewSyscallError("connect", cerr)
	}
	return nil
}

type vsockAddr struct{ cid, port uint32 }

func (a vsockAddr) Network() string { return "vsock" }
func (a vsockAddr) String() string  { return fmt.Sprintf("%d:%d", a.cid, a.port) }

// vsockConn is a net.Conn over a connected AF_VSOCK socket.
type vsockConn struct {
	*os.File
	remote vsockAddr
}

func (c *vsockConn) LocalAddr() net.Addr  { return vsockAddr{unix.VMADDR_CID_HOST, 0} }
func (c *vsockConn) RemoteAddr() net.Addr { return c.remote }
