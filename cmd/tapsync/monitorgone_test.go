package main

import (
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/watcher"
)

// A QEMU that exits while its sandbox is idle is noticed at once: the end
// of its monitor connection is a trigger (source qmp), and the pass it
// starts finds the monitor gone, which status says.
func TestIdleQEMUExitIsNoticed(t *testing.T) {
	_, qemu, s := idleSandbox(t, "idle")
	before := triggersFrom(t, s.d, "qmp")
	// QEMU exits: its socket goes, and the connection with it.
	qemu.ln.Close()
	qemu.mu.Lock()
	qemu.conn.Close()
	qemu.mu.Unlock()
	eventually(t, "status saying the monitor is gone", func() bool {
		return strings.Contains(s.d.status("idle").LastError, qemu.path)
	}, func() string { return s.d.status("idle").LastError + "\n" + s.log.String() })
	if triggersFrom(t, s.d, "qmp") == before {
		t.Error("no trigger counted under source qmp")
	}
}

// A netns dir event for the netns that a sandbox's last pass kept, still
// at that path (the dir's scan at start, after that pass), starts no
// pass; one naming it by another path does.
func TestNetnsEventForHeldNetnsIsNoNews(t *testing.T) {
	ns, _, s := idleSandbox(t, "held")
	eventually(t, "the netns kept by the first pass", func() bool { return s.d.rec.NetnsHeld("held", ns.Path) }, s.log.String)
	src := string(watcher.SourceNetnsDir)
	before := triggersFrom(t, s.d, src)
	s.d.handle(watcher.Event{Kind: watcher.KindNetns, Source: watcher.SourceNetnsDir, Path: ns.Path})
	if got := triggersFrom(t, s.d, src); got != before {
		t.Errorf("%v triggers from %s for the held netns, want none", got-before, src)
	}
	s.d.handle(watcher.Event{Kind: watcher.KindNetns, Source: watcher.SourceNetnsDir, Path: "/run/netns/" + ns.Name})
	if got := triggersFrom(t, s.d, src); got != before+1 {
		t.Errorf("%v triggers from %s for the netns by another path, want 1", got-before, src)
	}
}

// idleSandbox serves a daemon with one static sandbox id (its own netns,
// a QEMU without guest that answers QMP) and waits for a first pass that
// succeeded.
func idleSandbox(t *testing.T, id string) (testnet.NS, *oddQEMU, *served) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "ts"+id)
	qemu := startOddQEMU(t)
	cfg := quietConfig(t)
	one := 1
	cfg.Sandboxes = []StaticSandbox{{ID: id, Netns: ns.Path, QMP: qemu.path, Queues: &one}}
	s := serveDaemon(t, cfg, nil)
	eventually(t, "a first pass that succeeded", func() bool {
		st := s.d.status(id)
		return !st.LastReconcile.IsZero() && st.LastError == ""
	}, s.log.String)
	return ns, qemu, s
}

// triggersFrom reads tapsync_triggers_total{source=src}.
func triggersFrom(t *testing.T, d *daemon, src string) float64 {
	t.Helper()
	var m dto.Metric
	if err := d.m.triggers.WithLabelValues(src).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
