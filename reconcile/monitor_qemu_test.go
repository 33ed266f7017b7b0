package reconcile

import (
	"testing"
	"time"
)

// QEMU ending the monitor connection calls OnMonitorClosed, once, with
// the sandbox; tapsync closing it (a restart here) does not.
func TestMonitorClosedByQEMU(t *testing.T) {
	g := newModelRig(t, 1)
	calls := make(chan string, 4)
	hook := func() { g.r.OnMonitorClosed = func(id string) { calls <- id } }
	g.restart(t)
	hook()
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	g.restart(t) // closes the connection the hook watches
	hook()
	if _, err := g.pass(t); err != nil {
		t.Fatal(err)
	}
	g.vm.do(t, "quit", nil)
	select {
	case id := <-calls:
		if id != g.sb.ID {
			t.Errorf("OnMonitorClosed(%q), want %q", id, g.sb.ID)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("QEMU quit and OnMonitorClosed was not called within 10 s")
	}
	if err := g.r.Reconcile(g.ctx, g.sb.ID); CauseOf(err) != CauseQMP {
		t.Errorf("pass after QEMU quit: %v (cause %q), want a QMP failure", err, CauseOf(err))
	}
	// A call for the connection tapsync closed would have come at its
	// close, before QEMU quit: the one call taken above is the only one.
	if n := len(calls); n != 0 {
		t.Errorf("OnMonitorClosed called %d more times: for a connection tapsync closed", n)
	}
}
