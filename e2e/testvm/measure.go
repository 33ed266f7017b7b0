package testvm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// The guest agent's measuring methods (e2e/testagent/control: Clock,
// Timeline, and a Ping that waits for its source address), for
// benchmarks that time what happens inside the guest. A Control session
// keeps its connection to VM.TestAgent open, so that a call reaches the
// guest at once: a guest port with no host connected is looked at only
// every 100 ms (the agent has no event for a host's arrival).

// Control is an open session with the guest agent's control service,
// made by OpenControl. Its calls may run concurrently. While it is open
// the VM's other TestAgent helpers (GuestPing, RestartAgent, …) wait.
type Control struct {
	v      *VM
	c      *ttrpc.Client
	closed bool
}

// OpenControl connects to VM.TestAgent and holds it until Close.
func (v *VM) OpenControl(ctx context.Context) (*Control, error) {
	v.testAgentMu.Lock()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", strings.TrimPrefix(v.TestAgent, "unix://"))
	if err != nil {
		v.testAgentMu.Unlock()
		return nil, fmt.Errorf("dial test agent: %w", err)
	}
	return &Control{v: v, c: ttrpc.NewClient(conn)}, nil
}

// Close ends the session and lets the VM's other helpers have TestAgent.
func (c *Control) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	err := c.c.Close()
	c.v.testAgentMu.Unlock()
	return err
}

// call calls a JSON method of the control service.
func (c *Control) call(ctx context.Context, method string, req, resp any) error {
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var out wrapperspb.BytesValue
	if err := c.c.Call(ctx, control.Service, method, wrapperspb.Bytes(b), &out); err != nil {
		return fmt.Errorf("%s through %s: %w", method, c.v.TestAgent, err)
	}
	dec := json.NewDecoder(bytes.NewReader(out.Value))
	dec.DisallowUnknownFields()
	if err := dec.Decode(resp); err != nil {
		return fmt.Errorf("%s: decode reply %q: %w", method, out.Value, err)
	}
	return nil
}

// Clock asks the guest for its CLOCK_REALTIME samples times and returns
// the sample with the shortest round trip: its Offset is the guest's
// clock less the host's, within its Uncertainty.
func (c *Control) Clock(ctx context.Context, samples int) (control.ClockSample, error) {
	var best control.ClockSample
	for i := range max(samples, 1) {
		var rep control.ClockReply
		sent := time.Now()
		if err := c.call(ctx, control.MethodClock, control.ClockRequest{}, &rep); err != nil {
			return control.ClockSample{}, fmt.Errorf("guest clock: %w", err)
		}
		s := control.ClockSample{Sent: sent, Received: time.Now(), Guest: rep.Realtime}
		if i == 0 || s.Uncertainty() < best.Uncertainty() {
			best = s
		}
	}
	return best, nil
}

// Timeline returns the events the guest agent recorded after sequence
// number after (0: all it holds), times on the guest's clock.
func (c *Control) Timeline(ctx context.Context, after uint64) (control.TimelineReply, error) {
	var rep control.TimelineReply
	if err := c.call(ctx, control.MethodTimeline, control.TimelineRequest{After: after}, &rep); err != nil {
		return rep, fmt.Errorf("guest timeline: %w", err)
	}
	return rep, nil
}

// PingWhenUp makes the guest wait until one of its links has an address
// in from, then ping to from that address every interval until a reply,
// all within ctx's deadline (10 s if it has none). The reply's times are
// on the guest's clock: when the address appeared, the first echo, the
// reply.
func (c *Control) PingWhenUp(ctx context.Context, from netip.Prefix, to netip.Addr, interval time.Duration) (control.PingReply, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	timeout := max(remaining(ctx)-time.Second, time.Second)
	req := control.PingRequest{Addr: to.String(), From: from.String(), Interval: interval, Timeout: timeout}
	var rep control.PingReply
	if err := c.call(ctx, control.MethodPing, req, &rep); err != nil {
		return rep, fmt.Errorf("guest ping %s from %s: %w", to, from, err)
	}
	return rep, nil
}
