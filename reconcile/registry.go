package reconcile

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/state"
)

// Source is where a sandbox's registration came from. Several sources can
// name one VM; the registry keeps the one that ranks highest.
type Source string

const (
	SourceProc       Source = "proc"
	SourceContainerd Source = "containerd"
	SourceConfig     Source = "config"
)

// rank orders the sources: the config file is the operator's word,
// containerd knows the pod's real id, /proc only guesses one.
func (s Source) rank() int {
	switch s {
	case SourceConfig:
		return 3
	case SourceContainerd:
		return 2
	case SourceProc:
		return 1
	}
	return 0
}

// Registration says what Register did.
type Registration struct {
	// ID is the id the VM is registered under: the new sandbox's, or,
	// when Outranked, the sandbox that stays.
	ID     string
	Source Source // the source of ID's registration
	New    bool   // the id was not registered before
	// Replaced is the id of a sandbox of a lesser source in the same
	// netns, unregistered in favour of this one; its record follows.
	Replaced string
	// Outranked: a source that ranks at least as high already holds this
	// id (ranking higher) or this netns; nothing changed.
	Outranked bool
}

// Register adds or updates a sandbox named by source src. Sandboxes are
// keyed by their netns's identity: one VM is registered once, under the
// id of the best source that names it (config > containerd > /proc).
// A source that ranks lower than the one holding the id or the netns
// changes nothing (Outranked); one that ranks higher takes the VM over
// under its own id, and the record follows at the next pass.
func (r *Reconciler) Register(sb Sandbox, src Source) (Registration, error) {
	if err := state.ValidID(sb.ID); err != nil {
		return Registration{}, err
	}
	if sb.Netns == "" || sb.QMP == "" {
		return Registration{}, fmt.Errorf("sandbox %s: netns and QMP socket paths are required", sb.ID)
	}
	if src.rank() == 0 {
		return Registration{}, fmt.Errorf("sandbox %s: unknown source %q", sb.ID, src)
	}
	// Identities are read without r.mu (they are syscalls); registrations
	// are serialized so that what was compared is still what is there.
	r.registering.Lock()
	defer r.registering.Unlock()
	want := identify(sb.Netns)
	r.mu.Lock()
	others := r.netnsesLocked(want, sb.ID)
	r.mu.Unlock()
	var sameNetns []string
	for id, n := range others {
		if n.compared(want).same(want) {
			sameNetns = append(sameNetns, id)
		}
	}
	slices.Sort(sameNetns)

	r.mu.Lock()
	defer r.mu.Unlock()
	self := r.sandboxes[sb.ID]
	if self != nil && self.source.rank() > src.rank() {
		return Registration{ID: sb.ID, Source: self.source, Outranked: true}, nil
	}
	for _, id := range sameNetns {
		if e := r.sandboxes[id]; e != nil && e.source.rank() >= src.rank() {
			return Registration{ID: id, Source: e.source, Outranked: true}, nil
		}
	}
	reg := Registration{ID: sb.ID, Source: src, New: self == nil}
	// prev is the registration of the VM this one continues: its own, or
	// that of the id it takes the VM over from.
	var prev *Sandbox
	if self != nil {
		prev = &Sandbox{QMP: self.sb.QMP, Agent: self.sb.Agent}
	}
	for _, id := range sameNetns {
		e := r.sandboxes[id]
		if e == nil {
			continue // unregistered meanwhile
		}
		r.unregisterLocked(id)
		if reg.Replaced == "" {
			reg.Replaced = id
			if self == nil {
				self = e.renamed() // the same VM
				prev = &Sandbox{QMP: e.sb.QMP, Agent: e.sb.Agent}
			}
			self.inherit = id
		}
	}
	if self == nil {
		self = newRuntime()
	}
	self.sb, self.source, self.ident = sb.withDefaults(), src, want
	r.sandboxes[sb.ID] = self
	r.netnses.set(sb.ID, want)
	// Another monitor is another VM, as far as anyone can tell, and
	// another agent another session: what was believed of them goes
	// (beliefs.go), whether the sandbox kept its id or took the VM over
	// from another.
	if prev != nil && prev.QMP != sb.QMP {
		r.noteLocked(sb.ID, causeMonitorChanged) // the netns stays: it is still the sandbox's
	}
	if prev != nil && prev.Agent != sb.Agent {
		r.noteLocked(sb.ID, causeAgentChanged)
	}
	return reg, nil
}

// Unregister stops managing sandbox id: its connections are closed,
// nothing on the host or in QEMU is touched, and its record stays
// (CollectGarbage deletes it once the netns is gone), so that the sandbox
// is picked up where it was if it is registered again.
func (r *Reconciler) Unregister(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unregisterLocked(id)
}

// Registered returns sandbox id's settings and source.
func (r *Reconciler) Registered(id string) (Sandbox, Source, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.sandboxes[id]
	if e == nil {
		return Sandbox{}, "", false
	}
	return e.sb, e.source, true
}

