package reconcile

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
)

// A sandbox's runtime lives from its registration to its unregistration:
// a VM renamed by a better source, or a sandbox registered again, starts
// from a new runtime with no outcome, and what reaches the old one (a
// RESET from its connection's reader) does not reach the new.
func TestRuntimeLifecycle(t *testing.T) {
	r := newTestReconciler(t)
	netns := filepath.Join(t.TempDir(), "ns")
	runtimeOf := func(id string) (rt *sandboxRuntime) {
		withRuntime(r, id, func(cur *sandboxRuntime) { rt = cur })
		return rt
	}
	if _, err := r.Register(Sandbox{ID: "proc-ns", Netns: netns, QMP: "/q.sock"}, SourceProc); err != nil {
		t.Fatal(err)
	}
	first := runtimeOf("proc-ns")
	withRuntime(r, "proc-ns", func(rt *sandboxRuntime) { rt.status.LastError = "boom" })
	first.noteReset() // not yet taken by a pass when the VM is renamed
	if st, _ := r.StatusOf("proc-ns"); st.LastError != "boom" {
		t.Fatalf("status = %+v; want the pass's outcome", st)
	}

	if reg, err := r.Register(Sandbox{ID: "pod", Netns: netns, QMP: "/q.sock"}, SourceContainerd); err != nil || reg.Replaced != "proc-ns" {
		t.Fatalf("registration = %+v, %v; want proc-ns replaced", reg, err)
	}
	renamed := runtimeOf("pod")
	if runtimeOf("proc-ns") != nil || renamed == nil || renamed == first {
		t.Fatalf("after the rename: proc-ns %p, pod %p (proc-ns's was %p); want pod alone, on a runtime of its own",
			runtimeOf("proc-ns"), renamed, first)
	}
	if st, _ := r.StatusOf("pod"); st.LastError != "" {
		t.Errorf("pod's status = %+v; want none (proc-ns's outcome stays with it)", st)
	}
	if evs := r.takeGuestEvents("pod"); len(evs) != 1 || evs[0] != causeReset {
		t.Errorf("guest events of the renamed VM %v; want the RESET noted under its old id", evs)
	}

	r.Unregister("pod")
	if _, err := r.Register(Sandbox{ID: "pod", Netns: netns, QMP: "/q.sock"}, SourceContainerd); err != nil {
		t.Fatal(err)
	}
	again := runtimeOf("pod")
	if again == renamed {
		t.Fatal("registered again onto the runtime that was unregistered")
	}
	renamed.noteReset() // the old connection's reader, late
	if evs := r.takeGuestEvents("pod"); len(evs) != 0 {
		t.Errorf("guest events %v after a RESET noted by the unregistered runtime; want none", evs)
	}
	again.noteReset()
	if evs := r.takeGuestEvents("pod"); len(evs) != 1 || evs[0] != causeReset {
		t.Errorf("guest events %v; want the RESET", evs)
	}
}

