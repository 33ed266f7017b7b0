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
// lets the kernel fragment. A reply to any echo of the call counts, so a
// retry does not throw away a reply that was late.
func ping(req control.PingRequest) (control.PingReply, error) {
	var rep control.PingReply
	dst, err := netip.ParseAddr(req.Addr)
	if err != nil || !dst.Is4() {
		return rep, fmt.Errorf("ping %q: an IPv4 address is needed", req.Addr)
	}
	if req.Size < 0 || req.Size > 65507 {
		return rep, fmt.Errorf("ping %s: payload of %d bytes", dst, req.Size)
	}
	if req.Timeout <= 0 {
		req.Timeout = 5 * time.Second
	}
	if req.Interval <= 0 {
		req.Interval = time.Second
	}
	deadline := time.Now().Add(req.Timeout)
	bind := "0.0.0.0"
	if req.From != "" {
		from, err := netip.ParsePrefix(req.From)
		if a, aerr := netip.ParseAddr(req.From); aerr == nil {
			from, err = netip.PrefixFrom(a, a.BitLen()), nil
		}
		if err != nil || !from.Addr().Is4() {
			return rep, fmt.Errorf("ping from %q: an IPv4 address or prefix is needed", req.From)
		}
		var src netip.Addr
		if src, rep.AddrSeen, err = waitAddr(from.Masked(), deadline); err != nil {
			return rep, fmt.Errorf("ping %s from %s: %w", dst, from, err)
		}
		bind = src.String()
	}
	pc, err := net.ListenPacket("ip4:icmp", bind)
	if err != nil {
		return rep, fmt.Errorf("open raw ICMP socket on %s: %w", bind, err)
	}
	defer pc.Close()
	c := pc.(*net.IPConn)
	mode := unix.IP_PMTUDISC_DONT
	if req.DontFragment {
		mode = unix.IP_PMTUDISC_DO
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return rep, err
	}
	var serr error
	// Equivalent to: ping -M do|dont
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, mode)
	}); err != nil || serr != nil {
		return rep, fmt.Errorf("set IP_MTU_DISCOVER: %w", errors.Join(err, serr))
	}

	id := uint16(os.Getpid())
	to := &net.IPAddr{IP: dst.AsSlice()}
	buf := make([]byte, 65536)
	sentAt := map[uint16]time.Time{} // the echoes of this call by sequence number
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
			return rep, fmt.Errorf("send echo of %d bytes to %s (DF %v): %w", req.Size, dst, req.DontFragment, err)
		}
		sentAt[seq] = sent
		if rep.Tries == 0 {
			rep.FirstSent = sent
		}
		rep.Tries++
		wait := sent.Add(req.Interval)
		if wait.After(deadline) {
			wait = deadline
		}
		_ = c.SetReadDeadline(wait)
		for {
			n, from, err := c.ReadFrom(buf)
			now := time.Now()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break // try again
			}
			if err != nil {
				return rep, fmt.Errorf("read ICMP: %w", err)
			}
			m := buf[:n] // the kernel stripped the IP header
			if len(m) < 8 {
				continue
			}
			switch {
			case m[0] == icmpEchoReply && from.String() == dst.String() && binary.BigEndian.Uint16(m[4:6]) == id:
				at, ours := sentAt[binary.BigEndian.Uint16(m[6:8])]
				if !ours {
					continue
				}
				if n-8 != req.Size {
					return rep, fmt.Errorf("echo reply from %s with %d bytes of payload, sent %d", dst, n-8, req.Size)
				}
				rep.RTT, rep.Replied = now.Sub(at), now
				return rep, nil
			case m[0] == icmpUnreachable && quotesEcho(m[8:], id, sentAt):
				// Code 4 is "fragmentation needed and DF set".
				return rep, fmt.Errorf("echo of %d bytes to %s (DF %v): destination unreachable, code %d, from %s", req.Size, dst, req.DontFragment, m[1], from)
			}
		}
	}
	return rep, fmt.Errorf("no echo reply from %s to %d bytes (DF %v) within %v", dst, req.Size, req.DontFragment, req.Timeout.Round(time.Millisecond))
}

// waitAddr waits until a link of the guest has an address in p, or
// deadline: it looks once subscribed to address events and again after
// each one (no polling). It answers the address and when it saw it.
//
// Equivalent to: ip monitor address, until an address in p shows.
func waitAddr(p netip.Prefix, deadline time.Time) (netip.Addr, time.Time, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return netip.Addr{}, time.Time{}, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_IPV4_IFADDR}); err != nil {
		unix.Close(fd)
		return netip.Addr{}, time.Time{}, fmt.Errorf("subscribe to addresses: %w", err)
	}
	f := os.NewFile(uintptr(fd), "netlink addresses") // read through Go's poller, with a deadline
	defer f.Close()
	_ = f.SetReadDeadline(deadline)
	buf := make([]byte, 16<<10)
	at := time.Now()
	for {
		a, err := addrIn(p)
		if err != nil || a.IsValid() {
			return a, at, err
		}
		_, err = f.Read(buf) // an address event, or lost ones: look again
		at = time.Now()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return netip.Addr{}, time.Time{}, fmt.Errorf("no address in %s on any link", p)
		}
		if err != nil && !errors.Is(err, unix.ENOBUFS) {
			return netip.Addr{}, time.Time{}, fmt.Errorf("address events: %w", err)
		}
	}
}

// addrIn returns an address of the guest's links in p, or the zero Addr.
func addrIn(p netip.Prefix) (netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && p.Contains(ip.Unmap()) {
				return ip.Unmap(), nil
			}
		}
	}
	return netip.Addr{}, nil
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
// header and at least 8 bytes of its payload) is one of our echoes: id
// and a sequence number in seqs.
func quotesEcho(q []byte, id uint16, seqs map[uint16]time.Time) bool {
	if len(q) < 20 {
		return false
	}
	ihl := int(q[0]&0x0f) * 4
	if q[9] != unix.IPPROTO_ICMP || len(q) < ihl+8 {
		return false
	}
	e := q[ihl:]
	_, ours := seqs[binary.BigEndian.Uint16(e[6:8])]
	return e[0] == icmpEcho && binary.BigEndian.Uint16(e[4:6]) == id && ours
}
