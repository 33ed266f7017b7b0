package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/tapsync/tapsync/agent/agentpb"
)

// Service names on the wire, as Kata's agent registers them.
const (
	agentService  = "grpc.AgentService"
	healthService = "grpc.Health"
)

// ErrLinkNotFound is matched (errors.Is) by an agent's answer that the
// guest link is not there yet: the NIC was just hot-plugged and the guest
// kernel has not created it. Callers retry.
var ErrLinkNotFound = errors.New("guest link not found")

// linkNotFoundText are the substrings (lower case) of agent errors that
// mean ErrLinkNotFound. Kata's agents say "Link not found" when no link
// has the MAC, newer ones an "interface not available"-like text when the
// device at devicePath did not show up in time.
var linkNotFoundText = []string{"link not found", "interface not available"}

// Client is a connection to one agent. Its methods are safe for concurrent
// use; a call that times out leaves the connection usable.
type Client struct {
	url     URL
	timeout time.Duration
	tc      *ttrpc.Client
	done    chan struct{}
}

// Dial connects to the agent at u. timeout bounds the dial (including a
// kata-shim lookup) and, later, every call on the client; ctx can only
// shorten them.
func Dial(ctx context.Context, u URL, timeout time.Duration) (*Client, error) {
	if timeout <= 0 {
		return nil, fmt.Errorf("dial agent %s: timeout %v is not positive", u, timeout)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	target := u
	if u.Scheme == SchemeKataShim {
		var err error
		if target, err = resolveKataShim(ctx, u.Path); err != nil {
			return nil, fmt.Errorf("dial agent %s: %w", u, asDeadline(err))
		}
	}
	conn, err := dialStream(ctx, target)
	if err != nil {
		err = asDeadline(err)
		if u != target {
			return nil, fmt.Errorf("dial agent %s (from %s): %w", target, u, err)
		}
		return nil, fmt.Errorf("dial agent %s: %w", target, err)
	}
	c := &Client{url: target, timeout: timeout, done: make(chan struct{})}
	c.tc = ttrpc.NewClient(conn, ttrpc.WithOnClose(func() { close(c.done) }))
	return c, nil
}

// asDeadline makes a socket deadline error (which carries the same deadline
// as the dial's ctx) match context.DeadlineExceeded, so that callers test
// for one timeout error only.
func asDeadline(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	}
	return err
}

// URL is the agent's own URL: for kata-shim, the one the shim named.
func (c *Client) URL() URL { return c.url }

// Close closes the connection; calls in flight fail.
func (c *Client) Close() error { return c.tc.Close() }

// Done is closed once the connection is unusable: closed by Close, by the
// agent, or broken. A new Dial is then needed.
func (c *Client) Done() <-chan struct{} { return c.done }

// call makes one unary call with the client's timeout as its deadline
// (unless ctx ends sooner); the error names the method and the agent.
func (c *Client) call(ctx context.Context, service, method string, req, resp proto.Message) error {
	limit := c.timeout
	if d, ok := ctx.Deadline(); ok && time.Until(d) < limit {
		limit = time.Until(d)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	err := c.tc.Call(ctx, service, method, req, resp)
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
		return fmt.Errorf("agent %s: %s: no answer within %v: %w", c.url, method, limit.Round(100*time.Millisecond), err)
	}
	if isLinkNotFound(err) {
		return fmt.Errorf("agent %s: %s: %w (%w)", c.url, method, ErrLinkNotFound, err)
	}
	return fmt.Errorf("agent %s: %s: %w", c.url, method, err)
}

func isLinkNotFound(err error) bool {
	s, ok := grpcStatus(err)
	if !ok {
		return false
	}
	msg := strings.ToLower(s.Message())
	for _, t := range linkNotFoundText {
		if strings.Contains(msg, t) {
			return true
		}
	}
	return false
}

func grpcStatus(err error) (*status.Status, bool) {
	var se interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &se) {
		return nil, false
	}
	return se.GRPCStatus(), true
}

// IsUnimplemented reports whether the agent does not implement the method
// (an older or trimmed agent).
func IsUnimplemented(err error) bool {
	s, ok := grpcStatus(err)
	return ok && s.Code() == codes.Unimplemented
}

