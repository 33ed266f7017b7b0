package reconcile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// Defaults for a sandbox's options.
const (
	DefaultQMPTimeout    = 5 * time.Second
	DefaultUnplugTimeout = 10 * time.Second
	DefaultGuestTimeout  = 5 * time.Second
)

// Sandbox is one VM-backed pod as tapsync knows it.
type Sandbox struct {
	ID    string
	Netns string // path of the sandbox network namespace
	QMP   string // path of the VM's monitor socket (QMP unless Monitor says HMP)
	// Monitor is the protocol the socket speaks: MonitorQMP ("" too) or
	// MonitorHMP (a human monitor: no events, so unplugs are polled).
	Monitor string
	// Flavour and Runtime say which runtime made the VM, and MonitorNote
	// why its monitor is the one it is (status only).
	Flavour, Runtime, MonitorNote string
	// Queues per new endpoint; 0: one per vCPU of the VM, counted when
	// the endpoint is made. An endpoint keeps its count for its life.
	Queues        int
	Vhost         datapath.Vhost
	QMPTimeout    time.Duration // per QMP command
	UnplugTimeout time.Duration // how long to wait for the guest to acknowledge an unplug
	// Agent is the guest agent's address; without one (Scheme "") the
	// guest side is off and GuestOff says why.
	Agent        agent.URL
	GuestOff     string
	GuestTimeout time.Duration // per agent call
	// RepairAdopted lets tapsync repair the broken redirect of a link the
	// runtime wired (config [defaults] repair_adopted); off, such a link
	// is only reported (Status.Skipped, Broken).
	RepairAdopted bool
	// Placement says where NICs may be hot-plugged (config [defaults]
	// hotplug, reserved_slots); zero: PCI bridge slots only.
	Placement qmp.Placement
	// Model is the interworking model of new endpoints (ModelTCFilter or
	// ModelMacvtap; "" is tcfilter). RxRate and TxRate limit each
	// endpoint's traffic into and out of the VM, in bit/s (0: none).
	Model          string
	RxRate, TxRate uint64
	// CheckQMP, if set, vets the QMP socket's listener on every dial
	// (a sandbox found through /proc: the QEMU it was found as).
	CheckQMP func(*net.UnixConn) error
}

// Monitor protocols.
const (
	MonitorQMP = "qmp"
	MonitorHMP = "hmp"
)

// Equal reports whether s and o are the same settings (CheckQMP aside:
// functions do not compare).
func (s Sandbox) Equal(o Sandbox) bool {
	s.CheckQMP, o.CheckQMP = nil, nil
	return reflect.DeepEqual(s, o)
}

// guestOn reports whether the sandbox's guest is configured through its agent.
func (s Sandbox) guestOn() bool { return s.Agent.Scheme != "" }

func (s Sandbox) withDefaults() Sandbox {
	if s.QMPTimeout <= 0 {
		s.QMPTimeout = DefaultQMPTimeout
	}
	if s.UnplugTimeout <= 0 {
		s.UnplugTimeout = DefaultUnplugTimeout
	}
	if s.Vhost == "" {
		s.Vhost = datapath.VhostAuto
	}
	if s.GuestTimeout <= 0 {
		s.GuestTimeout = DefaultGuestTimeout
	}
	if !s.guestOn() && s.GuestOff == "" {
		s.GuestOff = "no agent URL for this sandbox"
	}
	s.Queues = max(s.Queues, 0)
	return s
}

// Status is the last known outcome for one sandbox.
type Status struct {
	Sandbox       Sandbox
	Source        Source // where the sandbox's registration came from
	LastReconcile time.Time
	LastError     string
	Mutations     int // in the last pass
	Pending       []int
	Held          []int // endpoints whose plug waits for the NIC they replace to leave the VM
	Endpoints     []state.Endpoint
	Skipped       []Skipped
	Notes         []string // what the plan cannot do for wired links (Plan.Notes)
	// Guest says how the guest side stands: "off: <why>", "agent
	// unreachable: <error>", or "" when the agent answered or was not
	// needed. GuestEndpoints has each endpoint's guest state.
	Guest          string
	GuestEndpoints map[int]string
}

// Guest states of an endpoint, as status shows them.
const (
	GuestConfigured = "configured"
	GuestPending    = "pending"
	// GuestUnverified: an event (a reset, the agent's connection lost, the
	// periodic verify) dropped what tapsync knew of the guest, and no pass
	// has asked the agent since. Status adds the event.
	GuestUnverified = "unverified"
)

