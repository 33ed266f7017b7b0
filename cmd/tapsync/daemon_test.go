package main

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/tapsync/tapsync/state"
	"github.com/tapsync/tapsync/watcher"
)

func testDaemon(t *testing.T) *daemon {
	t.Helper()
	cfg := DefaultConfig()
	cfg.StateDir = filepath.Join(t.TempDir(), "state")
	d, err := newDaemon(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.baseCtx = context.Background()
	return d
}

// A VM first found in /proc and then named by containerd is handed over:
// one sandbox remains, and it inherits the record (no endpoint re-made).
func TestProcSandboxHandedOverToContainerd(t *testing.T) {
	d := testDaemon(t)
	ctx := context.Background()
	netns := "/var/run/netns/cni-1"
	d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceProc, Sandbox: watcher.Sandbox{ID: "proc-cni-1", Netns: netns, QMP: "/run/q.sock"}})
	rec := state.Record{Sandbox: "proc-cni-1", Netns: netns, Endpoints: []state.Endpoint{{Index: 0, LinkName: "eth0", LinkIfindex: 2, LinkMAC: "02:00:00:00:00:01", Queues: 1}}}
	if err := d.store.Save(rec); err != nil {
		t.Fatal(err)
	}
	d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd, Sandbox: watcher.Sandbox{ID: "pod1", Netns: netns, QMP: "/run/vc/vm/pod1/extra-monitor.sock"}})
	if err := d.work(ctx, "proc-cni-1"); err != nil {
		t.Fatal(err)
	}
	if ids := d.rec.Sandboxes(); len(ids) != 1 || ids[0] != "pod1" {
		t.Errorf("sandboxes = %v, want only pod1", ids)
	}
	got, err := d.store.Load(ctx, "pod1")
	if err != nil || len(got.Endpoints) != 1 || got.Endpoints[0] != rec.Endpoints[0] {
		t.Errorf("pod1 record = %+v, %v; want proc-cni-1's endpoints", got, err)
	}
	if ids, _ := d.store.List(); len(ids) != 1 {
		t.Errorf("records = %v, want only pod1's", ids)
	}
}

// Config sandboxes keep their settings and are never torn down by the
// events of other sources.
func TestConfigSandboxWins(t *testing.T) {
	d := testDaemon(t)
	ctx := context.Background()
	d.register(ctx, d.sandboxFor("vm1", "/var/run/netns/vm1", "/run/vm1.sock", nil, ""), originConfig, "in config file")
	d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd, Sandbox: watcher.Sandbox{ID: "vm1", Netns: "/var/run/netns/other", QMP: "/run/other.sock"}})
	d.handle(watcher.Event{Kind: watcher.KindGone, Source: watcher.SourceContainerd, ID: "vm1"})
	d.handle(watcher.Event{Kind: watcher.KindResyncAll, Source: watcher.SourceContainerd, Listed: []string{}})
	st := d.status("vm1")
	if st.Sandbox.Netns != "/var/run/netns/vm1" || st.Sandbox.QMP != "/run/vm1.sock" {
		t.Errorf("vm1 = %+v, want the config's netns and socket", st.Sandbox)
	}
	if d.gone["vm1"] {
		t.Error("a config sandbox was marked gone by containerd")
	}
}

// A containerd sandbox missing from containerd's next full listing ended
// while containerd was away: it is torn down.
func TestUnlistedContainerdSandboxIsGone(t *testing.T) {
	d := testDaemon(t)
	for _, id := range []string{"pod1", "pod2"} {
		d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd, Sandbox: watcher.Sandbox{ID: id, Netns: "/var/run/netns/" + id, QMP: "/run/" + id}})
	}
	d.handle(watcher.Event{Kind: watcher.KindResyncAll, Source: watcher.SourceContainerd, Listed: []string{"pod2"}})
	if !d.gone["pod1"] || d.gone["pod2"] {
		t.Errorf("gone = %v, want pod1 only", d.gone)
	}
	if err := d.work(context.Background(), "pod1"); err != nil {
		t.Fatal(err)
	}
	if ids := d.rec.Sandboxes(); len(ids) != 1 || ids[0] != "pod2" {
		t.Errorf("sandboxes = %v, want pod2", ids)
	}
}
