package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/tapsync/tapsync/agent/agentpb"
	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// fakePort plays the guest kernel's part of a virtio-serial port, with
// the one freedom the real one has that matters here: the guest takes a
// port's data from the interrupt handler at once, but learns that the host
// connected or hung up from control messages that a workqueue handles
// later (drivers/char/virtio_console.c: in_intr vs control_intr →
// schedule_work). So the first request of a new host can be read before
// the guest has learned of the old host's departure, or of the new host's
// arrival. Notices queue until the test delivers them, unless auto.
//
// As on the real port: a read returns what the host sent, else 0 bytes
// (EOF) when the guest sees no host, else blocks; a write blocks while
// the guest sees no host (until its deadline), and what the guest writes
// while no host is attached is thrown away (QEMU's handle_output).
type fakePort struct {
	mu      sync.Mutex
	cond    *sync.Cond
	in      []byte    // sent by a host, not yet read by the guest
	sees    bool      // the guest's view: a host is connected
	host    *fakeHost // the host attached (QEMU's view), nil for none
	notices []bool    // host changes the guest has not learned yet (true: connected)
	auto    bool      // deliver notices as they come
	wdl     time.Time // write deadline
	closed  bool
	eofs    int // reads that found no data and no host
}

func newFakePort() *fakePort {
	p := &fakePort{auto: true}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// connect attaches a new host, as QEMU accepts a client on the chardev.
func (p *fakePort) connect() *fakeHost {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.host != nil {
		panic("fakePort: one host at a time")
	}
	h := &fakeHost{p: p}
	p.host = h
	p.noticeLocked(true)
	return h
}

func (p *fakePort) noticeLocked(connected bool) {
	p.notices = append(p.notices, connected)
	if p.auto {
		p.deliverLocked(len(p.notices), true)
	}
}

// deliver hands the guest the next n notices. Unless wake, the reader is
// not woken: as a reader that the guest has not scheduled yet.
func (p *fakePort) deliver(n int, wake bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.deliverLocked(n, wake)
}

func (p *fakePort) deliverLocked(n int, wake bool) {
	for range n {
		p.sees, p.notices = p.notices[0], p.notices[1:]
	}
	if wake {
		p.cond.Broadcast()
	}
}

func (p *fakePort) setAuto(auto bool) {
	p.mu.Lock()
	p.auto = auto
	p.mu.Unlock()
}

// waitEOFs waits until the guest's reads have found no host more than
// since times, and returns the count.
func (p *fakePort) waitEOFs(t *testing.T, since int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	stop := context.AfterFunc(t.Context(), func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer stop()
	timer := time.AfterFunc(time.Until(deadline), func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer timer.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.eofs <= since {
		if time.Now().After(deadline) {
			t.Fatalf("the guest's reader did not see the host gone within 10 s (%d reads found no host)", p.eofs)
		}
		p.cond.Wait()
	}
	return p.eofs
}

func (p *fakePort) eofCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.eofs
}

func (p *fakePort) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		switch {
		case p.closed:
			return 0, os.ErrClosed
		case len(p.in) > 0:
			n := copy(b, p.in)
			p.in = p.in[n:]
			return n, nil
		case !p.sees:
			p.eofs++
			p.cond.Broadcast()
			return 0, io.EOF
		}
		p.cond.Wait()
	}
}

func (p *fakePort) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		switch {
		case p.closed:
			return 0, os.ErrClosed
		case !p.wdl.IsZero() && !time.Now().Before(p.wdl):
			return 0, os.ErrDeadlineExceeded
		case p.sees:
			if p.host != nil {
				p.host.out = append(p.host.out, b...)
				p.cond.Broadcast()
			}
			return len(b), nil
		}
		p.cond.Wait()
	}
}

func (p *fakePort) SetWriteDeadline(t time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wdl = t
	if !t.IsZero() {
		time.AfterFunc(time.Until(t), func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	}
	p.cond.Broadcast()
	return nil
}

func (p *fakePort) SetReadDeadline(time.Time) error { return nil } // the stream sets none
func (p *fakePort) SetDeadline(t time.Time) error   { return p.SetWriteDeadline(t) }

func (p *fakePort) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	p.cond.Broadcast()
	return nil
}

// fakeHost is the host's end of a fakePort: what a client of QEMU's
// chardev socket holds.
type fakeHost struct {
	p    *fakePort
	out  []byte // written by the guest, not yet read by the host
	gone bool
}

func (h *fakeHost) Read(b []byte) (int, error) {
	p := h.p
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(h.out) == 0 && !h.gone {
		p.cond.Wait()
	}
	if len(h.out) == 0 {
		return 0, net.ErrClosed
	}
	n := copy(b, h.out)
	h.out = h.out[n:]
	return n, nil
}

func (h *fakeHost) Write(b []byte) (int, error) {
	p := h.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if h.gone {
		return 0, net.ErrClosed
	}
	p.in = append(p.in, b...)
	p.cond.Broadcast()
	return len(b), nil
}

// Close hangs up: QEMU detaches the host and queues the notice.
func (h *fakeHost) Close() error {
	p := h.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if h.gone {
		return nil
	}
	h.gone = true
	if p.host == h {
		p.host = nil
		p.noticeLocked(false)
	}
	p.cond.Broadcast()
	return nil
}

func (h *fakeHost) LocalAddr() net.Addr                { return portAddr("host") }
func (h *fakeHost) RemoteAddr() net.Addr               { return portAddr("guest") }
func (h *fakeHost) SetDeadline(t time.Time) error      { return nil }
func (h *fakeHost) SetReadDeadline(t time.Time) error  { return nil }
func (h *fakeHost) SetWriteDeadline(t time.Time) error { return nil }