// Reconciler makes sandboxes' VMs mirror their netns. It holds the
// registry of sandboxes and one QMP connection per sandbox, kept open so
// that events (DEVICE_DELETED) are seen as they happen.
type Reconciler struct {
	store *state.Store
	// OnEvent, when set before the first reconcile, receives every QMP
	// event of every sandbox. It runs on the connection's reader and must
	// not block (poke a queue).
	OnEvent func(sandbox string, e qmp.Event)
	// OnMonitorClosed, when set before the first reconcile, is called when
	// QEMU ends a sandbox's monitor connection (it exited, or closed the
	// socket), never when tapsync does. It must not block (poke a queue).
	OnMonitorClosed func(sandbox string)
	// OnDialDone, when set before the first reconcile, makes a pass that
	// finds no live QMP connection start a dial in the background and end
	// at once with ErrConnecting, rather than hold its worker through a
	// greeting that a stopped QEMU never sends. It is called with the
	// sandbox when that dial ends, connected or not: the next pass uses
	// the connection, or fails with the dial's error. It must not block
	// (poke a queue).
	OnDialDone func(sandbox string)
	// AfterAction, if set, is called after every completed action of
	// every sandbox (fault injection for crash tests; see Env).
	AfterAction func(Action)

	// afterObserve, if set, runs after a pass's first observation, before
	// its plan (fault injection: the netns changing under a pass).
	afterObserve func(id string)
	// passWait, if set, runs when a pass or a plan finds sandbox id's pass
	// lock taken, before it waits for it.
	passWait func(id string)

	registering sync.Mutex // held by Register, around r.mu

	resetMu   sync.Mutex
	resetSeen map[string]bool // sandboxes whose VM reported a RESET since their last pass (noteReset)

	mu        sync.Mutex
	sandboxes map[string]*entry // the registry, by id; one entry per netns (see Register)
	conns     map[string]*qmp.Client
	models    map[string]*vmModel        // per sandbox: the model of the VM behind conns[id]
	hosts     map[string]*datapath.Netns // per sandbox: its netns, kept from one pass to the next (see keepHost)
	closed    bool                       // Close was called: nothing more is kept
	agents    map[string]*agent.Client   // dialled when a pass needs the guest, kept while it works
	dialing   map[string]*dialLock       // per QMP socket: one dial at a time (a QMP socket takes one client)
	dials     map[string]*backgroundDial // per sandbox: its dial under way or ended, with OnDialDone set
	status    map[string]Status
	guestLog  map[string]string // last guest error logged per sandbox
	// agentCalls counts the calls made to agents, by method.
	agentCalls map[string]int
}

// New returns a Reconciler recording into store.
func New(store *state.Store) *Reconciler {
	return &Reconciler{store: store, sandboxes: map[string]*entry{}, conns: map[string]*qmp.Client{}, models: map[string]*vmModel{},
		hosts: map[string]*datapath.Netns{}, agents: map[string]*agent.Client{}, dialing: map[string]*dialLock{}, dials: map[string]*backgroundDial{}, status: map[string]Status{},
		guestLog: map[string]string{}, agentCalls: map[string]int{}}
}

// Close closes every QMP connection and kept netns. Endpoints stay as
// they are: VMs keep their network while tapsync is down.
func (r *Reconciler) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	for _, d := range r.dials {
		d.cancel()
	}
	for id := range r.conns {
		r.closeConnLocked(id)
	}
	for id := range r.hosts {
		r.closeConnLocked(id)
	}
}

// closeConnLocked drops sandbox id's connections (QMP, agent, the kept
// netns and its netlink socket); r.mu must be held.
func (r *Reconciler) closeConnLocked(id string) {
	if d := r.dials[id]; d != nil {
		d.cancel()
		delete(r.dials, id)
	}
	if c := r.conns[id]; c != nil {
		c.Close()
		delete(r.conns, id)
	}
	delete(r.models, id)
	if h := r.hosts[id]; h != nil {
		h.Close()
		delete(r.hosts, id)
	}
	r.closeAgentLocked(id)
}

// openHost returns sandbox id's netns at path for a pass: the one kept
// from its last pass while the path still names it (one stat; kept),
// else a new one.
func (r *Reconciler) openHost(id, path string) (h *datapath.Netns, kept bool, err error) {
	r.mu.Lock()
	h = r.hosts[id]
	delete(r.hosts, id)
	r.mu.Unlock()
	if h != nil {
		if h.Path() == path && h.Verify() == nil {
			return h, true, nil
		}
		h.Close()
	}
	h, err = datapath.Open(path)
	return h, false, err
}

// keepHost keeps a pass's netns for the next pass of sandbox id when keep
// is true, saving a netlink socket and a namespace switch per pass; else
// it is closed. A netns is never kept past its sandbox (closeConnLocked),
// nor after a failure on the host side (its socket may hold the rest of
// an interrupted dump), nor when known by a /proc/<pid>/ns/net path: a
// kept netns stays alive, and the end of a process-held one is seen only
// once nobody holds it.
func (r *Reconciler) keepHost(id string, h *datapath.Netns, keep bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.sandboxes[id]
	if !keep || r.closed || e == nil || e.sb.Netns != h.Path() || r.hosts[id] != nil || strings.HasPrefix(filepath.Clean(h.Path()), "/proc/") {
		h.Close()
		return
	}
	r.hosts[id] = h
}

// ReleaseNetns closes sandbox id's kept netns, if any: call it when its
// path is gone, since a kept netns stays alive, its links with it.
func (r *Reconciler) ReleaseNetns(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if h := r.hosts[id]; h != nil {
		h.Close()
		delete(r.hosts, id)
	}
}

// keepable says whether a pass that ended in err leaves its netns fit to
// keep: a success, or a failure away from the host side.
func keepable(err error) bool {
	switch CauseOf(err) {
	case "", CauseWaiting, CauseAgent, CauseQMP, CauseState:
		return true
	}
	return false
}

// closeAgentLocked drops sandbox id's agent connection; r.mu must be held.
func (r *Reconciler) closeAgentLocked(id string) {
	if c := r.agents[id]; c != nil {
		c.Close()
		delete(r.agents, id)
	}
}

// AgentCalls returns how many agent calls were made, by method name
// (ListInterfaces, ListRoutes to look, UpdateInterface, UpdateRoutes,
// AddARPNeighbors to change the guest).
func (r *Reconciler) AgentCalls() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.agentCalls)
}

