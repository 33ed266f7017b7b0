// Package control is the wire format of the e2e test agent's test-only
// control service (tapsync.testagent.Control): its names, the JSON
// messages of its traffic methods, and how a receiver counts a TCP
// stream. The guest agent (e2e/testagent/cmd/tapsync-testagent) serves it
// and e2e/testvm calls it; both use these types, so the two cannot drift
// apart. It does no I/O of its own beyond reading the stream it is given.
//
// Restart takes and returns google.protobuf.Empty. The traffic methods
// take and return a google.protobuf.BytesValue holding JSON: test-only
// messages that need no generated code on either side. Each side decodes
// with unknown fields refused.
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
// (IP packet Size+28), DF set when DontFragment, retried once a second
// until a reply or Timeout.
type PingRequest struct {
	Addr         string        `json:"addr"`
	Size         int           `json:"size"`
	DontFragment bool          `json:"dont_fragment"`
	Timeout      time.Duration `json:"timeout"`
}

type PingReply struct {
	RTT time.Duration `json:"rtt"`
}

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