// servedPort serves a fakePort with the agent's own session server, until
// the test ends.
func servedPort(t *testing.T) *fakePort {
	t.Helper()
	serve, err := newSessionServer()
	if err != nil {
		t.Fatal(err)
	}
	p := newFakePort()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			_ = serveStream(ctx, p, "agent.fake", serve)
		}
	}()
	t.Cleanup(func() {
		cancel()
		p.Close()
		<-done
	})
	return p
}

// hostClient is one host session: a ttrpc client on a fakeHost.
type hostClient struct {
	h *fakeHost
	c *ttrpc.Client
}

func dialFake(p *fakePort) *hostClient {
	h := p.connect()
	return &hostClient{h: h, c: ttrpc.NewClient(h)}
}

func (hc *hostClient) close() {
	hc.c.Close() // closes the fakeHost
}

// check makes a call the session's ttrpc server answers.
func (hc *hostClient) check(ctx context.Context) error {
	var resp agentpb.HealthCheckResponse
	return hc.c.Call(ctx, "grpc.Health", "Check", &agentpb.CheckRequest{}, &resp)
}

// traffic makes a call the stream's control service answers.
func (hc *hostClient) traffic(ctx context.Context, method string, req, resp any) error {
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var out wrapperspb.BytesValue
	if err := hc.c.Call(ctx, control.Service, method, wrapperspb.Bytes(b), &out); err != nil {
		return err
	}
	return json.Unmarshal(out.Value, resp)
}

// TestStreamHostChangeNotices: whatever order the guest learns of host A
// leaving and host B arriving in, relative to B's first request, B gets
// its replies, both from the session's ttrpc server and from the control
// service, and its later calls are served too. "request before arrival"
// is the order of the TCPSink that never got a reply in
// TestMacvtapRateLimits.
func TestStreamHostChangeNotices(t *testing.T) {
	// Each order has its steps: after A hung up, after B connected, and
	// after the guest read B's first request. Notices wait until a step
	// delivers them; eofs is where the reader's count of "no host" stood.
	type steps struct {
		left, connected, read func(t *testing.T, p *fakePort, eofs *int)
	}
	orders := []struct {
		name string
		steps
	}{
		{"in order", steps{
			// The guest learns that A left and sees no host for a while.
			left: func(t *testing.T, p *fakePort, eofs *int) {
				n := p.eofCount()
				p.deliver(1, true)
				p.waitEOFs(t, n)
			},
			connected: func(t *testing.T, p *fakePort, eofs *int) { p.deliver(1, true) },
		}},
		{"never seen to leave", steps{
			// Both notices land before the reader looks again.
			connected: func(t *testing.T, p *fakePort, eofs *int) { p.deliver(2, true) },
		}},
		{"request before arrival", steps{
			// The guest learned that A left but its reader has not looked
			// yet; B's request comes before the guest learns of B.
			left: func(t *testing.T, p *fakePort, eofs *int) {
				*eofs = p.eofCount()
				p.deliver(1, false)
			},
			read: func(t *testing.T, p *fakePort, eofs *int) {
				p.waitEOFs(t, *eofs)
				p.deliver(1, true)
			},
		}},
		{"request before both", steps{
			// B's request is read while the guest still sees A; A's
			// departure and B's arrival come after.
			read: func(t *testing.T, p *fakePort, eofs *int) {
				n := p.eofCount()
				p.deliver(1, true)
				p.waitEOFs(t, n)
				p.deliver(1, true)
			},
		}},
	}
	for _, o := range orders {
		for _, first := range []string{"ttrpc", "control"} {
			t.Run(o.name+"/"+first, func(t *testing.T) {
				p := servedPort(t)
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				defer cancel()
				var eofs int
				step := func(f func(*testing.T, *fakePort, *int)) {
					if f != nil {
						f(t, p, &eofs)
					}
				}

				a := dialFake(p)
				if err := a.check(ctx); err != nil {
					t.Fatalf("host A: %v", err)
				}
				p.setAuto(false)
				a.close()
				step(o.left)
				b := dialFake(p)
				defer b.close()
				step(o.connected)

				got := make(chan error, 1)
				var sink control.TCPSinkReply
				go func() {
					if first == "ttrpc" {
						got <- b.check(ctx)
					} else {
						got <- b.traffic(ctx, control.MethodTCPSink, control.TCPSinkRequest{Listen: "127.0.0.1:0", Timeout: 10 * time.Second}, &sink)
					}
				}()
				waitRead(t, p)
				step(o.read)
				p.setAuto(true)
				if err := <-got; err != nil {
					t.Fatalf("host B's first call (%s): %v", first, err)
				}
				if first == "control" {
					// The session goes on: B's next call (stream 3) is
					// answered too. The sink counts a connection that
					// closes at once.
					c, err := net.Dial("tcp", sink.Listen)
					if err != nil {
						t.Fatal(err)
					}
					c.Close()
					var n control.TCPCount
					if err := b.traffic(ctx, control.MethodTCPResult, control.TCPResultRequest{Listen: sink.Listen}, &n); err != nil {
						t.Fatalf("host B's second call: %v", err)
					}
				}
				if err := b.check(ctx); err != nil {
					t.Fatalf("host B's last call: %v", err)
				}
			})
		}
	}
}

// waitRead waits until the guest has read everything the host sent.
func waitRead(t *testing.T, p *fakePort) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.mu.Lock()
		left := len(p.in)
		p.mu.Unlock()
		if left == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest did not read the host's request within 10 s (%d bytes left)", left)
		}
		time.Sleep(time.Millisecond)
	}
}
