package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/reconcile"
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

// A VM first found in /proc and then named by containerd is renamed: one
// sandbox remains, and its first pass takes over the record (no endpoint
// re-made).
func TestProcSandboxRenamedByContainerd(t *testing.T) {
	d := testDaemon(t)
	t.Cleanup(d.rec.Close)
	ctx := context.Background()
	ns := testnet.NewNS(t, "tsrename")
	d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceProc, Sandbox: watcher.Sandbox{ID: "proc-x", Netns: ns.Path, QMP: "/run/q.sock"}})
	rec := state.Record{Sandbox: "proc-x", Netns: ns.Path, Endpoints: []state.Endpoint{{Index: 0, LinkName: "eth0", LinkIfindex: 2, LinkMAC: "02:00:00:00:00:01", Queues: 1}}}
	if err := d.store.Save(rec); err != nil {
		t.Fatal(err)
	}
	// containerd names the netns by its other path: still the same VM.
	other := "/run/netns/" + ns.Name
	d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd, Sandbox: watcher.Sandbox{ID: "pod1", Netns: other, QMP: filepath.Join(t.TempDir(), "none.sock")}})
	if ids := d.rec.Sandboxes(); !slices.Equal(ids, []string{"pod1"}) {
		t.Errorf("sandboxes = %v, want only pod1", ids)
	}
	if err := d.work(ctx, "proc-x"); err != nil {
		t.Errorf("a pass under the old id: %v; want nothing done", err)
	}
	// The pass fails on the missing QMP socket, after taking the record.
	if err := d.work(ctx, "pod1"); err == nil {
		t.Error("pass over pod1 without a QMP socket succeeded")
	}
	got, err := d.store.Load(ctx, "pod1")
	if err != nil || len(got.Endpoints) != 1 || got.Endpoints[0] != rec.Endpoints[0] {
		t.Errorf("pod1 record = %+v, %v; want proc-x's endpoints", got, err)
	}
	if ids, _ := d.store.List(); !slices.Equal(ids, []string{"pod1"}) {
		t.Errorf("records = %v, want only pod1's", ids)
	}
	// A /proc walk that finds the VM again changes nothing.
	d.registerDiscovered(ctx, []watcher.Sandbox{{ID: "proc-x", Netns: ns.Path, QMP: "/run/q.sock"}}, "test")
	if ids := d.rec.Sandboxes(); !slices.Equal(ids, []string{"pod1"}) {
		t.Errorf("sandboxes after a /proc walk = %v, want only pod1", ids)
	}
}

// Config sandboxes keep their settings and are never torn down by the
// events of other sources.
func TestConfigSandboxWins(t *testing.T) {
	d := testDaemon(t)
	ctx := context.Background()
	d.register(ctx, d.sandboxFor("vm1", "/var/run/netns/vm1", "/run/vm1.sock", nil, "", overrides{}), reconcile.SourceConfig, "in config file")
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
// while containerd was away: it is torn down, and nothing the daemon kept
// of it (its pod's rate annotations) stays behind.
func TestUnlistedContainerdSandboxIsGone(t *testing.T) {
	d := testDaemon(t)
	rate := uint64(1000000)
	for _, id := range []string{"pod1", "pod2"} {
		d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd, Sandbox: watcher.Sandbox{ID: id, Netns: "/var/run/netns/" + id, QMP: "/run/" + id, RxRate: &rate}})
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
	if _, kept := d.podRates["pod1"]; kept || len(d.podRates) != 1 {
		t.Errorf("pod rates after pod1's teardown: %v; want pod2's alone", d.podRates)
	}
}