// agentClient returns the sandbox's live agent connection, dialling one
// when there is none or the last one died.
func (r *Reconciler) agentClient(ctx context.Context, sb Sandbox) (*agent.Client, error) {
	r.mu.Lock()
	c := r.agents[sb.ID]
	r.mu.Unlock()
	if c != nil {
		select {
		case <-c.Done():
		default:
			return c, nil
		}
	}
	c, err := agent.Dial(ctx, sb.Agent, sb.GuestTimeout)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur, ok := r.sandboxes[sb.ID]; !ok || cur.sb.Agent != sb.Agent {
		c.Close()
		return nil, fmt.Errorf("sandbox %s: %w while connecting to its agent", sb.ID, ErrUnknownSandbox)
	}
	if old := r.agents[sb.ID]; old != nil {
		old.Close()
	}
	r.agents[sb.ID] = c
	return c, nil
}

// dropAgent closes c if it is still sandbox id's agent connection: after
// a failed call the next pass dials afresh, and asks what the guest has.
func (r *Reconciler) dropAgent(id string, c *agent.Client) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.agents[id] == c {
		r.closeAgentLocked(id)
		r.noteGuestLocked(id, eventAgentFailed)
	}
}

// countingGuest counts the calls it passes on.
type countingGuest struct {
	*agent.Client
	r *Reconciler
}

func (g countingGuest) count(method string) {
	g.r.mu.Lock()
	g.r.agentCalls[method]++
	g.r.mu.Unlock()
}

func (g countingGuest) UpdateInterface(ctx context.Context, i agent.Interface) (agent.Interface, error) {
	g.count("UpdateInterface")
	return g.Client.UpdateInterface(ctx, i)
}

func (g countingGuest) UpdateRoutes(ctx context.Context, rs []agent.Route) ([]agent.Route, error) {
	g.count("UpdateRoutes")
	return g.Client.UpdateRoutes(ctx, rs)
}

func (g countingGuest) AddARPNeighbors(ctx context.Context, ns []agent.Neighbor) error {
	g.count("AddARPNeighbors")
	return g.Client.AddARPNeighbors(ctx, ns)
}

// ErrUnknownSandbox is returned for a sandbox id that is not registered.
var ErrUnknownSandbox = errors.New("unknown sandbox")

func (r *Reconciler) sandbox(id string) (Sandbox, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.sandboxes[id]
	if !ok {
		return Sandbox{}, fmt.Errorf("sandbox %s: %w", id, ErrUnknownSandbox)
	}
	return e.sb, nil
}

// client returns the sandbox's live QMP connection, dialling a new one
// when there is none or the last one died.
func (r *Reconciler) client(ctx context.Context, sb Sandbox) (*qmp.Client, error) {
	c, _, err := r.clientModel(ctx, sb)
	return c, err
}

// ErrConnecting ends a pass that found no live QMP connection and
// started a dial in the background (see Reconciler.OnDialDone). It is not
// a failure: the queue neither counts it nor backs off, and the dial's
// end triggers the next pass.
var ErrConnecting = errors.New("connecting to the VM's monitor")

// backgroundDial is a sandbox's dial started by a pass (see passClient)
// or ahead of its first pass (see Connect).
type backgroundDial struct {
	sock   string // the QMP socket dialled
	cancel context.CancelFunc
	done   bool
	err    error // why it failed, for the next pass to report
	// waited: a pass ended with ErrConnecting on this dial, and its end
	// calls OnDialDone for the next one.
	waited bool
}

// passClient is clientModel for a pass. With OnDialDone set, it never
// waits for a dial: a sandbox without a live connection gets one dial in
// the background (one at a time, bounded by its QMP timeout) and
// ErrConnecting now; the pass after the dial ended gets the connection,
// or the dial's error (once: the pass after it dials again).
func (r *Reconciler) passClient(ctx context.Context, sb Sandbox) (*qmp.Client, *vmModel, error) {
	done := r.OnDialDone
	if done == nil {
		return r.clientModel(ctx, sb)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, m := r.liveLocked(sb.ID); c != nil {
		return c, m, nil
	}
	if d := r.dials[sb.ID]; d != nil {
		if !d.done {
			d.waited = true
			return nil, nil, fmt.Errorf("sandbox %s: %w %s: a dial is under way", sb.ID, ErrConnecting, sb.QMP)
		}
		delete(r.dials, sb.ID)
		if d.err != nil && d.sock == sb.QMP && d.waited {
			return nil, nil, d.err
		}
		// Connected, and the connection has died since (or the socket
		// changed), or a dial ahead of the passes (Connect) failed,
		// perhaps long ago: dial again.
	}
	if r.closed {
		return nil, nil, fmt.Errorf("sandbox %s: %w", sb.ID, qmp.ErrClosed)
	}
	r.dialLocked(ctx, sb, done, true)
	return nil, nil, fmt.Errorf("sandbox %s: %w %s: dial started", sb.ID, ErrConnecting, sb.QMP)
}

// liveLocked returns sandbox id's connection and its model while the
// connection lives; r.mu must be held.
func (r *Reconciler) liveLocked(id string) (*qmp.Client, *vmModel) {
	c, m := r.conns[id], r.models[id]
	if c == nil || m == nil || m.conn != c {
		return nil, nil
	}
	select {
	case <-c.Done():
		return nil, nil
	default:
		return c, m
	}
}

// clientModel is client, and the connection's model of the VM: a new
// connection comes with a new, unknown model.
func (r *Reconciler) clientModel(ctx context.Context, sb Sandbox) (*qmp.Client, *vmModel, error) {
	// Two passes (a reconcile and a `tapsync plan`) must not both dial:
	// the second would wait for a greeting that never comes.
	defer r.lockDial(sb.QMP)()
	r.mu.Lock()
	c, m := r.liveLocked(sb.ID)
	r.mu.Unlock()
	if c != nil {
		return c, m, nil
	}
	// Events from the first one on change the model (and their count
	// keeps a full observation that overlapped one from being trusted).
	on, id := r.OnEvent, sb.ID
	m = &vmModel{onReset: func() { r.noteReset(id) }}
	opts := qmp.Options{Timeout: sb.QMPTimeout, CheckConn: sb.CheckQMP}
	opts.OnEvent = func(e qmp.Event) {
		m.event(e)
		if on != nil {
			on(id, e)
		}
	}
	dial := qmp.Dial
	if sb.Monitor == MonitorHMP {
		dial = qmp.DialHMP
	}
	c, err := dial(ctx, sb.QMP, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("sandbox %s: %w", sb.ID, err)
	}
	m.mu.Lock()
	m.conn = c
	m.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur, ok := r.sandboxes[sb.ID]; !ok || cur.sb.QMP != sb.QMP {
		c.Close() // unregistered or re-pointed while we dialled
		return nil, nil, fmt.Errorf("sandbox %s: %w while connecting to %s", sb.ID, ErrUnknownSandbox, sb.QMP)
	}
	if old := r.conns[sb.ID]; old != nil {
		old.Close()
	}
	r.conns[sb.ID], r.models[sb.ID] = c, m
	if closed := r.OnMonitorClosed; closed != nil {
		c.AfterClose(func() { r.monitorClosed(sb.ID, c, closed) })
	}
	return c, m, nil
}

// monitorClosed, run once c is dead (qmp.Client.AfterClose: no goroutine
// waits per connection), calls closed(id) when QEMU ended c while it was
// still sandbox id's connection: a QEMU that exits between passes is
// noticed then, not at the next trigger. A connection tapsync closed
// (dropped, replaced, or failed by a command's timeout) is not QEMU's
// doing.
func (r *Reconciler) monitorClosed(id string, c *qmp.Client, closed func(string)) {
	if err := c.Err(); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		return
	}
	r.mu.Lock()
	current := r.conns[id] == c
	r.mu.Unlock()
	if current {
		closed(id)
	}
}

