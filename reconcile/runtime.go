package reconcile

import (
	"path/filepath"
	"strings"
	"sync/atomic"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
)

// sandboxRuntime is everything tapsync holds for one registered sandbox:
// its registration, its pass lock, what passes keep open between them,
// what happened since the last pass and the last pass's outcome.
// Register creates it, passes open and use what it keeps, closeLocked
// closes that, and unregisterLocked closes it and forgets the runtime: a
// sandbox registered again gets a new one.
//
// r.mu guards every field but pass (a lock of its own) and reset (noted
// by the QMP reader, which must not wait for r.mu).
type sandboxRuntime struct {
	sb     Sandbox
	source Source
	// ident is the identity of sb.Netns as last read: at registration,
	// and again at every pass. Comparing with it instead of reading every
	// sandbox's netns keeps a registration or a netns event O(1) in
	// syscalls.
	ident netnsID
	// inherit names the sandbox whose record this one takes over at its
	// next pass: the same VM, registered before under a lesser source's id.
	inherit string
	// pass is held by every pass over the sandbox (Reconcile, Teardown)
	// and by a plan (Plan), which reads what passes keep between them. It
	// belongs to the VM, not to its id: when a better source renames the
	// VM, a pass under the old id and one under the new never overlap.
	pass passLock

	// What passes keep open between them; closeLocked closes it.
	conn  *qmp.Client     // the VM's monitor connection
	model *vmModel        // the model of the VM behind conn (model.go)
	dial  *backgroundDial // its dial under way or ended, with OnDialDone set
	host  *datapath.Netns // its netns, kept from one pass to the next (see keepHost)
	// passHost is the netns the pass under way has opened, until it ends
	// (keepHost, closeSession); owned by that pass, read by NetnsHeld.
	passHost *datapath.Netns
	agent    *agent.Client // dialled when a pass needs the guest, kept while it works

	// What happened since the last pass began.
	// linksGone are the ifindexes of links deleted in the netns since the
	// running (or next) pass began to observe it (see NoteNetlink).
	linksGone []int
	// filtersChanged are the links whose tc may have changed since the
	// running (or next) pass began to observe (NoteNetlink), and
	// filtersAll says every link's may have: that pass's netns dumps their
	// ingress filters again (beliefHostFilters).
	filtersChanged []int
	filtersAll     bool
	// guest is what happened to the guest since the last pass, and what
	// is unverified of it (see beliefs.go).
	guest guestWatch
	// reset: the VM reported a RESET since the last pass (noteReset).
	reset atomic.Bool

	// The last pass's outcome.
	status   Status
	guestLog string // the last guest error logged ("" none)
}

// newRuntime returns the runtime of a sandbox registered anew.
func newRuntime() *sandboxRuntime {
	return &sandboxRuntime{pass: make(passLock, 1)}
}

// renamed returns a runtime for rt's VM under another id: the pass lock
// and what was noted for the next pass (links gone, guest events, a RESET)
// carry over, nothing else (rt is unregistered).
func (rt *sandboxRuntime) renamed() *sandboxRuntime {
	n := &sandboxRuntime{pass: rt.pass, linksGone: rt.linksGone, guest: rt.guest}
	// Final: unregistering rt closed its connection, whose reader notes.
	n.reset.Store(rt.reset.Load())
	return n
}

// closeLocked closes what rt keeps open for its passes: its VM's
// connections (closeVMLocked) and the kept netns; r.mu must be held.
func (rt *sandboxRuntime) closeLocked() {
	rt.closeVMLocked()
	if rt.host != nil {
		rt.host.Close()
		rt.host = nil
	}
}

// closeVMLocked closes what rt keeps open of its VM: the dial under way,
// the QMP connection (its model goes with it) and the agent connection;
// r.mu must be held.
func (rt *sandboxRuntime) closeVMLocked() {
	if rt.dial != nil {
		rt.dial.cancel()
		rt.dial = nil
	}
	if rt.conn != nil {
		rt.conn.Close()
		rt.conn = nil
	}
	rt.model = nil
	rt.closeAgentLocked()
}

// unregisterLocked closes what sandbox id keeps open and forgets it;
// r.mu must be held.
func (r *Reconciler) unregisterLocked(id string) {
	if rt := r.sandboxes[id]; rt != nil {
		rt.closeLocked()
		delete(r.sandboxes, id)
		r.netnses.drop(id)
	}
}

// openHost returns sandbox id's netns at path for a pass: the one kept
// from its last pass while the path still names it (one stat; kept),
// else a new one.
func (r *Reconciler) openHost(id, path string) (h *datapath.Netns, kept bool, err error) {
	r.mu.Lock()
	if rt := r.sandboxes[id]; rt != nil {
		h, rt.host = rt.host, nil
	}
	r.mu.Unlock()
	if h != nil {
		if h.Path() == path && h.Verify() == nil {
			return h, true, nil
		}
		h.Close()
	}
	if h, err = datapath.Open(path); err == nil && r.KeepFilters {
		h.KeepFilters()
	}
	return h, false, err
}

// keepHost keeps a pass's netns for the next pass of sandbox id when keep
// is true, saving a netlink socket and a namespace switch per pass; else
// it is closed. A netns is never kept past its sandbox (closeLocked),
// nor after a failure on the host side (its socket may hold the rest of
// an interrupted dump), nor when known by a /proc/<pid>/ns/net path: a
// kept netns stays alive, and the end of a process-held one is seen only
// once nobody holds it.
func (r *Reconciler) keepHost(id string, h *datapath.Netns, keep bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rt := r.sandboxes[id]
	if rt != nil && rt.passHost == h {
		rt.passHost = nil
	}
	if !keep || r.closed || rt == nil || rt.sb.Netns != h.Path() || rt.host != nil || strings.HasPrefix(filepath.Clean(h.Path()), "/proc/") {
		h.Close()
		return
	}
	rt.host = h
}

// ReleaseNetns closes sandbox id's kept netns, if any: call it when its
// path is gone, since a kept netns stays alive, its links with it.
func (r *Reconciler) ReleaseNetns(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rt := r.sandboxes[id]; rt != nil && rt.host != nil {
		rt.host.Close()
		rt.host = nil
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

// NetnsHeld says whether the netns kept from sandbox id's last pass, or
// opened by its pass under way, is the one at path now (one stat, see
// datapath.Netns.Verify). Such a netns was entered when it was opened
// (its netlink handle lives in it) and it pins the namespace: its
// identity at path says that path is a network namespace, which a
// caller then need not inspect again, nor pass over again for it.
func (r *Reconciler) NetnsHeld(id, path string) bool {
	var hs [2]*datapath.Netns
	r.mu.Lock()
	if rt := r.sandboxes[id]; rt != nil {
		hs = [2]*datapath.Netns{rt.host, rt.passHost}
	}
	r.mu.Unlock()
	// Path and identity are fixed at Open: Verify is safe on a netns
	// that a concurrent ReleaseNetns or the end of its pass has just
	// closed, and then says no more than a stat made a moment before the
	// close.
	for _, h := range hs {
		if h != nil && h.Path() == path && h.Verify() == nil {
			return true
		}
	}
	return false
}

// notePassHost records h as the netns the pass under way over sandbox id
// has opened, until keepHost or closeSession ends it.
func (r *Reconciler) notePassHost(id string, h *datapath.Netns) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rt := r.sandboxes[id]; rt != nil {
		rt.passHost = h
	}
}