// One VM is one sandbox however its netns is spelled: named through
// /run/netns/x and /var/run/netns/x it is registered once, so one client
// holds its single-client QMP socket and every pass succeeds. Between
// sources the config wins over containerd, whichever comes first, and a
// containerd sandbox replaced by the config hands its record over.
func TestOneSandboxPerNetns(t *testing.T) {
	ns := testnet.NewNS(t, "tsone")
	vm := testvm.StartNoGuest(t, testvm.Options{NetNS: ns.Path})
	runPath, varRunPath := "/run/netns/"+ns.Name, "/var/run/netns/"+ns.Name
	upsert := func(d *daemon, id, netns string) {
		d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd, Sandbox: watcher.Sandbox{ID: id, Netns: netns, QMP: vm.QMP}})
	}
	passAll := func(d *daemon) {
		t.Helper()
		for _, id := range d.rec.Sandboxes() {
			if err := d.work(context.Background(), id); err != nil {
				t.Errorf("pass over %s: %v", id, err)
			}
		}
	}
	quiet := func(t *testing.T) *daemon {
		cfg := quietConfig(t)
		cfg.Defaults.QMPTimeout = 2 * time.Second // a second client would wait this long for its greeting
		d, err := newDaemon(cfg)
		if err != nil {
			t.Fatal(err)
		}
		d.baseCtx = context.Background()
		t.Cleanup(func() { d.links.StopAll(); d.rec.Close() })
		return d
	}

	t.Run("two paths, one source", func(t *testing.T) {
		d := quiet(t)
		upsert(d, "pod1", varRunPath)
		upsert(d, "pod2", runPath)
		if ids := d.rec.Sandboxes(); !slices.Equal(ids, []string{"pod1"}) {
			t.Fatalf("sandboxes = %v, want pod1 only (pod2 is the same netns)", ids)
		}
		if got := d.rec.InNetns(runPath); !slices.Equal(got, []string{"pod1"}) {
			t.Errorf("sandboxes in %s = %v, want pod1", runPath, got)
		}
		passAll(d)
	})
	t.Run("config first", func(t *testing.T) {
		d := quiet(t)
		d.register(context.Background(), d.sandboxFor("vm1", runPath, vm.QMP, nil, "", overrides{}), reconcile.SourceConfig, "in config file")
		upsert(d, "pod1", varRunPath)
		if ids := d.rec.Sandboxes(); !slices.Equal(ids, []string{"vm1"}) {
			t.Fatalf("sandboxes = %v, want vm1 (the config outranks containerd)", ids)
		}
		passAll(d)
		// containerd's events about its own id touch nothing.
		d.handle(watcher.Event{Kind: watcher.KindGone, Source: watcher.SourceContainerd, ID: "pod1"})
		d.handle(watcher.Event{Kind: watcher.KindResyncAll, Source: watcher.SourceContainerd, Listed: []string{}})
		if ids := d.rec.Sandboxes(); !slices.Equal(ids, []string{"vm1"}) || d.gone["vm1"] {
			t.Errorf("sandboxes = %v, gone = %v; want vm1 kept", ids, d.gone)
		}
	})
	t.Run("containerd first", func(t *testing.T) {
		d := quiet(t)
		upsert(d, "pod1", varRunPath)
		rec := state.Record{Sandbox: "pod1", Netns: varRunPath, Endpoints: []state.Endpoint{{Index: 3, LinkName: "gone0", LinkIfindex: 99, LinkMAC: "02:00:00:00:00:09", Queues: 1}}}
		if err := d.store.Save(rec); err != nil {
			t.Fatal(err)
		}
		d.register(context.Background(), d.sandboxFor("vm1", runPath, vm.QMP, nil, "", overrides{}), reconcile.SourceConfig, "in config file")
		if ids := d.rec.Sandboxes(); !slices.Equal(ids, []string{"vm1"}) {
			t.Fatalf("sandboxes = %v, want vm1 (the config outranks containerd)", ids)
		}
		if st := d.status("vm1"); st.Source != reconcile.SourceConfig {
			t.Errorf("vm1 source = %q, want config", st.Source)
		}
		passAll(d)
		if ids, _ := d.store.List(); !slices.Equal(ids, []string{"vm1"}) {
			t.Errorf("records = %v, want vm1's only", ids)
		}
		// The endpoint on record (its link is gone) is vm1's to remove:
		// the pass planned its removal from pod1's record.
		if st := d.status("vm1"); st.LastError != "" && !strings.Contains(st.LastError, "pending") {
			t.Errorf("vm1: %s", st.LastError)
		}
	})
}