// InNetns returns the registered sandboxes whose netns is the one at
// path, compared by identity, or whose netns path is path (a netns that
// is gone, or was replaced by another at the same path).
func (r *Reconciler) InNetns(path string) []string {
	want := identify(path)
	r.mu.Lock()
	all := r.netnsesLocked(want, "")
	r.mu.Unlock()
	return inNetns(all, want)
}

// reidentify brings sandbox id's netns identity up to date at a pass
// that opened the namespace ns (its nsfs device and inode): read again
// only when ns differs from the one known.
func (r *Reconciler) reidentify(id, netns string, ns [2]uint64) {
	r.mu.Lock()
	if e := r.sandboxes[id]; e != nil && e.sb.Netns == netns && e.ident.ns == ns {
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	ident := identify(netns)
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.sandboxes[id]; e != nil && e.sb.Netns == netns {
		e.ident = ident
		r.netnses.set(id, ident)
	}
}

// Sandboxes lists the registered sandbox ids.
func (r *Reconciler) Sandboxes() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]string, 0, len(r.sandboxes))
	for id := range r.sandboxes {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Status returns the last outcome of every sandbox.
func (r *Reconciler) Status() []Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Status, 0, len(r.sandboxes))
	for _, rt := range r.sandboxes {
		s := rt.status
		s.Sandbox, s.Source = rt.sb, rt.source
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Sandbox.ID, b.Sandbox.ID) })
	return out
}

// passLock is a sandbox's pass lock: a mutex whose waiters give up when
// their context ends.
type passLock chan struct{}

// lockPass takes sandbox id's pass lock, waiting for the pass or plan
// that holds it, unless ctx ends first. The caller runs release when done.
func (r *Reconciler) lockPass(ctx context.Context, id string) (e *sandboxRuntime, release func(), err error) {
	r.mu.Lock()
	e = r.sandboxes[id]
	r.mu.Unlock()
	if e == nil {
		return nil, nil, fmt.Errorf("sandbox %s: %w", id, ErrUnknownSandbox)
	}
	select {
	case e.pass <- struct{}{}:
	default:
		if r.passWait != nil {
			r.passWait(id)
		}
		select {
		case e.pass <- struct{}{}:
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("sandbox %s: waiting for the pass under way: %w", id, context.Cause(ctx))
		}
	}
	release = func() { <-e.pass }
	r.mu.Lock()
	cur := r.sandboxes[id]
	r.mu.Unlock()
	if cur != e {
		release()
		return nil, nil, fmt.Errorf("sandbox %s: %w (unregistered while waiting for its pass)", id, ErrUnknownSandbox)
	}
	return e, release, nil
}

// beginPass takes sandbox id's pass lock, and hands it the record of the
// sandbox it replaced if it has not taken it yet. The caller runs release
// when the pass ends.
func (r *Reconciler) beginPass(ctx context.Context, id string) (release func(), err error) {
	e, release, err := r.lockPass(ctx, id)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	from := e.inherit
	r.mu.Unlock()
	if from != "" {
		if err := r.inheritRecord(ctx, id, from); err != nil {
			release()
			return nil, err
		}
		r.mu.Lock()
		if e.inherit == from {
			e.inherit = ""
		}
		r.mu.Unlock()
	}
	return release, nil
}

// inheritRecord moves the record of sandbox from to id: the endpoint
// indexes (pending and burned ones too) of one VM known by a new name.
// Nothing on the host or in QEMU changes. A record id already has with
// endpoints wins.
func (r *Reconciler) inheritRecord(ctx context.Context, id, from string) error {
	old, err := r.store.Load(ctx, from)
	if err != nil {
		return err
	}
	cur, err := r.store.Load(ctx, id)
	if err != nil {
		return err
	}
	if len(cur.Endpoints) == 0 && len(old.Endpoints) > 0 {
		old.Sandbox = id
		if err := r.store.Save(old); err != nil {
			return err
		}
		zerolog.Ctx(ctx).Info().Str("sandbox", id).Str("replaced", from).Int("endpoints", len(old.Endpoints)).
			Msg("record taken over from the sandbox's former name")
	}
	return r.store.Delete(from)
}

// loadRecord is id's record, or, while it has not taken over the record
// of the sandbox it replaced, that one (for a plan, which changes nothing).
func (r *Reconciler) loadRecord(ctx context.Context, id string) (state.Record, error) {
	rec, err := r.store.Load(ctx, id)
	if err != nil || len(rec.Endpoints) > 0 {
		return rec, err
	}
	r.mu.Lock()
	from := ""
	if e := r.sandboxes[id]; e != nil {
		from = e.inherit
	}
	r.mu.Unlock()
	if from == "" {
		return rec, nil
	}
	old, err := r.store.Load(ctx, from)
	if err != nil {
		return rec, err
	}
	old.Sandbox = id
	return old, nil
}
