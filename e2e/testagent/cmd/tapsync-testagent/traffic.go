package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// Test-only traffic tools of the control service: a TCP sink and source
// and a ping with or without DF, so that a test can measure what crosses
// the guest's own NIC. Package control has the messages;
// e2e/testvm/traffic.go is the host side.
//
// All of them use only what the test configured: the guest listens on or
// dials from the address it is given and relies on the guest's routes (a
// connected route is enough) for the rest.

// trafficMethods maps the control service's traffic methods to their
// handlers: JSON request in, value for the JSON reply out.
var trafficMethods = map[string]func([]byte) (any, error){
	control.MethodTCPSink:   handle(tcpSink),
	control.MethodTCPResult: handle(tcpResult),
	control.MethodTCPSend:   handle(tcpSend),
	control.MethodPing:      handle(ping),
}

func handle[Req, Resp any](f func(Req) (Resp, error)) func([]byte) (any, error) {
	return func(b []byte) (any, error) {
		var req Req
		d := json.NewDecoder(bytes.NewReader(b))
		d.DisallowUnknownFields()
		if err := d.Decode(&req); err != nil {
			return nil, fmt.Errorf("decode request: %w", err)
		}
		return f(req)
	}
}

// sinks are the open TCPSinks by listening address, until TCPResult
// collects them.
var (
	sinksMu sync.Mutex
	sinks   = map[string]*sink{}
)

type sink struct {
	done  chan struct{} // closed once count and err are final
	count control.TCPCount
	err   error
}

// Generous bounds for requests that name none: TCG guests are slow.
const defaultTrafficTimeout = time.Minute

func tcpSink(req control.TCPSinkRequest) (control.TCPSinkReply, error) {
	if req.Timeout <= 0 {
		req.Timeout = defaultTrafficTimeout
	}
	ln, err := net.Listen("tcp", req.Listen)
	if err != nil {
		return control.TCPSinkReply{}, err
	}
	addr := ln.Addr().String()
	sk := &sink{done: make(chan struct{})}
	sinksMu.Lock()
	sinks[addr] = sk
	sinksMu.Unlock()
	go func() {
		defer close(sk.done)
		sk.count, sk.err = acceptAndCount(ln.(*net.TCPListener), req.Timeout)
	}()
	return control.TCPSinkReply{Listen: addr}, nil
}

// acceptAndCount takes one connection from ln, which it closes, and counts
// it until EOF; the whole must end within timeout.
func acceptAndCount(ln *net.TCPListener, timeout time.Duration) (control.TCPCount, error) {
	deadline := time.Now().Add(timeout)
	_ = ln.SetDeadline(deadline)
	c, err := ln.Accept()
	ln.Close()
	if err != nil {
		return control.TCPCount{}, fmt.Errorf("accept on %s: %w", ln.Addr(), err)
	}
	defer c.Close()
	_ = c.SetDeadline(deadline)
	n, err := control.CountUntilEOF(c)
	if err != nil {
		return n, fmt.Errorf("read from %s: %w", c.RemoteAddr(), err)
	}
	return n, nil
}

func tcpResult(req control.TCPResultRequest) (control.TCPCount, error) {
	sinksMu.Lock()
	sk := sinks[req.Listen]
	sinksMu.Unlock()
	if sk == nil {
		return control.TCPCount{}, fmt.Errorf("no TCP sink on %q", req.Listen)
	}
	<-sk.done // bounded by the sink's own timeout
	sinksMu.Lock()
	delete(sinks, req.Listen)
	sinksMu.Unlock()
	return sk.count, sk.err
}

func tcpSend(req control.TCPSendRequest) (control.TCPCount, error) {
	if req.Timeout <= 0 {
		req.Timeout = req.Duration + defaultTrafficTimeout
	}
	start := time.Now()
	d := net.Dialer{Deadline: start.Add(req.Timeout)}
	if req.From != "" {
		ip, err := netip.ParseAddr(req.From)
		if err != nil {
			return control.TCPCount{}, fmt.Errorf("source address: %w", err)
		}
		d.LocalAddr = &net.TCPAddr{IP: ip.AsSlice()}
	}
	c, err := d.Dial("tcp", req.To)
	if err != nil {
		return control.TCPCount{}, err
	}
	defer c.Close()
	var n control.TCPCount
	buf := make([]byte, 128<<10)
	_ = c.SetWriteDeadline(time.Now().Add(req.Duration))
	for {
		w, err := c.Write(buf)
		n.Total += int64(w)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			return n, fmt.Errorf("send to %s: %w", req.To, err)
		}
	}
	// The receiver counts until EOF and then closes: waiting for its close
	// means the reply comes after the receiver has its count.
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return n, fmt.Errorf("close sending side to %s: %w", req.To, err)
	}
	_ = c.SetDeadline(start.Add(req.Timeout))
	if _, err := io.Copy(io.Discard, c); err != nil {
		return n, fmt.Errorf("wait for %s to close: %w", req.To, err)
	}
	return n, nil
}

