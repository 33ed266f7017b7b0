package reconcile

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
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
	// at once with ErrConnecting; it is called with the sandbox when that
	// dial ends, connected or not. It must not block (poke a queue).
	OnDialDone func(sandbox string)
	// KeepFilters, when set before the first pass, keeps each netns's
	// ingress filters from one pass to the next
	// (datapath.Netns.KeepFilters). Set it only when every netlink
	// message about the sandboxes' links and tc reaches
	// NoteNetlink.
	KeepFilters bool
	// AfterAction, if set, is called after every completed action of
	// every sandbox, a record step once it is written (fault injection
	// for crash tests; see Env).
	AfterAction func(Action)

	// afterObserve, if set, runs after a pass's first observation, before
	// its plan (fault injection: the netns changing under a pass).
	afterObserve func(id string)
	// passWait, if set, runs when a pass or a plan finds sandbox id's pass
	// lock taken, before it waits for it.
	passWait func(id string)

	registering sync.Mutex // held by Register, around r.mu

	mu sync.Mutex
	// sandboxes is the registry, by id: one runtime per netns (see
	// Register), holding all that is kept of the sandbox (runtime.go).
	sandboxes map[string]*sandboxRuntime
	netnses   netnsIndex           // the sandboxes by netns identity (netnsid.go)
	closed    bool                 // Close was called: nothing more is kept
	dialing   map[string]*dialLock // per QMP socket: one dial at a time (a QMP socket takes one client)
	// agentCalls counts the calls made to agents, by method.
	agentCalls map[string]int
}

// New returns a Reconciler recording into store.
func New(store *state.Store) *Reconciler {
	return &Reconciler{store: store, sandboxes: map[string]*sandboxRuntime{}, netnses: newNetnsIndex(), dialing: map[string]*dialLock{}, agentCalls: map[string]int{}}
}

// Close closes every QMP connection, agent connection and kept netns.
// Endpoints stay as they are: VMs keep their network while tapsync is
// down.
func (r *Reconciler) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	for _, rt := range r.sandboxes {
		rt.closeLocked()
	}
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

// Verify makes the next pass over sandbox id observe its VM fully, even
// when the model of the VM is fresh, and log what the model had wrong,
// and ask the guest's agent what the guest has. The periodic resync asks
// it of every sandbox.
func (r *Reconciler) Verify(id string) { r.note(id, causeVerify) }

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
	rt := r.sandboxes[id]
	if rt == nil {
		return Status{}, false
	}
	s := rt.status
	s.Sandbox, s.Source = rt.sb, rt.source
	return s, true
}
