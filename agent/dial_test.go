package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/tapsync/tapsync/agent/agentpb"
)

// testTimeout is the client timeout of these tests: generous, since a
// passing test never waits for it (only the deadline test does).
const testTimeout = 5 * time.Second

// fakeAgent is a real ttrpc server with canned answers: the wire, codec
// and status handling under test are ttrpc's own.
func fakeAgent(t *testing.T, l net.Listener) {
	t.Helper()
	ts, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	ts.RegisterService(healthService, &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"Check": func(_ context.Context, unmarshal func(any) error) (any, error) {
			if err := unmarshal(&agentpb.CheckRequest{}); err != nil {
				return nil, err
			}
			return &agentpb.HealthCheckResponse{Status: agentpb.HealthCheckResponse_SERVING}, nil
		},
	}})
	ts.RegisterService(agentService, &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"UpdateInterface": func(_ context.Context, unmarshal func(any) error) (any, error) {
			req := &agentpb.UpdateInterfaceRequest{}
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			if req.GetInterface().GetHwAddr() == "02:00:00:00:00:99" {
				return nil, fmt.Errorf("Link not found (Address: %s)", req.GetInterface().GetHwAddr())
			}
			return proto.Clone(req.GetInterface()), nil
		},
	}})
	go ts.Serve(context.Background(), l)
	t.Cleanup(func() { ts.Close() })
}

func listenUnix(t *testing.T, name string) (net.Listener, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, path
}

func dial(t *testing.T, s string) *Client {
	t.Helper()
	u, err := ParseURL(s)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Dial(context.Background(), u, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestUnix(t *testing.T) {
	l, path := listenUnix(t, "agent.sock")
	fakeAgent(t, l)
	c := dial(t, "unix://"+path)
	ctx := context.Background()
	if err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	want := Interface{Name: "eth1", MAC: mustMAC("02:00:00:00:00:01"), MTU: 1400, Addrs: nil}
	got, err := c.UpdateInterface(ctx, want)
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != want.Name || got.MTU != want.MTU || got.MAC.String() != want.MAC.String() {
		t.Errorf("UpdateInterface answered %+v, want %+v", got, want)
	}

	// Kata's "not there yet" answer.
	_, err = c.UpdateInterface(ctx, Interface{Name: "eth2", MAC: mustMAC("02:00:00:00:00:99")})
	if !errors.Is(err, ErrLinkNotFound) || IsUnimplemented(err) {
		t.Errorf("missing link: err = %v, want ErrLinkNotFound", err)
	}
	if !strings.Contains(err.Error(), "UpdateInterface") || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not name the method and the agent", err)
	}

	// The fake does not implement ListRoutes.
	_, err = c.ListRoutes(ctx)
	if !IsUnimplemented(err) || errors.Is(err, ErrLinkNotFound) {
		t.Errorf("ListRoutes: err = %v, want unimplemented", err)
	}
	if IsUnimplemented(errors.New("unimplemented")) || IsUnimplemented(nil) {
		t.Error("IsUnimplemented is true for a plain error")
	}
}

// hvsockListener does the VMM's side of the hybrid vsock handshake on
// every accepted connection before handing it to ttrpc.
type hvsockListener struct {
	net.Listener
	answer string
	got    chan string
}

func (l *hvsockListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		var line []byte
		b := make([]byte, 1)
		for {
			if _, err := c.Read(b); err != nil || b[0] == '\n' {
				break
			}
			line = append(line, b[0])
		}
		l.got <- string(line)
		fmt.Fprintf(c, "%s\n", l.answer)
		if strings.HasPrefix(l.answer, "OK") {
			return c, nil
		}
		c.Close()
	}
}