// The first /proc walk waits for containerd's first listing, so that a
// running VM containerd knows is registered under its real id and never
// first under a guessed one. A containerd that does not answer delays the
// walk only so long; a VM found first is renamed when containerd names it.
func TestDiscoveryAfterContainerdListing(t *testing.T) {
	start := func(t *testing.T, wait time.Duration) (*served, string, chan []string) {
		cfg := quietConfig(t)
		cfg.Discovery.Proc = true
		cfg.Containerd.Enabled = true
		cfg.Containerd.Address = filepath.Join(t.TempDir(), "no-containerd.sock")
		netns := filepath.Join(cfg.NetnsDir, "cni-1") // a placeholder: known by its place
		if err := os.WriteFile(netns, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		walks := make(chan []string, 16)
		s := serveDaemon(t, cfg, func(d *daemon) {
			if wait > 0 {
				d.firstListingWait = wait
			}
			d.scan = func(context.Context) ([]watcher.Sandbox, error) {
				walks <- d.rec.Sandboxes() // what the walk found registered
				return []watcher.Sandbox{{ID: "proc-cni-1", Netns: netns, QMP: "/run/q.sock", PID: 1}}, nil
			}
		})
		eventually(t, "the daemon running", func() bool { return strings.Contains(s.log.String(), "tapsync running") }, s.log.String)
		return s, netns, walks
	}
	listPod := func(s *served, netns string) {
		s.d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd, Sandbox: watcher.Sandbox{ID: "pod1", Netns: netns, QMP: "/run/vc/vm/pod1/extra-monitor.sock"}})
		s.d.handle(watcher.Event{Kind: watcher.KindResyncAll, Source: watcher.SourceContainerd, Why: "containerd (re)connected", Listed: []string{"pod1"}})
	}
	sandboxes := func(s *served) string { return strings.Join(s.d.rec.Sandboxes(), ",") }

	t.Run("containerd lists first", func(t *testing.T) {
		s, netns, walks := start(t, 0)
		listPod(s, netns)
		select {
		case seen := <-walks:
			if !slices.Equal(seen, []string{"pod1"}) {
				t.Errorf("the first /proc walk ran with sandboxes %v registered; want it after containerd's listing (pod1)", seen)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("no /proc walk after containerd's listing")
		}
		eventually(t, "pod1 alone", func() bool { return sandboxes(s) == "pod1" }, func() string { return sandboxes(s) })
		for _, line := range strings.Split(s.log.String(), "\n") {
			if strings.Contains(line, "now known by this name") ||
				strings.Contains(line, `"sandbox":"proc-cni-1"`) && strings.Contains(line, "sandbox registered") {
				t.Errorf("the VM was registered under its guessed id first: %s", line)
			}
		}
	})
	t.Run("containerd silent", func(t *testing.T) {
		s, netns, walks := start(t, 10*time.Millisecond)
		select {
		case <-walks:
		case <-time.After(20 * time.Second):
			t.Fatal("no /proc walk while containerd does not answer")
		}
		eventually(t, "proc-cni-1", func() bool { return sandboxes(s) == "proc-cni-1" }, func() string { return sandboxes(s) })
		listPod(s, netns)
		eventually(t, "pod1 alone", func() bool { return sandboxes(s) == "pod1" }, func() string { return sandboxes(s) })
		for _, msg := range []string{"containerd has not listed its sandboxes yet", "now known by this name"} {
			if !strings.Contains(s.log.String(), msg) {
				t.Errorf("log lacks %q:\n%s", msg, s.log)
			}
		}
	})
}