// UpdateInterface configures the guest link whose MAC is i.MAC: addresses,
// MTU, NOARP, name, up. It answers the interface as the agent now sees it.
func (c *Client) UpdateInterface(ctx context.Context, i Interface) (Interface, error) {
	pb, err := interfaceToPB(i)
	if err != nil {
		return Interface{}, fmt.Errorf("agent %s: UpdateInterface: %w", c.url, err)
	}
	resp := &agentpb.Interface{}
	if err := c.call(ctx, agentService, "UpdateInterface", &agentpb.UpdateInterfaceRequest{Interface: pb}, resp); err != nil {
		return Interface{}, err
	}
	out, err := interfaceFromPB(resp)
	if err != nil {
		return Interface{}, fmt.Errorf("agent %s: UpdateInterface answer: %w", c.url, err)
	}
	return out, nil
}

// UpdateRoutes sends the complete set of guest routes: older agents delete
// every route not in it first. It answers the routes the agent reports.
func (c *Client) UpdateRoutes(ctx context.Context, rs []Route) ([]Route, error) {
	req := &agentpb.UpdateRoutesRequest{Routes: &agentpb.Routes{}}
	for _, r := range rs {
		pb, err := routeToPB(r)
		if err != nil {
			return nil, fmt.Errorf("agent %s: UpdateRoutes: %w", c.url, err)
		}
		req.Routes.Routes = append(req.Routes.Routes, pb)
	}
	resp := &agentpb.Routes{}
	if err := c.call(ctx, agentService, "UpdateRoutes", req, resp); err != nil {
		return nil, err
	}
	return c.routesFromPB("UpdateRoutes", resp)
}

// ListInterfaces answers the guest's interfaces.
func (c *Client) ListInterfaces(ctx context.Context) ([]Interface, error) {
	resp := &agentpb.Interfaces{}
	if err := c.call(ctx, agentService, "ListInterfaces", &agentpb.ListInterfacesRequest{}, resp); err != nil {
		return nil, err
	}
	var out []Interface
	for _, pb := range resp.GetInterfaces() {
		i, err := interfaceFromPB(pb)
		if err != nil {
			return nil, fmt.Errorf("agent %s: ListInterfaces answer: %w", c.url, err)
		}
		out = append(out, i)
	}
	return out, nil
}

// ListRoutes answers the guest's routes.
func (c *Client) ListRoutes(ctx context.Context) ([]Route, error) {
	resp := &agentpb.Routes{}
	if err := c.call(ctx, agentService, "ListRoutes", &agentpb.ListRoutesRequest{}, resp); err != nil {
		return nil, err
	}
	return c.routesFromPB("ListRoutes", resp)
}

func (c *Client) routesFromPB(method string, resp *agentpb.Routes) ([]Route, error) {
	var out []Route
	for _, pb := range resp.GetRoutes() {
		r, err := routeFromPB(pb)
		if err != nil {
			return nil, fmt.Errorf("agent %s: %s answer: %w", c.url, method, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// AddARPNeighbors adds or replaces static neighbour entries in the guest.
func (c *Client) AddARPNeighbors(ctx context.Context, ns []Neighbor) error {
	req := &agentpb.AddARPNeighborsRequest{Neighbors: &agentpb.ARPNeighbors{}}
	for _, n := range ns {
		pb, err := neighborToPB(n)
		if err != nil {
			return fmt.Errorf("agent %s: AddARPNeighbors: %w", c.url, err)
		}
		req.Neighbors.ARPNeighbors = append(req.Neighbors.ARPNeighbors, pb)
	}
	return c.call(ctx, agentService, "AddARPNeighbors", req, &emptypb.Empty{})
}

// Check asks the agent's health service; an agent that answers anything
// but SERVING is an error.
func (c *Client) Check(ctx context.Context) error {
	resp := &agentpb.HealthCheckResponse{}
	if err := c.call(ctx, healthService, "Check", &agentpb.CheckRequest{}, resp); err != nil {
		return err
	}
	if resp.GetStatus() != agentpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("agent %s: Check: status %s", c.url, resp.GetStatus())
	}
	return nil
}