// The QMP reader notes a RESET while r.mu is held elsewhere (Close holds
// it while it waits for the reader to end).
func TestNoteResetDoesNotWaitForTheRegistry(t *testing.T) {
	r := newTestReconciler(t)
	if _, err := r.Register(Sandbox{ID: "vm", Netns: filepath.Join(t.TempDir(), "ns"), QMP: "/q.sock"}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	var rt *sandboxRuntime
	withRuntime(r, "vm", func(cur *sandboxRuntime) { rt = cur })
	noted := make(chan struct{})
	r.mu.Lock()
	go func() {
		rt.noteReset()
		close(noted)
	}()
	select {
	case <-noted:
	case <-time.After(10 * time.Second):
		t.Error("noteReset waited for r.mu")
	}
	r.mu.Unlock()
	<-noted
}

// A sandbox registered again with another monitor forgets what it
// believed of the guest even when the registration also takes over
// another id's VM.
func TestReregisteredElsewhereWithAnotherMonitor(t *testing.T) {
	r := newTestReconciler(t)
	dir := t.TempDir()
	nsA, nsB := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	if _, err := r.Register(Sandbox{ID: "pod", Netns: nsA, QMP: "/q1.sock"}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Register(Sandbox{ID: "proc", Netns: nsB, QMP: "/q2.sock"}, SourceProc); err != nil {
		t.Fatal(err)
	}
	r.takeGuestEvents("pod")
	reg, err := r.Register(Sandbox{ID: "pod", Netns: nsB, QMP: "/q2.sock"}, SourceConfig)
	if err != nil || reg.Replaced != "proc" {
		t.Fatalf("registration = %+v, %v; want proc replaced", reg, err)
	}
	if evs := r.takeGuestEvents("pod"); !slices.Contains(evs, causeMonitorChanged) {
		t.Errorf("guest events %v; want %q (another monitor is another VM)", evs, causeMonitorChanged)
	}
}

// Registered again with another monitor, a sandbox drops its VM's
// connections and keeps its netns: the netns is still the sandbox's, and
// the next pass uses it.
func TestAnotherMonitorKeepsTheNetns(t *testing.T) {
	ns := testnet.NewNS(t, "tsmon")
	r := newTestReconciler(t)
	sb := Sandbox{ID: "pod", Netns: ns.Path, QMP: "/q1.sock"}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	host, err := datapath.Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	r.keepHost("pod", host, true)
	sb.QMP = "/q2.sock"
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	withRuntime(r, "pod", func(rt *sandboxRuntime) {
		if rt.host != host {
			t.Errorf("kept netns after another monitor: %v; want the one kept before", rt.host)
		}
	})
	if got, kept, err := r.openHost("pod", ns.Path); err != nil || !kept || got != host {
		t.Errorf("openHost = %v, kept %v, %v; want the kept netns", got, kept, err)
	} else {
		r.keepHost("pod", got, true)
	}
}

// A teardown that cannot take the sandbox's pass (its context ends while
// another pass holds it) fails: it is not done, and the caller must not
// forget the sandbox as if it were.
func TestTeardownThatCannotBeginFails(t *testing.T) {
	r := newTestReconciler(t)
	if _, err := r.Register(Sandbox{ID: "pod", Netns: filepath.Join(t.TempDir(), "ns"), QMP: "/q.sock"}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	_, release, err := r.lockPass(context.Background(), "pod")
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.Teardown(ctx, "pod"); err == nil {
		t.Error("a teardown that never began returned nil: its caller takes it as done")
	}
	if _, _, ok := r.Registered("pod"); !ok {
		t.Error("the sandbox was unregistered by a teardown that never began")
	}
}

// A better source that takes a VM over under its own id, with another
// monitor or agent than the one the VM was known by, outdates what was
// believed of them, as a sandbox registered again under its own id does;
// with the same ones, nothing.
func TestTakeoverWithAnotherAgent(t *testing.T) {
	for _, tc := range []struct {
		name       string
		qmp, agent string
		want       []cause
	}{
		{"same monitor and agent", "/q.sock", "/a.sock", nil},
		{"another agent", "/q.sock", "/a2.sock", []cause{causeAgentChanged}},
		{"another monitor", "/q2.sock", "/a.sock", []cause{causeMonitorChanged}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newTestReconciler(t)
			netns := filepath.Join(t.TempDir(), "ns")
			sb := Sandbox{ID: "proc-x", Netns: netns, QMP: "/q.sock", Agent: agent.URL{Scheme: "unix", Path: "/a.sock"}}
			if _, err := r.Register(sb, SourceProc); err != nil {
				t.Fatal(err)
			}
			sb.ID, sb.QMP, sb.Agent.Path = "pod", tc.qmp, tc.agent
			if reg, err := r.Register(sb, SourceContainerd); err != nil || reg.Replaced != "proc-x" {
				t.Fatalf("registration = %+v, %v; want proc-x taken over", reg, err)
			}
			if got := r.takeGuestEvents("pod"); !slices.Equal(got, tc.want) {
				t.Errorf("what the takeover noted: %v; want %v", got, tc.want)
			}
		})
	}
}
