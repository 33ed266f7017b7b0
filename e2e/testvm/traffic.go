package testvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// Traffic through the guest's own NICs, made by the guest agent's test-only
// control service (package e2e/testagent/control has its messages;
// tapsync-testagent's traffic.go is the other side). A test measures with
// them what tapsync wired: throughput under a rate limit, a ping at an MTU
// with DF.
//
// Each helper dials VM.TestAgent itself for the length of the call and
// hangs up after. That socket serves one client at a time: a caller must
// not hold its own connection to TestAgent (agent.Dial) during a call, or
// the call waits until it is closed (or ctx ends). Calls on one VM from
// several goroutines take turns.
//
// The guest uses only what the test configured: it listens on, dials from
// and pings with the addresses it is given, through its own routes (a
// connected route is enough). With Options.SelfConfig those are GuestIP
// and PeerIP.

// TCPResult is one TCP stream of a test, as counted by its receiver (the
// guest or the test, depending on the direction). It counts TCP payload:
// under a limit that counts whole frames (tbf, HTB) at MTU 1500 it reads
// about 4.5 % below the limit (66 bytes of Ethernet, IP and TCP headers
// with timestamps per 1448; measured 4.80-4.82 Mbit/s under tbf 5mbit).
type TCPResult struct {
	Bytes int64 // bytes the receiver read; equal to what the sender wrote, or the helper fails
	// Timed counts the bytes after the receiver's first read, and Elapsed
	// runs from that read to the last: the rate leaves out the connection's
	// setup and what a sender's buffers held before the first byte arrived.
	Timed   int64
	Elapsed time.Duration
}

// BitsPerSec is the stream's throughput at the receiver.
func (r TCPResult) BitsPerSec() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Timed) * 8 / r.Elapsed.Seconds()
}

func (r TCPResult) String() string {
	return fmt.Sprintf("%.2f Mbit/s (%d bytes, %d timed over %v)", r.BitsPerSec()/1e6, r.Bytes, r.Timed, r.Elapsed.Round(time.Millisecond))
}

// trafficSlack is added to a stream's duration when ctx has no deadline:
// connecting, draining the buffers, a slow TCG guest.
const trafficSlack = time.Minute

// GuestTCPSend measures traffic out of the guest: the guest connects from
// its address from (the zero Addr lets its kernel choose) to ln's address
// and sends for dur; the caller's ln, made wherever the test wants the
// receiver (e.g. in a peer netns), takes the connection here and counts.
// ln must listen on a specific address the guest can reach, not a wildcard
// one. ln is left open.
func (v *VM) GuestTCPSend(ctx context.Context, from netip.Addr, ln net.Listener, dur time.Duration) (TCPResult, error) {
	ctx, cancel := trafficContext(ctx, dur)
	defer cancel()
	to, err := netip.ParseAddrPort(ln.Addr().String())
	if err != nil || to.Addr().IsUnspecified() {
		return TCPResult{}, fmt.Errorf("guest TCP send: listener on %s: the guest needs a specific address to connect to", ln.Addr())
	}
	type received struct {
		n   control.TCPCount
		err error
	}
	got := make(chan received, 1)
	dl, canDeadline := ln.(interface{ SetDeadline(time.Time) error })
	if canDeadline {
		d, _ := ctx.Deadline()
		_ = dl.SetDeadline(d)
		defer dl.SetDeadline(time.Time{})
	}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- received{err: fmt.Errorf("accept on %s: %w", to, err)}
			return
		}
		defer c.Close()
		stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
		defer stop()
		n, err := countUntilEOF(c)
		got <- received{n, err}
	}()

	req := control.TCPSendRequest{To: to.String(), Duration: dur, Timeout: remaining(ctx)}
	if from.IsValid() {
		req.From = from.String()
	}
	var sent control.TCPCount
	callErr := v.withControl(ctx, func(call controlCall) error {
		return call(control.MethodTCPSend, req, &sent)
	})
	if callErr != nil && canDeadline {
		_ = dl.SetDeadline(time.Now()) // no connection is coming
	}
	var r received
	select {
	case r = <-got:
	case <-ctx.Done():
		if callErr == nil {
			callErr = ctx.Err()
		}
	}
	if err := errors.Join(callErr, r.err); err != nil {
		return TCPResult{}, fmt.Errorf("guest TCP send from %v to %s: %w", from, to, err)
	}
	if r.n.Total != sent.Total {
		return TCPResult{}, fmt.Errorf("guest TCP send to %s: the guest sent %d bytes, %d arrived", to, sent.Total, r.n.Total)
	}
	return result(r.n), nil
}