// Verify makes the next pass over sandbox id observe its VM fully, even
// when the model of the VM is fresh, and log what the model had wrong,
// and ask the guest's agent what the guest has. The periodic resync asks
// it of every sandbox.
func (r *Reconciler) Verify(id string) {
	r.mu.Lock()
	m := r.models[id]
	r.noteGuestLocked(id, eventVerify)
	r.mu.Unlock()
	if m != nil {
		m.mu.Lock()
		m.verify = true
		m.mu.Unlock()
	}
}

// VerifyAll asks Verify of every registered sandbox.
func (r *Reconciler) VerifyAll() {
	r.mu.Lock()
	ids := slices.Collect(maps.Keys(r.sandboxes))
	r.mu.Unlock()
	for _, id := range ids {
		r.Verify(id)
	}
}

// StatusOf returns the last outcome of sandbox id, as Status would list
// it, without copying and sorting every sandbox's (a pass's caller asks
// this of each pass).
func (r *Reconciler) StatusOf(id string) (Status, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.sandboxes[id]
	if !ok {
		return Status{}, false
	}
	s := r.status[id]
	s.Sandbox, s.Source = e.sb, e.source
	return s, true
}

// forgetModel makes the model of sandbox id's VM unknown: after an error
// anything may have happened, and the next pass observes fully.
func (r *Reconciler) forgetModel(id string) {
	r.mu.Lock()
	m := r.models[id]
	r.mu.Unlock()
	m.forget()
}

// session is one sandbox opened for a pass: its netns, VM and record.
type session struct {
	sb   Sandbox
	host *datapath.Netns
	vm   qmpVM
	// forPlan: the session of a plan (Plan), which reads what passes keep
	// between them and changes none of it. hostKept says its netns is the
	// one kept for the passes, and ownAgent is the plan's own agent
	// connection, if it made one (see endPlan).
	forPlan  bool
	hostKept bool
	ownAgent *agent.Client
	rec      state.Record
	obs      Observed
	queues   int // per new endpoint, resolved (see countQueues)
	// taps are the indexes of our taps and macvtaps in the netns, and
	// tapLinks the MACs of its tap and macvtap container links, from the
	// host side of the observation under way (see accounted).
	taps     []int
	tapLinks []net.HardwareAddr
}

// open opens sandbox id for a pass, or for a plan (forPlan; see session).
func (r *Reconciler) open(ctx context.Context, id string, forPlan bool) (*session, error) {
	sb, err := r.sandbox(id)
	if err != nil {
		return nil, err
	}
	host, kept, err := r.openHost(id, sb.Netns)
	if err != nil {
		return nil, fmt.Errorf("sandbox %s: %w", id, err)
	}
	r.reidentify(id, sb.Netns, host.ID())
	s := &session{sb: sb, host: host, forPlan: forPlan, hostKept: kept}
	client := r.passClient
	if forPlan {
		client = r.clientModel
	}
	c, m, err := client(ctx, sb)
	if errors.Is(err, ErrConnecting) {
		r.keepHost(id, host, true) // for the pass the dial's end starts
		return nil, err
	}
	if err != nil {
		r.endPlan(s)
		return nil, err
	}
	s.vm = qmpVM{c: c, unplugWait: sb.UnplugTimeout, placement: sb.Placement, model: m,
		recorded:  func() bool { return len(s.rec.Endpoints) > 0 },
		accounted: func(nics []qmp.NICInfo) bool { return accounted(s.rec, nics, s.taps, s.tapLinks) }}
	if s.rec, err = r.loadRecord(ctx, id); err != nil {
		r.endPlan(s)
		return nil, err
	}
	s.rec.Netns = sb.Netns
	if err := s.observe(ctx); err != nil {
		// Not kept after a failure on the host side (see keepHost).
		s.hostKept = false
		r.endPlan(s)
		return nil, fmt.Errorf("sandbox %s: observe: %w", id, err)
	}
	return s, nil
}

