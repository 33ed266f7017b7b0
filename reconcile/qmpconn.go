package reconcile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/tapsync/tapsync/qmp"
)

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
	rt := r.sandboxes[sb.ID]
	if rt == nil {
		return nil, nil, fmt.Errorf("sandbox %s: %w while connecting to %s", sb.ID, ErrUnknownSandbox, sb.QMP)
	}
	if c, m := rt.liveLocked(); c != nil {
		return c, m, nil
	}
	if d := rt.dial; d != nil {
		if !d.done {
			d.waited = true
			return nil, nil, fmt.Errorf("sandbox %s: %w %s: a dial is under way", sb.ID, ErrConnecting, sb.QMP)
		}
		rt.dial = nil
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
	r.dialLocked(ctx, rt, sb, done, true)
	return nil, nil, fmt.Errorf("sandbox %s: %w %s: dial started", sb.ID, ErrConnecting, sb.QMP)
}

// liveLocked returns rt's connection and its model while the connection
// lives; r.mu must be held.
func (rt *sandboxRuntime) liveLocked() (*qmp.Client, *vmModel) {
	c, m := rt.conn, rt.model
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
// connection comes with a new, unknown model. The connection is sandbox
// sb's only while its registration (its runtime) and its socket are the
// ones it was dialled for.
func (r *Reconciler) clientModel(ctx context.Context, sb Sandbox) (*qmp.Client, *vmModel, error) {
	// Two passes (a reconcile and a `tapsync plan`) must not both dial:
	// the second would wait for a greeting that never comes.
	defer r.lockDial(sb.QMP)()
	unknown := func() error {
		return fmt.Errorf("sandbox %s: %w while connecting to %s", sb.ID, ErrUnknownSandbox, sb.QMP)
	}
	r.mu.Lock()
	rt := r.sandboxes[sb.ID]
	var c *qmp.Client
	var m *vmModel
	if rt != nil {
		c, m = rt.liveLocked()
	}
	r.mu.Unlock()
	if rt == nil {
		return nil, nil, unknown()
	}
	if c != nil {
		return c, m, nil
	}
	// Events from the first one on change the model (and their count
	// keeps a full observation that overlapped one from being trusted).
	on, id := r.OnEvent, sb.ID
	m = &vmModel{onReset: rt.noteReset}
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
	if r.closed {
		c.Close() // Close has run: nothing else would
		return nil, nil, fmt.Errorf("sandbox %s: %w", sb.ID, qmp.ErrClosed)
	}
	if r.sandboxes[sb.ID] != rt || rt.sb.QMP != sb.QMP {
		c.Close() // unregistered or re-pointed while we dialled
		return nil, nil, unknown()
	}
	if old := rt.conn; old != nil {
		old.Close()
	}
	rt.conn, rt.model = c, m
	if closed := r.OnMonitorClosed; closed != nil {
		c.AfterClose(func() { r.monitorClosed(sb.ID, c, closed) })
	}
	return c, m, nil
}

// endedByQEMU says whether err, a dead connection's Err, is QEMU's
// doing: it closed or reset the connection, which the reader sees as EOF
// or a reset and a command's write as a broken pipe. A connection tapsync
// closed (dropped, replaced, or failed by a command's timeout) is not.
func endedByQEMU(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// monitorClosed, run once c is dead (qmp.Client.AfterClose), calls
// closed(id) when QEMU ended c (endedByQEMU) while it was still sandbox
// id's connection. A connection tapsync closed calls nothing.
func (r *Reconciler) monitorClosed(id string, c *qmp.Client, closed func(string)) {
	if !endedByQEMU(c.Err()) {
		return
	}
	r.mu.Lock()
	rt := r.sandboxes[id]
	current := rt != nil && rt.conn == c
	r.mu.Unlock()
	if current {
		closed(id)
	}
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

// dialLock is one QMP socket's dial lock with its users.
type dialLock struct {
	sync.Mutex
	users int // holding or waiting; the lock is dropped from the map at zero
}

// lockDial serializes dials of one QMP socket, which serves one client at
// a time (a second dial would wait for a greeting that never comes). The
// lock is keyed by the socket, so a sandbox renamed or registered again
// mid-dial still waits for it, and is dropped when nobody holds or waits
// for it.
func (r *Reconciler) lockDial(sock string) (unlock func()) {
	key := filepath.Clean(sock)
	r.mu.Lock()
	l := r.dialing[key]
	if l == nil {
		l = &dialLock{}
		r.dialing[key] = l
	}
	l.users++
	r.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		r.mu.Lock()
		if l.users--; l.users == 0 {
			delete(r.dialing, key)
		}
		r.mu.Unlock()
	}
}

// Connect starts the dial of sandbox id's monitor in the background, as
// its first pass would, when it has neither a live connection nor a dial
// under way; without OnDialDone it does nothing. The dial's end calls
// OnDialDone only if a pass found it under way.
func (r *Reconciler) Connect(ctx context.Context, id string) {
	done := r.OnDialDone
	if done == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	rt := r.sandboxes[id]
	if rt == nil || r.closed {
		return
	}
	if c, _ := rt.liveLocked(); c != nil {
		return
	}
	if d := rt.dial; d != nil && !d.done {
		return
	}
	r.dialLocked(ctx, rt, rt.sb, done, false)
}

// dialLocked starts a dial of sandbox sb's monitor in the background for
// its runtime rt, bounded by its QMP timeout; r.mu must be held. It
// outlives ctx (closing rt ends it). waited says a pass ends waiting for
// it; a pass that finds it under way later says so too (passClient), and
// then its end calls done.
func (r *Reconciler) dialLocked(ctx context.Context, rt *sandboxRuntime, sb Sandbox, done func(string), waited bool) {
	dctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d := &backgroundDial{sock: sb.QMP, cancel: cancel, waited: waited}
	rt.dial = d
	go func() {
		defer cancel()
		_, _, err := r.clientModel(dctx, sb)
		r.mu.Lock()
		d.done, d.err = true, err
		waited := d.waited
		r.mu.Unlock()
		if waited {
			done(sb.ID)
		}
	}()
}
