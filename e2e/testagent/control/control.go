// Package control is the wire format of the e2e test agent's test-only
// control service (tapsync.testagent.Control): its names, the JSON
// messages of its traffic methods, and how a receiver counts a TCP
// stream. The guest agent (e2e/testagent/cmd/tapsync-testagent) serves it
// and e2e/testvm calls it; both use these types, so the two cannot drift
// apart. It does no I/O of its own beyond reading the stream it is given.
//
// Restart takes and returns google.protobuf.Empty. The traffic methods
// and the measuring methods (Clock, Timeline) take and return a
// google.protobuf.BytesValue holding JSON: test-only messages that need
// no generated code on either side. Each side decodes with unknown fields
// refused.
package control

import (
	"io"
	"time"
)

// Names on the wire.
const (
	Service         = "tapsync.testagent.Control"
	MethodRestart   = "Restart"
	MethodTCPSink   = "TCPSink"
	MethodTCPResult = "TCPResult"
	MethodTCPSend   = "TCPSend"
	MethodPing      = "Ping"
	MethodClock     = "Clock"
	MethodTimeline  = "Timeline"
)

// TCPSinkRequest: listen on Listen ("ip:port", port 0 for any), accept one
// connection within Timeout and count what it carries until EOF. The
// guest answers once listening, with the address (TCPSinkReply);
// TCPResult collects the count.
type TCPSinkRequest struct {
	Listen  string        `json:"listen"`
	Timeout time.Duration `json:"timeout"`
}

type TCPSinkReply struct {
	Listen string `json:"listen"`
}

// TCPResultRequest: wait for the sink on Listen (as TCPSink answered it)
// to see EOF, and return its count (TCPCount).
type TCPResultRequest struct {
	Listen string `json:"listen"`
}

// TCPSendRequest: connect from From (an address of the guest; "" lets the
// kernel choose) to To ("ip:port"), send for Duration, close the sending
// side and wait for the receiver to close (at most Timeout after the
// start). The reply is a TCPCount with Total only.
type TCPSendRequest struct {
	To       string        `json:"to"`
	From     string        `json:"from"`
	Duration time.Duration `json:"duration"`
	Timeout  time.Duration `json:"timeout"`
}

// TCPCount is what one side saw of a stream. The receiver times it from
// its first read to its last: Timed counts the bytes after the first read,
// so Timed/Elapsed is the rate. The sender fills in Total only.
type TCPCount struct {
	Total   int64         `json:"total"`
	Timed   int64         `json:"timed"`
	Elapsed time.Duration `json:"elapsed"`
}

// PingRequest: one ICMP echo to Addr (IPv4) with Size bytes of payload
// (IP packet Size+28), DF set when DontFragment, retried every Interval
// (0: once a second) until a reply or Timeout. With From (an IPv4
// address of the guest, or a prefix: any of the guest's addresses in it)
// the guest first waits, on a netlink subscription, until one of its
// links has such an address, and sends from it: a ping asked for before
// the address exists goes out the moment it does, and through the link
// that holds it.
type PingRequest struct {
	Addr         string        `json:"addr"`
	From         string        `json:"from,omitempty"`
	Size         int           `json:"size"`
	DontFragment bool          `json:"dont_fragment"`
	Interval     time.Duration `json:"interval,omitempty"`
	Timeout      time.Duration `json:"timeout"`
}

// PingReply: the round trip of the echo answered, and, on the guest's
// clock (CLOCK_REALTIME), when From was seen on a link (zero without
// From), when the first echo went out and when the reply came. Tries
// counts the echoes sent.
type PingReply struct {
	RTT       time.Duration `json:"rtt"`
	AddrSeen  time.Time     `json:"addr_seen,omitzero"`
	FirstSent time.Time     `json:"first_sent"`
	Replied   time.Time     `json:"replied"`
	Tries     int           `json:"tries"`
}

// ClockRequest asks for the guest's clock; it has no fields.
type ClockRequest struct{}

// ClockReply is the guest's CLOCK_REALTIME when it handled the call. The
// caller brackets the call with its own clock to find the offset (see
// ClockSample).
type ClockReply struct {
	Realtime time.Time `json:"realtime"`
}

