// Package testagent is an agent for the e2e guest that speaks the Kata
// agent protocol; test code, not shipped. It serves grpc.AgentService
// (UpdateInterface, UpdateRoutes, ListInterfaces, ListRoutes,
// AddARPNeighbors) and grpc.Health on ttrpc and does the work with netlink
// in one network namespace, the way Kata's agent does: the guest link is
// found by MAC (waiting on link events for a hot-plugged one),
// configured, renamed and brought up. It counts calls so that tests can
// assert what the daemon asked for, and records what it sees on a
// Timeline when given one. It has no cgo and builds statically for the
// guest's busybox initramfs.
package testagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/containerd/ttrpc"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/tapsync/tapsync/agent/agentpb"
	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// Method names as they travel on the wire.
const (
	MethodUpdateInterface = "UpdateInterface"
	MethodUpdateRoutes    = "UpdateRoutes"
	MethodListInterfaces  = "ListInterfaces"
	MethodListRoutes      = "ListRoutes"
	MethodAddARPNeighbors = "AddARPNeighbors"
	MethodCheck           = "Check"
)

// mutating are the methods that change the guest.
var mutating = []string{MethodUpdateInterface, MethodUpdateRoutes, MethodAddARPNeighbors}

// Server answers agent calls with the kernel of one network namespace.
type Server struct {
	nl    *netlink.Handle
	ns    *netns.NsHandle // NewServerAt's, our own copy; nil for NewServer
	links *linkWatch

	timeline atomic.Pointer[Timeline]

	// mu serialises the handlers that change links, addresses, routes
	// and neighbours, as one agent process would.
	mu sync.Mutex

	callsMu sync.Mutex
	calls   map[string]int
}

// NewServer serves the network namespace of the calling thread: in the
// guest, the only one.
func NewServer() (*Server, error) {
	// Route family only: the guest kernel has no xfrm_user module loaded,
	// and netlink.NewHandle() with no family asks for xfrm too.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	s := &Server{nl: h, calls: map[string]int{}}
	if s.links, err = startLinkWatch(nil, s.timeline.Load); err != nil {
		h.Close()
		return nil, err
	}
	return s, nil
}

// NewServerAt serves the network namespace ns, whichever namespace its
// goroutines run in (the netlink sockets are bound to ns). ns stays the
// caller's: the server keeps a copy of its own.
func NewServerAt(ns netns.NsHandle) (*Server, error) {
	fd, err := unix.FcntlInt(uintptr(ns), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("netns %s: dup: %w", ns, err)
	}
	own := netns.NsHandle(fd)
	h, err := netlink.NewHandleAt(own)
	if err != nil {
		own.Close()
		return nil, fmt.Errorf("netlink handle in netns %s: %w", ns, err)
	}
	s := &Server{nl: h, ns: &own, calls: map[string]int{}}
	if s.links, err = startLinkWatch(s.ns, s.timeline.Load); err != nil {
		h.Close()
		own.Close()
		return nil, fmt.Errorf("netns %s: %w", ns, err)
	}
	return s, nil
}

// SetTimeline makes the server record on t what it sees and does: link
// events, and each UpdateInterface and UpdateRoutes received, its link
// found and its end. nil records nothing (the default).
func (s *Server) SetTimeline(t *Timeline) { s.timeline.Store(t) }

// Close releases the netlink sockets. Serve and ServeConn must have
// returned.
func (s *Server) Close() error {
	s.links.stop()
	s.nl.Close()
	if s.ns != nil {
		s.ns.Close()
	}
	return nil
}

// Calls answers how many times method was called, answered or not.
func (s *Server) Calls(method string) int {
	s.callsMu.Lock()
	defer s.callsMu.Unlock()
	return s.calls[method]
}

// MutatingCalls answers how many calls asked to change the guest
// (UpdateInterface, UpdateRoutes, AddARPNeighbors).
func (s *Server) MutatingCalls() int {
	s.callsMu.Lock()
	defer s.callsMu.Unlock()
	n := 0
	for _, m := range mutating {
		n += s.calls[m]
	}
	return n
}

func (s *Server) count(method string) {
	s.callsMu.Lock()
	s.calls[method]++
	s.callsMu.Unlock()
}