// endPlan closes what session s opened for itself, and gives the netns
// kept for the passes back to them. A pass's session is ended by
// Reconcile itself (keepHost) once open has returned it.
func (r *Reconciler) endPlan(s *session) {
	switch {
	case s.forPlan && s.hostKept:
		r.keepHost(s.sb.ID, s.host, true)
	default:
		s.host.Close()
	}
	if s.ownAgent != nil {
		s.ownAgent.Close()
	}
}

// parts is what a pass reads of the netns besides its links, taps,
// redirects and limits: addresses, routes and neighbours only when its
// plan can use them. A guest mirrors all three; the macvtap model moves a
// link's addresses and routes (for a new endpoint, or back from a
// recorded one).
func (s *session) parts() datapath.Parts {
	guest := s.sb.guestOn()
	macvtap := s.sb.Model == ModelMacvtap ||
		slices.ContainsFunc(s.rec.Endpoints, func(e state.Endpoint) bool { return planner.BorrowsLink(e) })
	return datapath.Parts{Addrs: guest || macvtap, Routes: guest || macvtap, Neighbors: guest}
}

// refresh reads the netns's container links again, and the routes and
// neighbours parts asks for, for guest steps sent later in the pass
// (Env.Refresh).
func (s *session) refresh(_ context.Context, parts datapath.Parts) (Observed, error) {
	var (
		o   Observed
		err error
	)
	if o.Links, err = s.host.ContainerLinks(); err != nil {
		return Observed{}, err
	}
	if parts.Routes {
		if o.Routes, err = s.host.Routes(); err != nil {
			return Observed{}, err
		}
	}
	if parts.Neighbors {
		if o.Neighbors, err = s.host.Neighbors(); err != nil {
			return Observed{}, err
		}
	}
	return o, nil
}

func (s *session) observe(ctx context.Context) error {
	hs, err := s.host.Observe(s.parts())
	if err != nil {
		return err
	}
	s.taps = s.taps[:0]
	for _, t := range hs.Taps {
		s.taps = append(s.taps, t.Index)
	}
	for _, m := range hs.Macvtaps {
		if m.Index >= 0 {
			s.taps = append(s.taps, m.Index)
		}
	}
	s.tapLinks = s.tapLinks[:0]
	for _, l := range hs.Links {
		if l.Kind == "tap" || l.Kind == "macvtap" {
			s.tapLinks = append(s.tapLinks, l.MAC)
		}
	}
	m := s.vm.model
	var fromModel bool
	if s.forPlan {
		fromModel = m != nil && m.usable() && kataSeen(m, hs.KataLinks)
	} else {
		if m != nil && m.kataChanged(hs.KataLinks) {
			m.forget()
		}
		fromModel = m != nil && m.usable()
	}
	nics, netdevs, err := s.nics(ctx, fromModel)
	if err != nil {
		return err
	}
	s.obs = Observed{Links: hs.Links, Taps: hs.Taps, Macvtaps: hs.Macvtaps, RateLimits: hs.RateLimits, KataLinks: hs.KataLinks,
		Redirects: hs.Redirects, Routes: hs.Routes,
		Neighbors: hs.Neighbors, NICs: nics, Netdevs: netdevs}
	if fromModel && len(hs.KataLinks) > 0 && !Compute(s.obs, s.rec, s.options()).Empty() {
		// Kata may have plugged what the plan is about to act on.
		if !s.forPlan {
			m.forget()
		}
		if s.obs.NICs, s.obs.Netdevs, err = s.nics(ctx, false); err != nil {
			return err
		}
	}
	return s.countQueues(ctx)
}

// nics reads the VM's NICs and our netdevs. A pass reads them through the
// model (see qmpVM.NICs). A plan reads the model only when fromModel and
// it is fresh, else QEMU directly: what it reads is not installed in the
// model, nor does it take the model's first reading or a verify due.
func (s *session) nics(ctx context.Context, fromModel bool) ([]NIC, []int, error) {
	if !s.forPlan {
		return s.vm.NICs(ctx)
	}
	if fromModel {
		if infos, netdevs, ok := s.vm.model.fresh(); ok {
			return nicsOf(infos), netdevs, nil
		}
	}
	vm, err := s.vm.c.ReadVM(ctx)
	if err != nil {
		return nil, nil, err
	}
	return nicsOf(vm.NICs), netdevIndexes(vm.Netdevs), nil
}

// kataSeen says whether links are the Kata links model m saw at the last
// pass, recording nothing: kataChanged asked of a model holding only that
// memory. A plan that recorded them would hide Kata's hot-plug from the
// next pass.
func kataSeen(m *vmModel, links []datapath.Link) bool {
	m.mu.Lock()
	probe := vmModel{kataLinks: m.kataLinks}
	m.mu.Unlock()
	return !probe.kataChanged(links)
}

func (s *session) options() Options {
	return Options{Queues: s.queues, Guest: s.sb.guestOn(), RepairAdopted: s.sb.RepairAdopted,
		Model: s.sb.Model, RxRate: s.sb.RxRate, TxRate: s.sb.TxRate}
}