// ICMP message types (RFC 792).
const (
	icmpEchoReply   = 0
	icmpUnreachable = 3
	icmpEcho        = 8
)

// pingSeq numbers the echoes of this process, so that a late reply to an
// earlier try or call is not taken for the current one.
var (
	pingMu  sync.Mutex
	pingSeq uint16
)

// ping sends echoes from a raw ICMP socket (the kernel writes the IP
// header). DF comes from the socket's path-MTU mode, as ping -M do|dont
// sets it: IP_PMTUDISC_DO sets DF and makes a packet larger than the
// route's MTU fail in sendto with EMSGSIZE; IP_PMTUDISC_DONT clears DF and
// lets the kernel fragment.
func ping(req control.PingRequest) (control.PingReply, error) {
	dst, err := netip.ParseAddr(req.Addr)
	if err != nil || !dst.Is4() {
		return control.PingReply{}, fmt.Errorf("ping %q: an IPv4 address is needed", req.Addr)
	}
	if req.Size < 0 || req.Size > 65507 {
		return control.PingReply{}, fmt.Errorf("ping %s: payload of %d bytes", dst, req.Size)
	}
	if req.Timeout <= 0 {
		req.Timeout = 5 * time.Second
	}
	pc, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return control.PingReply{}, fmt.Errorf("open raw ICMP socket: %w", err)
	}
	defer pc.Close()
	c := pc.(*net.IPConn)
	mode := unix.IP_PMTUDISC_DONT
	if req.DontFragment {
		mode = unix.IP_PMTUDISC_DO
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return control.PingReply{}, err
	}
	var serr error
	// Equivalent to: ping -M do|dont
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, mode)
	}); err != nil || serr != nil {
		return control.PingReply{}, fmt.Errorf("set IP_MTU_DISCOVER: %w", errors.Join(err, serr))
	}

	id := uint16(os.Getpid())
	deadline := time.Now().Add(req.Timeout)
	to := &net.IPAddr{IP: dst.AsSlice()}
	buf := make([]byte, 65536)
	for time.Now().Before(deadline) {
		pingMu.Lock()
		pingSeq++
		seq := pingSeq
		pingMu.Unlock()
		msg := echo(id, seq, req.Size)
		sent := time.Now()
		if _, err := c.WriteTo(msg, to); err != nil {
			// EMSGSIZE with DF: larger than the route's MTU. Retrying
			// cannot help.
			return control.PingReply{}, fmt.Errorf("send echo of %d bytes to %s (DF %v): %w", req.Size, dst, req.DontFragment, err)
		}
		wait := sent.Add(time.Second)
		if wait.After(deadline) {
			wait = deadline
		}
		_ = c.SetReadDeadline(wait)
		for {
			n, from, err := c.ReadFrom(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break // try again
			}
			if err != nil {
				return control.PingReply{}, fmt.Errorf("read ICMP: %w", err)
			}
			m := buf[:n] // the kernel stripped the IP header
			if len(m) < 8 {
				continue
			}
			switch {
			case m[0] == icmpEchoReply && from.String() == dst.String() &&
				binary.BigEndian.Uint16(m[4:6]) == id && binary.BigEndian.Uint16(m[6:8]) == seq:
				if n-8 != req.Size {
					return control.PingReply{}, fmt.Errorf("echo reply from %s with %d bytes of payload, sent %d", dst, n-8, req.Size)
				}
				return control.PingReply{RTT: time.Since(sent)}, nil
			case m[0] == icmpUnreachable && quotesEcho(m[8:], id, seq):
				// Code 4 is "fragmentation needed and DF set".
				return control.PingReply{}, fmt.Errorf("echo of %d bytes to %s (DF %v): destination unreachable, code %d, from %s", req.Size, dst, req.DontFragment, m[1], from)
			}
		}
	}
	return control.PingReply{}, fmt.Errorf("no echo reply from %s to %d bytes (DF %v) within %v", dst, req.Size, req.DontFragment, req.Timeout.Round(time.Millisecond))
}

// echo builds an ICMP echo request with size bytes of payload.
func echo(id, seq uint16, size int) []byte {
	m := make([]byte, 8+size)
	m[0] = icmpEcho
	binary.BigEndian.PutUint16(m[4:6], id)
	binary.BigEndian.PutUint16(m[6:8], seq)
	for i := range size {
		m[8+i] = byte(i)
	}
	binary.BigEndian.PutUint16(m[2:4], checksum(m))
	return m
}

// checksum is the Internet checksum (RFC 1071).
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// quotesEcho reports whether the quoted datagram of an ICMP error (its IP
// header and at least 8 bytes of its payload) is our echo id/seq.
func quotesEcho(q []byte, id, seq uint16) bool {
	if len(q) < 20 {
		return false
	}
	ihl := int(q[0]&0x0f) * 4
	if q[9] != unix.IPPROTO_ICMP || len(q) < ihl+8 {
		return false
	}
	e := q[ihl:]
	return e[0] == icmpEcho && binary.BigEndian.Uint16(e[4:6]) == id && binary.BigEndian.Uint16(e[6:8]) == seq
}
