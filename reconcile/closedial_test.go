package reconcile

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/qmp"
)

// slowPeer is a unix socket serving one client: it sends greeting (if
// any), reads the client's first line, and answers it with answer only
// when the test calls release. Until then the client's dial is under way.
// It reports when the first line is in (asked) and when the client has
// closed the connection (closed: EOF).
type slowPeer struct {
	path           string
	asked, closed  chan struct{}
	release        func()
	answer, ended  chan struct{}
	mu             sync.Mutex
	conn           net.Conn
	greeting, resp string
}

func startSlowPeer(t *testing.T, greeting, resp string) *slowPeer {
	t.Helper()
	// Not t.TempDir: its path can exceed a socket address's 108 bytes.
	dir, err := os.MkdirTemp("", "tsslow")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &slowPeer{
		path: filepath.Join(dir, "peer.sock"), greeting: greeting, resp: resp,
		asked: make(chan struct{}), closed: make(chan struct{}), answer: make(chan struct{}), ended: make(chan struct{}),
	}
	p.release = sync.OnceFunc(func() { close(p.answer) })
	ln, err := net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	go p.serve(ln)
	t.Cleanup(func() {
		ln.Close()
		p.release()
		p.mu.Lock()
		if p.conn != nil {
			p.conn.Close()
		}
		p.mu.Unlock()
		<-p.ended
	})
	return p
}

func (p *slowPeer) serve(ln net.Listener) {
	defer close(p.ended)
	conn, err := ln.Accept()
	if err != nil {
		return
	}
	p.mu.Lock()
	p.conn = conn
	p.mu.Unlock()
	if p.greeting != "" {
		if _, err := io.WriteString(conn, p.greeting+"\n"); err != nil {
			return
		}
	}
	br := bufio.NewReader(conn)
	if _, err := br.ReadString('\n'); err != nil {
		return
	}
	close(p.asked)
	<-p.answer
	if _, err := io.WriteString(conn, p.resp+"\n"); err != nil {
		return
	}
	// Whatever the client sends next is of no interest: only its end.
	if _, err := io.Copy(io.Discard, br); err == nil {
		close(p.closed) // EOF
	}
}

// wait waits for c, failing the test with what after a minute: the peer
// is local, and each step is one write away.
func wait(t *testing.T, c chan struct{}, what string) {
	t.Helper()
	select {
	case <-c:
	case <-time.After(time.Minute):
		t.Fatalf("no %s within a minute", what)
	}
}

// A QMP dial that completes after Close (its handshake answered only
// then) does not leave its connection with the closed reconciler, where
// nothing would ever close it: the dial closes it and fails.
func TestQMPDialAfterCloseIsClosed(t *testing.T) {
	peer := startSlowPeer(t, `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}`,
		`{"return": {}, "id": "0"}`)
	r := newTestReconciler(t)
	if _, err := r.Register(Sandbox{ID: "sb", Netns: filepath.Join(t.TempDir(), "netns"), QMP: peer.path, QMPTimeout: time.Minute}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	sb, err := r.sandbox("sb")
	if err != nil {
		t.Fatal(err)
	}
	err = dialAcrossClose(t, r, peer, "qmp_capabilities", func() (*qmp.Client, error) { return r.client(context.Background(), sb) })
	if !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("dial after Close: %v; want qmp.ErrClosed", err)
	}
	withRuntime(r, "sb", func(rt *sandboxRuntime) {
		if rt != nil && rt.conn != nil {
			t.Error("the closed reconciler holds the connection dialled across Close")
		}
	})
	wait(t, peer.closed, "EOF at the monitor: the connection dialled across Close is still open")
}

// An agent dial that completes after Close (a hybrid vsock whose
// handshake is answered only then) does not leave its connection with
// the closed reconciler: the dial closes it and fails.
func TestAgentDialAfterCloseIsClosed(t *testing.T) {
	peer := startSlowPeer(t, "", "OK 1073741824")
	r := newTestReconciler(t)
	sb := Sandbox{ID: "sb", Netns: filepath.Join(t.TempDir(), "netns"), QMP: "/nonexistent.sock",
		Agent: agent.URL{Scheme: agent.SchemeHvsock, Path: peer.path, Port: 1024}, GuestTimeout: time.Minute}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	sb, err := r.sandbox("sb")
	if err != nil {
		t.Fatal(err)
	}
	dialAcrossClose(t, r, peer, "CONNECT", func() (*agent.Client, error) { return r.agentClient(context.Background(), sb) })
	withRuntime(r, "sb", func(rt *sandboxRuntime) {
		if rt != nil && rt.agent != nil {
			t.Error("the closed reconciler holds the agent connection dialled across Close")
		}
	})
	wait(t, peer.closed, "EOF at the agent's socket: the connection dialled across Close is still open")
}

// dialAcrossClose runs dial until the peer has been asked its handshake
// (asked names it), closes r, lets the peer answer, and returns the
// dial's error; a dial that returns a connection fails the test.
func dialAcrossClose[C interface{ Close() error }](t *testing.T, r *Reconciler, peer *slowPeer, asked string, dial func() (C, error)) error {
	t.Helper()
	type result struct {
		c   C
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := dial()
		done <- result{c, err}
	}()
	wait(t, peer.asked, asked+" from the dial")
	r.Close()
	peer.release()
	res := <-done
	if res.err == nil {
		res.c.Close()
		t.Fatal("a dial completed after Close returned a connection; want it closed and an error")
	}
	return res.err
}