// planWithGuest computes the plan, asking the agent for the guest's state
// only when the record cannot show the guest converged. It returns the
// agent to apply the plan with (nil when the plan needs none), and the
// reason the guest side could not be reached: then the plan has no guest
// steps and the host side goes ahead alone.
func (r *Reconciler) planWithGuest(ctx context.Context, s *session) (Plan, Guest, *agent.Client, error) {
	opts := s.options()
	p := Compute(s.obs, s.rec, opts)
	if !slices.ContainsFunc(p.Actions, func(a Action) bool { return a.Op.Guestward() }) {
		return p, nil, nil, nil
	}
	var c *agent.Client
	var err error
	if s.forPlan {
		c, err = r.agentForPlan(ctx, s)
	} else {
		c, err = r.agentClient(ctx, s.sb)
	}
	if err == nil && p.NeedsGuest() {
		var g GuestState
		cg := countingGuest{Client: c, r: r}
		cg.count("ListInterfaces")
		if g.Interfaces, err = c.ListInterfaces(ctx); err == nil {
			cg.count("ListRoutes")
			g.Routes, err = c.ListRoutes(ctx)
		}
		if err == nil {
			s.obs.Guest = &g
			p = Compute(s.obs, s.rec, opts)
		} else if !s.forPlan {
			r.dropAgent(s.sb.ID, c)
		}
	}
	if err != nil {
		opts.Guest = false
		return Compute(s.obs, s.rec, opts), nil, nil, err
	}
	return p, countingGuest{Client: c, r: r}, c, nil
}

// agentForPlan returns the passes' agent connection to sandbox s while
// it works, else a connection of the plan's own (closed by endPlan): a
// plan never replaces or drops theirs, so that the next pass still finds
// a lost connection lost (see takeGuestEvents).
func (r *Reconciler) agentForPlan(ctx context.Context, s *session) (*agent.Client, error) {
	r.mu.Lock()
	c := r.agents[s.sb.ID]
	r.mu.Unlock()
	if c != nil {
		select {
		case <-c.Done():
		default:
			return c, nil
		}
	}
	c, err := agent.Dial(ctx, s.sb.Agent, s.sb.GuestTimeout)
	if err != nil {
		return nil, err
	}
	s.ownAgent = c
	return c, nil
}

// Plan computes what a reconcile of sandbox id would do now, changing
// nothing. It waits for a pass under way, or for ctx to end: beside a
// pass it would plan from a sandbox half-changed, through the netns,
// model and agent connection that pass is using. What passes keep between
// them (the netns, the model of the VM, the agent connection) it reads
// and leaves as it found it.
func (r *Reconciler) Plan(ctx context.Context, id string) (Plan, error) {
	_, release, err := r.lockPass(ctx, id)
	if err != nil {
		return Plan{}, err
	}
	defer release()
	s, err := r.open(ctx, id, true)
	if err != nil {
		return Plan{}, err
	}
	defer r.endPlan(s)
	p, _, _, err := r.planWithGuest(ctx, s)
	if err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Str("sandbox", id).Msg("plan without the guest side: agent unreachable")
	}
	return p, nil
}

// maxLinksGone bounds the deletions noted per sandbox between two
// observations; past it the rest are not noted (the queue's re-run after
// the pass still sees them).
const maxLinksGone = 32

// NoteLinkGone tells the reconciler that the link with ifindex was
// deleted from sandbox id's netns (a netlink event). A pass whose
// observation still lists that link looks again before it acts: its plan
// was made from a netns that no longer is (an observation is a dump per
// kind of object: the link dump can list a link that a later dump of the
// same observation finds without its qdiscs, and a plan to repair them
// would fail on the link a moment later). It must not block.
func (r *Reconciler) NoteLinkGone(id string, ifindex int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.sandboxes[id]; ok && len(e.linksGone) < maxLinksGone && !slices.Contains(e.linksGone, ifindex) {
		e.linksGone = append(e.linksGone, ifindex)
	}
}

// takeLinksGone returns and clears the deletions noted for sandbox id.
func (r *Reconciler) takeLinksGone(id string) []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.sandboxes[id]
	if !ok {
		return nil
	}
	gone := e.linksGone
	e.linksGone = nil
	return gone
}

