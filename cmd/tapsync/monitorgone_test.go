package main

import (
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/tapsync/tapsync/e2e/testnet"
)

// A QEMU that exits while its sandbox is idle is noticed at once: the end
// of its monitor connection is a trigger (source qmp), and the pass it
// starts finds the monitor gone, which status says.
func TestIdleQEMUExitIsNoticed(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tsidle")
	qemu := startOddQEMU(t)
	cfg := quietConfig(t)
	one := 1
	cfg.Sandboxes = []StaticSandbox{{ID: "idle", Netns: ns.Path, QMP: qemu.path, Queues: &one}}
	s := serveDaemon(t, cfg, nil)
	eventually(t, "a first pass that succeeded", func() bool {
		st := s.d.status("idle")
		return !st.LastReconcile.IsZero() && st.LastError == ""
	}, s.log.String)
	before := qmpTriggers(t, s.d)
	// QEMU exits: its socket goes, and the connection with it.
	qemu.ln.Close()
	qemu.mu.Lock()
	qemu.conn.Close()
	qemu.mu.Unlock()
	eventually(t, "status saying the monitor is gone", func() bool {
		return strings.Contains(s.d.status("idle").LastError, qemu.path)
	}, func() string { return s.d.status("idle").LastError + "\n" + s.log.String() })
	if qmpTriggers(t, s.d) == before {
		t.Error("no trigger counted under source qmp")
	}
}

// qmpTriggers reads tapsync_triggers_total{source="qmp"}.
func qmpTriggers(t *testing.T, d *daemon) float64 {
	t.Helper()
	var m dto.Metric
	if err := d.m.triggers.WithLabelValues("qmp").Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
