package reconcile

import (
	"path/filepath"
	"strings"

	"github.com/tapsync/tapsync/datapath"
)

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

// entry is one registered sandbox: one VM, whatever it is called.
type entry struct {
	sb     Sandbox
	source Source
	// pass is held by every pass over the sandbox (Reconcile, Teardown)
	// and by a plan (Plan), which reads what passes keep between them. It
	// belongs to the VM, not to its id: when a better source renames the
	// VM, a pass under the old id and one under the new never overlap.
	pass passLock
	// inherit names the sandbox whose record this one takes over at its
	// next pass: the same VM, registered before under a lesser source's id.
	inherit string
	// ident is the identity of sb.Netns as last read: at registration,
	// and again at every pass. Comparing with it instead of reading every
	// sandbox's netns keeps a registration or a netns event O(1) in
	// syscalls, not O(sandboxes) (250 sandboxes starting: 250² reads).
	ident netnsID
	// linksGone are the ifindexes of links deleted in the netns since the
	// running (or next) pass began to observe it (see NoteLinkGone).
	linksGone []int
	// guest is what happened to the guest since the last pass, and what
	// is unverified of it (see beliefs.go).
	guest guestWatch
}

// NetnsHeld says whether the netns kept from sandbox id's last pass is
// the one at path now (one stat, see datapath.Netns.Verify). A kept netns
// was entered when it was opened (its netlink handle lives in it), and
// it pins the namespace: its identity at path says that path is a
// network namespace, which a caller then need not inspect again.
func (r *Reconciler) NetnsHeld(id, path string) bool {
	r.mu.Lock()
	h := r.hosts[id]
	r.mu.Unlock()
	// Path and identity are fixed at Open: Verify is safe on a netns
	// that a concurrent ReleaseNetns has just closed, and then says no
	// more than a stat made a moment before the close.
	return h != nil && h.Path() == path && h.Verify() == nil
}
