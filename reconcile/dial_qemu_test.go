package reconcile

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testnet"
)

// dialEnded waits until sandbox id's background dial has ended; then its
// goroutine has decided whether to call OnDialDone.
func dialEnded(t *testing.T, r *Reconciler, id string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		var ended bool
		withRuntime(r, id, func(rt *sandboxRuntime) { ended = rt == nil || rt.dial == nil || rt.dial.done })
		if ended {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the dial of sandbox %s has not ended within a minute", id)
		}
		time.Sleep(10 * time.Millisecond) // polling the dial, bounded by the deadline
	}
}

// A sandbox dialled at registration (Connect) has its first pass find the
// monitor connected: one pass, no ErrConnecting, and no OnDialDone call,
// since no pass waited for the dial. Without Connect, the first pass
// starts the dial and ends with ErrConnecting, and the dial's end calls
// OnDialDone for the next.
func TestConnectBeforeFirstPass(t *testing.T) {
	g := newModelRig(t, 2)
	restart := func(connect bool) chan string {
		g.r.Close()
		g.r = New(g.store)
		t.Cleanup(g.r.Close)
		called := make(chan string, 4)
		g.r.OnDialDone = func(id string) { called <- id }
		if _, err := g.r.Register(g.sb, SourceConfig); err != nil {
			t.Fatal(err)
		}
		if connect {
			g.r.Connect(g.ctx, g.sb.ID)
			dialEnded(t, g.r, g.sb.ID)
		}
		return called
	}

	called := restart(true)
	if err := g.r.Reconcile(g.ctx, g.sb.ID); err != nil {
		t.Fatalf("first pass after Connect: %v; want it connected", err)
	}
	select {
	case id := <-called:
		t.Errorf("OnDialDone(%s) called for a dial no pass waited for", id)
	default:
	}

	called = restart(false)
	if err := g.r.Reconcile(g.ctx, g.sb.ID); !errors.Is(err, ErrConnecting) {
		t.Fatalf("first pass without Connect: %v; want ErrConnecting", err)
	}
	select {
	case <-called:
	case <-time.After(time.Minute):
		t.Fatal("the dial's end did not call OnDialDone")
	}
	if err := g.r.Reconcile(g.ctx, g.sb.ID); err != nil {
		t.Fatalf("the pass after the dial: %v", err)
	}
}

// A pass that finds Connect's dial under way (a monitor that accepts but
// never greets) ends with ErrConnecting, and the dial's end, a timeout,
// calls OnDialDone; the pass after it reports the dial's error.
func TestConnectUnderWayWaited(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-dial")
	sock := filepath.Join(t.TempDir(), "silent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn // accepted, silent: no greeting; the accept loop's until it ends
	ended := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-ended
		for _, c := range held {
			c.Close()
		}
	})
	go func() {
		defer close(ended)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	sb := Sandbox{ID: "silent", Netns: ns.Path, QMP: sock, QMPTimeout: 300 * time.Millisecond}
	r, called := connectRig(t, sb)
	ctx := context.Background()
	if err := r.Reconcile(ctx, sb.ID); !errors.Is(err, ErrConnecting) {
		t.Fatalf("pass during the dial: %v; want ErrConnecting", err)
	}
	passAfterDial(t, r, sb.ID, called)
}

// connectRig registers sb with a reconciler of its own whose OnDialDone
// reports on called, and starts its dial ahead of the passes (Connect).
func connectRig(t *testing.T, sb Sandbox) (*Reconciler, chan string) {
	t.Helper()
	r := newTestReconciler(t)
	called := make(chan string, 4)
	r.OnDialDone = func(id string) { called <- id }
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	r.Connect(context.Background(), sb.ID)
	return r, called
}

// passAfterDial waits for the dial's end to call OnDialDone; the pass
// after it must report the dial's error.
func passAfterDial(t *testing.T, r *Reconciler, id string, called chan string) {
	t.Helper()
	select {
	case <-called:
	case <-time.After(time.Minute):
		t.Fatal("the dial's end did not call OnDialDone")
	}
	if err := r.Reconcile(context.Background(), id); err == nil || errors.Is(err, ErrConnecting) {
		t.Fatalf("the pass after the dial: %v; want the dial's error", err)
	}
}

// A dial made ahead of the passes that failed (no monitor yet) is not
// reported by a later pass: that pass dials again, and reports that
// dial's outcome.
func TestConnectFailedDialedAgain(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-dial")
	sb := Sandbox{ID: "early", Netns: ns.Path, QMP: filepath.Join(t.TempDir(), "none.sock")}
	r, called := connectRig(t, sb)
	dialEnded(t, r, sb.ID)
	if err := r.Reconcile(context.Background(), sb.ID); !errors.Is(err, ErrConnecting) {
		t.Fatalf("pass after a failed early dial: %v; want ErrConnecting (a new dial)", err)
	}
	passAfterDial(t, r, sb.ID, called)
}