func TestHvsock(t *testing.T) {
	l, path := listenUnix(t, "kata.hvsock")
	hl := &hvsockListener{Listener: l, answer: "OK 1073741824", got: make(chan string, 1)}
	fakeAgent(t, hl)
	c := dial(t, fmt.Sprintf("hvsock://%s:1024", path))
	if got := <-hl.got; got != "CONNECT 1024" {
		t.Errorf("handshake sent %q, want CONNECT 1024", got)
	}
	// The first ttrpc bytes follow the answer at once: a call proves the
	// client did not swallow them.
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestHvsockRefused(t *testing.T) {
	l, path := listenUnix(t, "kata.hvsock")
	hl := &hvsockListener{Listener: l, answer: "FAILURE no listener", got: make(chan string, 1)}
	go hl.Accept()
	u, _ := ParseURL(fmt.Sprintf("hvsock://%s:1025", path))
	_, err := Dial(context.Background(), u, testTimeout)
	if err == nil {
		t.Fatal("dial succeeded on a refused handshake")
	}
	for _, want := range []string{path, "FAILURE no listener", "want OK"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// fakeShim serves GET /agent-url on a unix socket like the Kata shim's
// monitor socket.
func fakeShim(t *testing.T, status int, body string) string {
	t.Helper()
	l, path := listenUnix(t, "shim-monitor.sock")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/agent-url" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(status)
		fmt.Fprint(w, body)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return path
}

func TestKataShim(t *testing.T) {
	l, agentPath := listenUnix(t, "agent.sock")
	fakeAgent(t, l)
	shim := fakeShim(t, http.StatusOK, "unix://"+agentPath+"\n")
	c := dial(t, "kata-shim://"+shim)
	if got, want := c.URL(), (URL{Scheme: SchemeUnix, Path: agentPath}); got != want {
		t.Errorf("URL() = %v, want the resolved %v", got, want)
	}
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestKataShimErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		status int
		body   string
		want   string
	}{
		{"404", http.StatusNotFound, "no such sandbox", "404"},
		{"garbage", http.StatusOK, "<html>hello</html>", "no scheme"},
		{"unknown scheme", http.StatusOK, "tcp://1.2.3.4:5", "unknown scheme"},
		{"loop", http.StatusOK, "kata-shim:///run/x.sock", "another shim"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			shim := fakeShim(t, tc.status, tc.body)
			u, _ := ParseURL("kata-shim://" + shim)
			_, err := Dial(context.Background(), u, testTimeout)
			if err == nil {
				t.Fatal("dial succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), shim) {
				t.Errorf("error %q does not say %q and name the shim", err, tc.want)
			}
		})
	}
}

// TestCallDeadline: an agent that accepts and never answers fails the call
// after the client's timeout, saying so.
func TestCallDeadline(t *testing.T) {
	l, path := listenUnix(t, "silent.sock")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	u, _ := ParseURL("unix://" + path)
	const timeout = 200 * time.Millisecond
	c, err := Dial(context.Background(), u, timeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	err = c.Check(context.Background())
	if err == nil {
		t.Fatal("a silent agent answered")
	}
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer within") {
		t.Errorf("err = %v, want a deadline error saying so", err)
	}
	if elapsed := time.Since(start); elapsed < timeout {
		t.Errorf("failed after %v, before the %v timeout", elapsed, timeout)
	}

	// A sooner ctx deadline wins over the client's timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := c.Check(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("ctx deadline: err = %v", err)
	}
}

// TestDialDeadline: a hybrid vsock that accepts and never answers the
// handshake fails the dial after the timeout.
func TestDialDeadline(t *testing.T) {
	l, path := listenUnix(t, "silent.hvsock")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	u, _ := ParseURL(fmt.Sprintf("hvsock://%s:1024", path))
	_, err := Dial(context.Background(), u, 200*time.Millisecond)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want a timeout", err)
	}
}

// TestDone: Done is closed when the agent goes away.
func TestDone(t *testing.T) {
	l, path := listenUnix(t, "agent.sock")
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c := dial(t, "unix://"+path)
	select {
	case <-c.Done():
		t.Fatal("Done closed on a live connection")
	default:
	}
	(<-accepted).Close()
	select {
	case <-c.Done():
	case <-time.After(testTimeout):
		t.Fatal("Done not closed within the deadline after the agent hung up")
	}
	if err := c.Check(context.Background()); err == nil {
		t.Error("call on a closed connection succeeded")
	}
}

func TestDialErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none.sock")
	for _, s := range []string{"unix://" + missing, "hvsock://" + missing + ":1024", "kata-shim://" + missing} {
		u, _ := ParseURL(s)
		_, err := Dial(context.Background(), u, testTimeout)
		if err == nil || !strings.Contains(err.Error(), missing) {
			t.Errorf("Dial(%s): err = %v, want one naming the socket", s, err)
		}
	}
	if _, err := Dial(context.Background(), URL{Scheme: SchemeUnix, Path: missing}, 0); err == nil {
		t.Error("Dial accepted a zero timeout")
	}
}

// TestVsockConnect exercises the AF_VSOCK connect path as far as this
// machine allows: without vhost-vsock no guest exists, so the connect to
// local CID 1 either fails at once (loopback transport loaded) or hangs
// until the dial deadline (none). Either way Dial must return an error
// naming the URL rather than block.
func TestVsockConnect(t *testing.T) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Skipf("skipping: no AF_VSOCK sockets here: %v", err)
	}
	unix.Close(fd)
	u := URL{Scheme: SchemeVsock, CID: 1, Port: 50123}
	_, err = Dial(context.Background(), u, 200*time.Millisecond)
	if err == nil {
		t.Fatal("vsock dial to nobody succeeded")
	}
	if !strings.Contains(err.Error(), u.String()) {
		t.Errorf("error %q does not name %s", err, u)
	}
	t.Logf("vsock dial: %v", err)
}