// GuestTCPReceive measures traffic into the guest: the guest listens on at
// (an address of its own; port 0 picks a free one), the caller's dial
// connects to the address the guest listens on (from wherever the test
// wants the sender, e.g. a peer netns), this sends for dur, and the guest
// counts.
func (v *VM) GuestTCPReceive(ctx context.Context, at netip.AddrPort, dur time.Duration, dial func(ctx context.Context, guest netip.AddrPort) (net.Conn, error)) (TCPResult, error) {
	ctx, cancel := trafficContext(ctx, dur)
	defer cancel()
	var res TCPResult
	err := v.withControl(ctx, func(call controlCall) error {
		var sink control.TCPSinkReply
		if err := call(control.MethodTCPSink, control.TCPSinkRequest{Listen: at.String(), Timeout: remaining(ctx)}, &sink); err != nil {
			return err
		}
		guest, err := netip.ParseAddrPort(sink.Listen)
		if err != nil {
			return fmt.Errorf("guest sink address %q: %w", sink.Listen, err)
		}
		// The guest's sink stops waiting at the timeout given above; a
		// failure here leaves nothing behind for long.
		sent, sendErr := sendFor(ctx, dial, guest, dur)
		var n control.TCPCount
		if err := call(control.MethodTCPResult, control.TCPResultRequest{Listen: sink.Listen}, &n); err != nil || sendErr != nil {
			return errors.Join(sendErr, err)
		}
		if n.Total != sent {
			return fmt.Errorf("sent %d bytes to %s, the guest read %d", sent, guest, n.Total)
		}
		res = result(n)
		return nil
	})
	if err != nil {
		return TCPResult{}, fmt.Errorf("guest TCP receive on %s: %w", at, err)
	}
	return res, nil
}

// sendFor connects with dial and writes for dur, then closes its sending
// side and waits for the receiver to close: it has its count by then.
func sendFor(ctx context.Context, dial func(context.Context, netip.AddrPort) (net.Conn, error), to netip.AddrPort, dur time.Duration) (int64, error) {
	c, err := dial(ctx, to)
	if err != nil {
		return 0, fmt.Errorf("connect to %s: %w", to, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	var sent int64
	buf := make([]byte, 128<<10)
	_ = c.SetWriteDeadline(time.Now().Add(dur))
	for {
		n, err := c.Write(buf)
		sent += int64(n)
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
			break
		}
		if err != nil {
			return sent, fmt.Errorf("send to %s: %w", to, err)
		}
	}
	_ = c.SetWriteDeadline(time.Time{})
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		err = cw.CloseWrite()
	} else {
		return sent, nil // no half-close: the count must do without the wait
	}
	if err != nil {
		return sent, fmt.Errorf("close sending side to %s: %w", to, err)
	}
	if _, err := io.Copy(io.Discard, c); err != nil {
		return sent, fmt.Errorf("wait for %s to close: %w", to, err)
	}
	return sent, nil
}

// GuestPing makes the guest ping addr (IPv4) with an echo of size bytes of
// payload (an IP packet of size+28 bytes), with DF set when dontFragment,
// retrying once a second until a reply or ctx's deadline (10 s if it has
// none). The guest sends from a raw ICMP socket and sets DF as ping -M do
// does (IP_MTU_DISCOVER = IP_PMTUDISC_DO; IP_PMTUDISC_DONT otherwise, so
// the guest fragments): with DF, an echo larger than the guest's route MTU
// fails at once, and one larger than an MTU further along gets no reply (or
// an ICMP "fragmentation needed", reported as such).
func (v *VM) GuestPing(ctx context.Context, addr netip.Addr, size int, dontFragment bool) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	// The guest gives up a little before ctx ends, so that its own error
	// (which says why) arrives rather than ctx's.
	timeout := remaining(ctx) - time.Second
	if timeout < time.Second {
		timeout = time.Second
	}
	req := control.PingRequest{Addr: addr.String(), Size: size, DontFragment: dontFragment, Timeout: timeout}
	var rep control.PingReply
	err := v.withControl(ctx, func(call controlCall) error {
		return call(control.MethodPing, req, &rep)
	})
	if err != nil {
		return fmt.Errorf("guest ping %s: %w", addr, err)
	}
	return nil
}

// controlCall calls a traffic method of the guest's control service.
type controlCall func(method string, req, resp any) error

// withControl runs f with one connection to TestAgent, taking its turn
// with the other helpers of v.
func (v *VM) withControl(ctx context.Context, f func(controlCall) error) error {
	c, err := v.OpenControl(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	return f(func(method string, req, resp any) error { return c.call(ctx, method, req, resp) })
}

// trafficContext bounds a stream of dur when ctx has no deadline.
func trafficContext(ctx context.Context, dur time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, dur+trafficSlack)
}

// remaining is the time left until ctx's deadline.
func remaining(ctx context.Context) time.Duration {
	d, _ := ctx.Deadline()
	return time.Until(d)
}

// countUntilEOF reads c to its end, timed as TCPResult says.
func countUntilEOF(c net.Conn) (control.TCPCount, error) {
	n, err := control.CountUntilEOF(c)
	if err != nil {
		return n, fmt.Errorf("read from %s: %w", c.RemoteAddr(), err)
	}
	return n, nil
}

// result is the count as the package's API gives it.
func result(n control.TCPCount) TCPResult {
	return TCPResult{Bytes: n.Total, Timed: n.Timed, Elapsed: n.Elapsed}
}