// Serve accepts connections on l until ctx ends or l fails, serving each.
// It answers nil when ctx ended it.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ts, err := s.ttrpcServer()
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { ts.Close() })
	defer stop()
	err = ts.Serve(ctx, l)
	ts.Close()
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("serve agent on %s: %w", l.Addr(), err)
}

// ServeConn serves one already open stream (a virtio-serial port has no
// accept) until the peer closes it, it fails, or ctx ends. conn is closed
// on return. It answers nil when the stream ended normally or ctx ended it.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn) error {
	ts, err := s.ttrpcServer()
	if err != nil {
		conn.Close()
		return err
	}
	wc := &watchedConn{Conn: conn, closed: make(chan struct{})}
	l := &oneConnListener{conn: wc, done: make(chan struct{})}
	served := make(chan error, 1)
	go func() { served <- ts.Serve(ctx, l) }()
	select {
	case <-wc.closed:
	case <-ctx.Done():
	}
	ts.Close()
	<-served
	wc.Close()
	return nil
}

// watchedConn tells when ttrpc closed the stream: it does so once reading
// fails, that is when the peer went away.
type watchedConn struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *watchedConn) Close() error {
	var err error
	c.once.Do(func() {
		err = c.Conn.Close()
		close(c.closed)
	})
	return err
}

// oneConnListener hands out one connection, then blocks until closed.
type oneConnListener struct {
	mu   sync.Mutex
	conn net.Conn
	once sync.Once
	done chan struct{}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.conn
	l.conn = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return oneConnAddr{} }

type oneConnAddr struct{}

func (oneConnAddr) Network() string { return "stream" }
func (oneConnAddr) String() string  { return "stream" }

// handler adapts a typed handler to ttrpc's untyped Method and counts it.
func handler[Req any, PReq interface {
	*Req
	proto.Message
}, Resp proto.Message](s *Server, method string, h func(context.Context, PReq) (Resp, error)) ttrpc.Method {
	return func(ctx context.Context, unmarshal func(any) error) (any, error) {
		s.count(method)
		if method != MethodUpdateInterface && method != MethodUpdateRoutes { // those record their own steps
			tl := s.timeline.Load()
			tl.Record(control.EventAgentCall, "", method)
			defer tl.Record(control.EventAgentCallDone, "", method)
		}
		req := PReq(new(Req))
		if err := unmarshal(req); err != nil {
			return nil, err
		}
		resp, err := h(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", method, err)
		}
		return resp, nil
	}
}

func (s *Server) ttrpcServer() (*ttrpc.Server, error) {
	ts, err := ttrpc.NewServer()
	if err != nil {
		return nil, fmt.Errorf("ttrpc server: %w", err)
	}
	ts.RegisterService("grpc.AgentService", &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		MethodUpdateInterface: handler(s, MethodUpdateInterface, s.updateInterface),
		MethodUpdateRoutes:    handler(s, MethodUpdateRoutes, s.updateRoutes),
		MethodListInterfaces: handler(s, MethodListInterfaces, func(context.Context, *agentpb.ListInterfacesRequest) (*agentpb.Interfaces, error) {
			return s.listInterfaces()
		}),
		MethodListRoutes: handler(s, MethodListRoutes, func(context.Context, *agentpb.ListRoutesRequest) (*agentpb.Routes, error) {
			return s.listRoutes()
		}),
		MethodAddARPNeighbors: handler(s, MethodAddARPNeighbors, func(_ context.Context, req *agentpb.AddARPNeighborsRequest) (*emptypb.Empty, error) {
			return &emptypb.Empty{}, s.addNeighbors(req)
		}),
	}})
	ts.RegisterService("grpc.Health", &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		MethodCheck: handler(s, MethodCheck, func(context.Context, *agentpb.CheckRequest) (*agentpb.HealthCheckResponse, error) {
			return &agentpb.HealthCheckResponse{Status: agentpb.HealthCheckResponse_SERVING}, nil
		}),
	}})
	return ts, nil
}

// errInvalid marks requests the agent cannot act on.
var errInvalid = errors.New("invalid request")