// Reconcile runs one observe → plan → apply → record pass over sandbox
// id. It is the queue's work function.
func (r *Reconciler) Reconcile(ctx context.Context, id string) (err error) {
	log := zerolog.Ctx(ctx).With().Str("sandbox", id).Logger()
	ctx = log.WithContext(ctx)
	release, err := r.beginPass(ctx, id)
	if err != nil {
		return err
	}
	defer release()
	var st Status
	waiting := false // the pass ended waiting for the guest or QEMU, not failed
	defer func() {
		st.LastReconcile = time.Now()
		if err != nil {
			st.LastError = err.Error()
			if !waiting && (isQMP(err) || ctx.Err() != nil) {
				// A failed QMP command forgets the model itself (qmpVM);
				// this is the safety net for what failed around one.
				r.forgetModel(id)
			}
		}
		r.mu.Lock()
		if errors.Is(err, ErrConnecting) {
			// Nothing was observed: what the last pass found stands.
			last := r.status[id]
			last.LastReconcile, last.LastError = st.LastReconcile, st.LastError
			st = last
		}
		if _, ok := r.sandboxes[id]; ok {
			r.status[id] = st
		}
		r.mu.Unlock()
	}()
	r.takeLinksGone(id) // the observation below sees the deletions before it
	s, err := r.open(ctx, id, false)
	if err != nil {
		// Its QMP failures say so themselves (CauseOf looks first).
		return WithCause(CauseNetns, err)
	}
	defer func() { r.keepHost(id, s.host, keepable(err)) }()
	if r.afterObserve != nil {
		r.afterObserve(id)
	}
	if err := r.applyGuestEvents(ctx, s); err != nil {
		return err
	}
	if _, err := s.readFully(ctx, func() Plan { return Compute(s.obs, s.rec, s.options()) }); err != nil {
		return WithCause(CauseNetns, fmt.Errorf("sandbox %s: observe: %w", id, err))
	}
	p, guest, client, guestErr := r.planWithGuest(ctx, s)
	if gone := r.takeLinksGone(id); s.obs.Lists(gone) {
		// Once: a netns whose links keep going is left to the queue's
		// re-run.
		log.Debug().Ints("links_gone", gone).Msg("a link observed has been deleted since: observing again before acting")
		if err := s.observe(ctx); err != nil {
			return WithCause(CauseNetns, fmt.Errorf("sandbox %s: observe: %w", id, err))
		}
		p, guest, client, guestErr = r.planWithGuest(ctx, s)
	}
	if again, err := s.readFully(ctx, func() Plan { return p }); err != nil {
		return WithCause(CauseNetns, fmt.Errorf("sandbox %s: observe: %w", id, err))
	} else if again {
		p, guest, client, guestErr = r.planWithGuest(ctx, s)
	}
	st.Skipped, st.Notes = p.Skipped, p.Notes
	r.logSkipped(log, id, p.Skipped)
	env := Env{Host: s.host, VM: s.vm, Guest: guest, Recorder: r.store, Vhost: s.sb.Vhost, AfterAction: r.AfterAction,
		GuestLinkWait: s.sb.GuestTimeout, Refresh: s.refresh}
	rec, out, err := Apply(ctx, p, s.rec, s.obs, env)
	st.Mutations, st.Pending, st.Held, st.Endpoints = out.Mutations, out.Pending, out.Held, rec.Endpoints
	if client != nil && out.GuestFailed {
		r.dropAgent(id, client) // a call failed or timed out: dial afresh next time
	}
	st.Guest, st.GuestEndpoints = r.guestStatus(id, s.sb, rec, out, guestErr)
	r.logGuest(log, id, guestErr)
	switch {
	case !p.Empty() && err == nil:
		log.Info().Int("actions", len(p.Actions)).Int("mutations", out.Mutations).Ints("pending", out.Pending).Msg("reconciled")
	case !p.Empty():
		// The queue's work function logs failures, once per distinct error
		// rather than per pass (see FailureLog).
		log.Debug().Int("actions", len(p.Actions)).Int("mutations", out.Mutations).Ints("pending", out.Pending).Err(err).Msg("pass failed")
	}
	if err != nil {
		cause := CauseNetns
		if linkVanished(err) {
			cause = CauseChanged
		}
		return WithCause(cause, fmt.Errorf("sandbox %s: %w", id, errors.Join(err, guestErr)))
	}
	if guestErr != nil {
		// The host side is done; the guest's is retried with backoff.
		return WithCause(CauseAgent, fmt.Errorf("sandbox %s: guest agent at %s: %w", id, s.sb.Agent, guestErr))
	}
	waiting = true // the model followed every unplug's outcome
	if len(out.Pending) > 0 {
		// Not a failure, but not done: come back (with backoff) until the
		// guest acknowledges, in case its DEVICE_DELETED is missed.
		return WithCause(CauseWaiting, fmt.Errorf("sandbox %s: unplug of endpoints %v pending", id, out.Pending))
	}
	if len(out.Held) > 0 {
		return WithCause(CauseWaiting, fmt.Errorf("sandbox %s: plug of endpoints %v held until the NICs they replace are gone", id, out.Held))
	}
	return nil
}

// logGuest logs an unreachable agent once per distinct error, and its
// recovery.
func (r *Reconciler) logGuest(log zerolog.Logger, id string, guestErr error) {
	msg := ""
	if guestErr != nil {
		msg = guestErr.Error()
	}
	r.mu.Lock()
	prev := r.guestLog[id]
	r.guestLog[id] = msg
	r.mu.Unlock()
	switch {
	case msg == prev:
	case msg != "":
		log.Warn().Err(guestErr).Msg("guest agent unreachable: the host side is wired, the guest's is retried with backoff")
	default:
		log.Info().Msg("guest agent reachable again")
	}
}

// logSkipped explains skipped links once, when the set changes.
func (r *Reconciler) logSkipped(log zerolog.Logger, id string, skipped []Skipped) {
	r.mu.Lock()
	prev := r.status[id].Skipped
	r.mu.Unlock()
	for _, s := range skipped {
		if slices.ContainsFunc(prev, func(p Skipped) bool { return p.Link.Ifindex == s.Link.Ifindex && p.Reason == s.Reason }) {
			continue
		}
		ev := log.Warn()
		if s.Adopted && !s.Broken {
			ev = log.Info()
		}
		ev.Str("link", s.Link.Name).Str("kind", s.Link.Kind).Bool("adopted", s.Adopted).Bool("broken", s.Broken).
			Str("reason", s.Reason).Msg("container link not wired by tapsync")
	}
}

// ErrTeardownWaiting is returned by Teardown while it cannot finish
// safely yet: the guest has not released a NIC, or QEMU neither answers
// nor has provably exited. The caller retries (with backoff).
var ErrTeardownWaiting = errors.New("teardown waiting for QEMU")