// ClockSample is one Clock call as the host saw it: sent and received on
// the host's clock, the guest's answer in between.
type ClockSample struct {
	Sent, Received time.Time
	Guest          time.Time
}

// Offset is guest − host: the guest's reading less the midpoint of the
// call on the host's clock.
func (c ClockSample) Offset() time.Duration {
	mid := c.Sent.Add(c.Received.Sub(c.Sent) / 2)
	return c.Guest.Sub(mid)
}

// Uncertainty bounds Offset's error: half the round trip (the guest read
// its clock somewhere between sending and receiving).
func (c ClockSample) Uncertainty() time.Duration { return c.Received.Sub(c.Sent) / 2 }

// Host maps a time on the guest's clock to the host's.
func (c ClockSample) Host(guest time.Time) time.Time { return guest.Add(-c.Offset()) }

// TimelineRequest asks for the timeline's events with a sequence number
// above After (0: all the guest still holds).
type TimelineRequest struct {
	After uint64 `json:"after"`
}

// TimelineReply holds the events in order. Dropped counts events older
// than the first returned that the guest no longer holds (it keeps the
// last few thousand).
type TimelineReply struct {
	Events  []Event `json:"events"`
	Dropped uint64  `json:"dropped,omitempty"`
}

// Event is one step the guest agent saw, at T on the guest's clock
// (CLOCK_REALTIME).
type Event struct {
	Seq    uint64    `json:"seq"`
	T      time.Time `json:"t"`
	Kind   string    `json:"kind"`
	MAC    string    `json:"mac,omitempty"`    // the link's, for link and agent call events
	Detail string    `json:"detail,omitempty"` // what happened, in words (a kernel message, a link's name and flags, addresses)
}

// Kinds of Event.
const (
	// EventKernel is a guest kernel message (/dev/kmsg) logged after
	// the agent started; T is its printk timestamp mapped to
	// CLOCK_REALTIME (see EventKernelClock), Detail the message.
	EventKernel = "kernel"
	// EventKernelClock is a calibration of that mapping: Detail is
	// "offset <ns> uncertainty <ns> monotonic offset <ns>": realtime −
	// printk time, from a marker the agent wrote into the log, and
	// realtime − CLOCK_MONOTONIC for comparison.
	EventKernelClock = "kernel-clock"
	// EventNewLink is an RTM_NEWLINK the agent's subscription received;
	// Detail is "ifindex <n> name <name> flags <flags>".
	EventNewLink = "newlink"
	// EventDelLink is an RTM_DELLINK, as EventNewLink.
	EventDelLink = "dellink"
	// The agent's calls: UpdateInterface received (Detail: the
	// requested name, addresses and devicePath), its link found (Detail:
	// the link's name then), done (Detail: the addresses set, or the
	// error); UpdateRoutes received and done (Detail: the routes asked
	// for, or the error).
	EventUpdateInterface     = "update-interface"
	EventInterfaceLinkFound  = "update-interface-link-found"
	EventUpdateInterfaceDone = "update-interface-done"
	EventUpdateRoutes        = "update-routes"
	EventUpdateRoutesDone    = "update-routes-done"
	// EventAgentCall and EventAgentCallDone are the agent's other calls
	// (ListInterfaces, ListRoutes, AddARPNeighbors, Check) received and
	// answered; Detail is the method.
	EventAgentCall     = "agent-call"
	EventAgentCallDone = "agent-call-done"
)

// CountUntilEOF reads r to its end and counts it as TCPCount says. The
// error is the read's, as it is.
func CountUntilEOF(r io.Reader) (TCPCount, error) {
	var n TCPCount
	var first, last time.Time
	buf := make([]byte, 256<<10)
	for {
		k, err := r.Read(buf)
		if k > 0 {
			now := time.Now()
			if first.IsZero() {
				first = now
			} else {
				n.Timed += int64(k)
			}
			last = now
			n.Total += int64(k)
		}
		if err == io.EOF {
			n.Elapsed = last.Sub(first)
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}
