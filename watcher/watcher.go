// Package watcher turns the node's event sources into events for the
// daemon: the netns directory (fsnotify), link, address, route and tc
// changes inside each sandbox netns (netlink), containerd task and
// container events, and QEMU processes found in /proc. An event only says
// what to look at; the reconciler reads the whole truth again.
//
// It knows nothing of taps or QEMU's wiring, never decodes a netlink
// message into state, and imports no other tapsync package: the daemon
// (cmd/tapsync) routes its events into the reconciler.
package watcher

// Source names where an event came from (a metrics label).
type Source string

const (
	SourceNetnsDir   Source = "netns-dir"
	SourceNetlink    Source = "netlink"
	SourceContainerd Source = "containerd"
	SourceProc       Source = "proc"
)

// Sandbox is a sandbox as a source discovered it.
type Sandbox struct {
	ID    string
	Netns string // path of its network namespace
	QMP   string // path of its monitor's unix socket (QMP unless Protocol says HMP)
	// Protocol is the monitor's: ProtoQMP ("" too) or ProtoHMP.
	Protocol string
	// Wrapped says the monitor is the one tapsync's QEMU wrapper adds;
	// MonitorNote, why another was taken (or none exists yet).
	Wrapped     bool
	MonitorNote string
	// Runtime is the containerd runtime name (io.containerd.kata-qemu.v2),
	// Flavour the Kata runtime serving it (FlavourGo, FlavourRs), and
	// Bundle the bundle dir its QEMU runs in (runtime-rs), all from
	// containerd only.
	Runtime, Flavour, Bundle string
	// AgentURL is where its guest agent is, as a template of the source's
	// layout ("" when the source knows none).
	AgentURL string
	// Skip, when not "", says why this sandbox is found but left alone
	// (a confidential handler): the daemon shows it and wires nothing.
	Skip string
	// PID, from /proc discovery only, is the QEMU process that must be
	// listening on QMP: check it with CheckQMPPeer before trusting the
	// socket. 0 from the other sources.
	PID int
	// RxRate and TxRate are Kata's per-pod rate limits from the sandbox's
	// OCI annotations, in bit/s (0: unlimited); nil when the pod sets none.
	RxRate, TxRate *uint64
}

// Kind says what an event asks for.
type Kind int

const (
	// KindNetns: look at the sandboxes in namespace Path (it appeared,
	// became a real netns, or changed).
	KindNetns Kind = iota
	// KindNetnsGone: namespace Path was removed.
	KindNetnsGone
	// KindSandbox: look at sandbox ID.
	KindSandbox
	// KindUpsert: sandbox Sandbox exists (discovered or updated).
	KindUpsert
	// KindGone: sandbox ID is gone (its container exited or was deleted).
	KindGone
	// KindResyncAll: events may have been lost; look at everything.
	KindResyncAll
)

func (k Kind) String() string {
	return [...]string{"netns", "netns-gone", "sandbox", "upsert", "gone", "resync-all"}[k]
}

// Event is one thing a source noticed.
type Event struct {
	Kind   Kind
	Source Source
	Why    string // human-readable reason, for logs
	Path   string // KindNetns, KindNetnsGone
	ID     string // KindSandbox, KindGone
	// LinkGone, on a KindSandbox from netlink, is the ifindex of the link
	// whose deletion (RTM_DELLINK) the event reports; 0 otherwise. A pass
	// that observed the netns before this event and still lists the link
	// knows its observation is stale.
	LinkGone int
	// TCStale, on a KindSandbox from netlink, names what the message may
	// have changed of the netns's tc filters as a pass last read them:
	// the ifindex of the link a link or tc message is about, TCStaleAll
	// when it may be any link's (a tc action, a shared block, messages
	// lost), 0 when none (an address, a route).
	TCStale int
	Sandbox Sandbox // KindUpsert
	// Listed, on a KindResyncAll from a source that lists everything it
	// knows (containerd, after each (re)connect), holds the IDs that
	// listing found alive. A sandbox registered by that source and missing
	// from Listed ended while the source was unreachable.
	Listed []string
}

// TCStaleAll is Event.TCStale for a change that may concern every link.
const TCStaleAll = -1

// Sink receives events. It must not block: sources call it from their
// reader goroutines.
type Sink func(Event)