// Teardown ends sandbox id whose pod is going away (task exit or delete):
// every endpoint is removed through the planner in the safe order, then
// the record and the registration go. While QEMU answers, its NICs are
// unplugged first; a tap is deleted only once QEMU has let go of it or
// has exited. A netns that is already gone took everything with it.
func (r *Reconciler) Teardown(ctx context.Context, id string) error {
	sb, err := r.sandbox(id)
	if err != nil {
		return nil // unknown or already unregistered: nothing of ours to remove
	}
	log := zerolog.Ctx(ctx).With().Str("sandbox", id).Logger()
	ctx = log.WithContext(ctx)
	release, err := r.beginPass(ctx, id)
	if err != nil {
		return nil
	}
	defer release()
	r.forgetModel(id) // its unplugs go through a VM without the model
	host, _, err := r.openHost(id, sb.Netns)
	if err != nil {
		if _, statErr := os.Stat(sb.Netns); statErr == nil {
			return fmt.Errorf("sandbox %s: %w", id, err)
		}
		log.Info().Msg("sandbox gone with its netns; record deleted")
		return r.endSandbox(id)
	}
	defer host.Close()
	rec, err := r.store.Load(ctx, id)
	if err != nil {
		return err
	}
	// Addresses and routes: what the macvtap model took goes back.
	hs, err := host.Observe(datapath.Parts{Addrs: true, Routes: true})
	if err != nil {
		return fmt.Errorf("sandbox %s: observe: %w", id, err)
	}
	// The links stay: they get back what the macvtap model took, and our
	// limits on them go.
	obs := Observed{Links: hs.Links, Taps: hs.Taps, Macvtaps: hs.Macvtaps, RateLimits: hs.RateLimits, KataLinks: hs.KataLinks,
		Redirects: hs.Redirects, Routes: hs.Routes}
	env := Env{Host: host, Recorder: r.store, Vhost: sb.Vhost, AfterAction: r.AfterAction}
	c, gone, err := r.vmForTeardown(ctx, sb)
	if err != nil {
		return err
	}
	if !gone {
		vm := qmpVM{c: c, unplugWait: sb.UnplugTimeout, placement: sb.Placement}
		if obs.NICs, obs.Netdevs, err = vm.NICs(ctx); err != nil {
			return fmt.Errorf("sandbox %s: %w: list NICs: %w", id, ErrTeardownWaiting, err)
		}
		env.VM = vm
	}
	p := ComputeTeardown(obs, rec, gone)
	_, out, err := Apply(ctx, p, rec, obs, env)
	if err != nil {
		return fmt.Errorf("sandbox %s: teardown: %w", id, err)
	}
	if len(out.Pending) > 0 {
		return fmt.Errorf("sandbox %s: %w: the guest has not released endpoints %v (their taps stay until it does or QEMU exits)",
			id, ErrTeardownWaiting, out.Pending)
	}
	log.Info().Int("mutations", out.Mutations).Bool("qemu_gone", gone).Msg("sandbox gone; its NICs, taps and redirects removed, record deleted")
	return r.endSandbox(id)
}

// endSandbox deletes the record of a sandbox that is gone, then
// unregisters it (a failed delete leaves it registered, to be retried).
func (r *Reconciler) endSandbox(id string) error {
	if err := r.store.Delete(id); err != nil {
		return err
	}
	r.Unregister(id)
	return nil
}

// vmForTeardown decides whether QEMU still runs. Alive: it answers on its
// QMP socket (a connection is returned). Gone: the socket refuses
// connections or no longer exists — nobody listens on it, which for a
// monitor socket QEMU holds for its whole life means QEMU has exited (or
// at least can no longer use a tap). Anything else (a dial that times
// out: QEMU hung, or another client holds the single-client socket) is no
// evidence either way, and the teardown waits: deleting a tap under a
// live QEMU is what the order exists to avoid.
func (r *Reconciler) vmForTeardown(ctx context.Context, sb Sandbox) (*qmp.Client, bool, error) {
	c, _, err := r.passClient(ctx, sb)
	switch {
	case err == nil:
		return c, false, nil
	case errors.Is(err, ErrConnecting):
		return nil, false, err
	case errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, fs.ErrNotExist):
		r.mu.Lock()
		r.closeConnLocked(sb.ID)
		r.mu.Unlock()
		return nil, true, nil
	}
	return nil, false, fmt.Errorf("sandbox %s: %w: QEMU neither answers on %s nor has left it: %w", sb.ID, ErrTeardownWaiting, sb.QMP, err)
}

// CollectGarbage deletes the records of sandboxes whose netns no longer
// exists and that are not registered, and returns their ids.
func (r *Reconciler) CollectGarbage(ctx context.Context) ([]string, error) {
	ids, err := r.store.List()
	if err != nil {
		return nil, err
	}
	var gone []string
	for _, id := range ids {
		r.mu.Lock()
		_, registered := r.sandboxes[id]
		r.mu.Unlock()
		if registered {
			continue
		}
		rec, err := r.store.Load(ctx, id)
		if err != nil {
			return gone, err
		}
		if rec.Netns != "" {
			if _, err := os.Stat(rec.Netns); err == nil {
				continue
			}
		}
		if err := r.store.Delete(id); err != nil {
			return gone, err
		}
		zerolog.Ctx(ctx).Info().Str("sandbox", id).Str("netns", rec.Netns).Msg("netns gone; record garbage-collected")
		gone = append(gone, id)
	}
	return gone, nil
}

// HotplugCapacity tells where sandbox id's VM can still take NICs under
// its placement policy, over the sandbox's own QMP connection.
func (r *Reconciler) HotplugCapacity(ctx context.Context, id string) (qmp.Capacity, error) {
	sb, err := r.sandbox(id)
	if err != nil {
		return qmp.Capacity{}, err
	}
	c, err := r.client(ctx, sb)
	if err != nil {
		return qmp.Capacity{}, err
	}
	return c.HotplugCapacity(ctx, sb.Placement)
}
