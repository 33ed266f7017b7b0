package watcher

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/tapsync/tapsync/e2e/testctr"
	"github.com/tapsync/tapsync/e2e/testnet"
)

const ctrTestNS = "tapsync-test"

// TestContainerdSandboxOf covers which container records are sandboxes.
func TestContainerdSandboxOf(t *testing.T) {
	// The runtimes' debug monitors exist (as files), the wrapper's does
	// not: the debug monitors are taken, with a note.
	dir := t.TempDir()
	for _, f := range []string{dir + "/vc/c1/qmp.sock", dir + "/task/k8s.io/c1/debug-monitor.sock"} {
		if err := os.MkdirAll(filepath.Dir(f), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	w := &ctrWatcher{cfg: ContainerdConfig{Kata: KataLayout{Wrapper: dir + "/w/{id}.sock", GoMonitor: dir + "/vc/{id}/qmp.sock", RsDir: dir + "/kata/{id}",
		BundleDirs: []string{dir + "/task/{namespace}/{id}"}}}.withDefaults()}
	netns := func(path string) specs.LinuxNamespace {
		return specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: path}
	}
	tests := []struct {
		name    string
		runtime string
		spec    *specs.Spec // nil: no spec in the record
		want    Sandbox     // zero: not a sandbox
		loud    bool
	}{
		{name: "kata sandbox", runtime: "io.containerd.kata.v2",
			spec: &specs.Spec{Annotations: map[string]string{criContainerType: "sandbox"},
				Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, netns("/var/run/netns/cni-1")}}},
			want: Sandbox{ID: "c1", Netns: "/var/run/netns/cni-1", QMP: dir + "/vc/c1/qmp.sock", Protocol: ProtoQMP,
				Runtime: "io.containerd.kata.v2", Flavour: FlavourGo}},
		{name: "no CRI annotation", runtime: "io.containerd.kata.v2",
			spec: &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{netns("/var/run/netns/x")}}},
			want: Sandbox{ID: "c1", Netns: "/var/run/netns/x", QMP: dir + "/vc/c1/qmp.sock", Protocol: ProtoQMP,
				Runtime: "io.containerd.kata.v2", Flavour: FlavourGo}},
		{name: "kata-deploy Go handler", runtime: "io.containerd.kata-qemu.v2",
			spec: &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{netns("/var/run/netns/x")}}},
			want: Sandbox{ID: "c1", Netns: "/var/run/netns/x", QMP: dir + "/vc/c1/qmp.sock", Protocol: ProtoQMP,
				Runtime: "io.containerd.kata-qemu.v2", Flavour: FlavourGo}},
		{name: "kata-deploy runtime-rs handler", runtime: "io.containerd.kata-qemu-runtime-rs.v2",
			spec: &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{netns("/var/run/netns/x")}}},
			want: Sandbox{ID: "c1", Netns: "/var/run/netns/x", QMP: dir + "/task/k8s.io/c1/debug-monitor.sock",
				Protocol: ProtoHMP, Runtime: "io.containerd.kata-qemu-runtime-rs.v2", Flavour: FlavourRs,
				Bundle: dir + "/task/k8s.io/c1"}},
		{name: "confidential handler", runtime: "io.containerd.kata-qemu-snp.v2",
			spec: &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{netns("/var/run/netns/x")}}},
			want: Sandbox{ID: "c1", Netns: "/var/run/netns/x", QMP: dir + "/vc/c1/qmp.sock", Protocol: ProtoQMP,
				Runtime: "io.containerd.kata-qemu-snp.v2", Flavour: FlavourGo, Skip: "confidential"}},
		{name: "CRI app container", runtime: "io.containerd.kata.v2",
			spec: &specs.Spec{Annotations: map[string]string{criContainerType: "container"},
				Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{netns("/var/run/netns/cni-1")}}}},
		{name: "other runtime", runtime: "io.containerd.runc.v2",
			spec: &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{netns("/var/run/netns/cni-1")}}}},
		{name: "private netns", runtime: "io.containerd.kata.v2", loud: true,
			spec: &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{netns("")}}}},
		{name: "host network", runtime: "io.containerd.kata.v2", loud: true,
			spec: &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}}}}},
		{name: "no linux section", runtime: "io.containerd.kata.v2", loud: true, spec: &specs.Spec{}},
		{name: "no spec", runtime: "io.containerd.kata.v2", loud: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := containers.Container{ID: "c1", Runtime: containers.RuntimeInfo{Name: tt.runtime}}
			if tt.spec != nil {
				any, err := typeurl.MarshalAny(tt.spec)
				if err != nil {
					t.Fatal(err)
				}
				rec.Spec = any
			}
			got, skip := w.sandboxOf("k8s.io", rec)
			if tt.want.Skip != "" && strings.Contains(got.Skip, tt.want.Skip) {
				got.Skip = tt.want.Skip
			}
			if tt.want.ID != "" && !strings.Contains(got.MonitorNote, "no tapsync-qemu monitor at "+dir+"/w/c1.sock") {
				t.Errorf("monitor note = %q, want one naming the wrapper's missing socket", got.MonitorNote)
			}
			got.MonitorNote = ""
			if got != tt.want {
				t.Errorf("sandbox = %+v, want %+v", got, tt.want)
			}
			if (skip.why == "") != (tt.want != Sandbox{}) || skip.loud != tt.loud {
				t.Errorf("skip = %+v, want a reason iff not a sandbox, loud %v", skip, tt.loud)
			}
		})
	}
}

func TestContainerdConfig(t *testing.T) {
	got := ContainerdConfig{}.withDefaults()
	want := ContainerdConfig{Address: "/run/containerd/containerd.sock", Namespaces: []string{"k8s.io"},
		Runtimes: DefaultRuntimes, SkipRuntimes: DefaultSkipRuntimes,
		Kata:     KataLayout{Wrapper: DefaultWrapper, GoMonitor: DefaultGoMonitor, RsDir: DefaultRsDir, RsMonitor: DefaultRsMonitor, BundleDirs: DefaultBundleDirs},
		NetnsDir: "/var/run/netns", StorePoll: defaultStorePoll}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("defaults = %+v, want %+v", got, want)
	}
	err := WatchContainerd(context.Background(), ContainerdConfig{Kata: KataLayout{GoMonitor: "/run/qmp.sock"}}, func(Event) {})
	if err == nil || !strings.Contains(err.Error(), "{id}") {
		t.Errorf("QMP template without {id}: err = %v, want an error naming {id}", err)
	}
	err = WatchContainerd(context.Background(), ContainerdConfig{Runtimes: []string{"io.containerd.kata-[.v2"}}, func(Event) {})
	if err == nil || !strings.Contains(err.Error(), "kata-[") {
		t.Errorf("malformed runtime pattern: err = %v, want an error naming it", err)
	}
}

// TestContainerdUnavailable: no containerd is not an error; the source
// keeps trying, emits nothing and returns nil when ctx ends.
func TestContainerdUnavailable(t *testing.T) {
	ctx, logs := testCtx(t)
	ctx, cancel := context.WithCancel(ctx)
	r := &recorder{}
	addr := t.TempDir() + "/missing.sock"
	done := make(chan error, 1)
	go func() { done <- WatchContainerd(ctx, ContainerdConfig{Address: addr}, r.sink) }()
	logs.waitLine(t, "retry", "containerd unavailable", addr)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("WatchContainerd = %v, want nil when ctx ends", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WatchContainerd did not return 10s after ctx ended")
	}
	if n := r.len(); n != 0 {
		t.Errorf("%d events without containerd:\n%s", n, formatEvents(r.all(), 0))
	}
}

// TestContainerdEvents runs the source against a real containerd (1.6
// from Debian, runc) and real containers in throwaway netns.
func TestContainerdEvents(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ctd := testctr.Start(t)
	run := func(id, netns, runtime string, ann map[string]string) *testctr.Container {
		return testctr.RunSandbox(t, ctd, ctrTestNS, id, netns, runtime, ann)
	}
	sandboxAnn := map[string]string{criContainerType: "sandbox"}

	// A sandbox that runs before the source connects: found by listing.
	nsA := testnet.NewNS(t, "ctrw")
	run("sb-a", nsA.Path, testctr.RuntimeRunc, sandboxAnn)

	ctx, logs := testCtx(t)
	ctx, cancel := context.WithCancel(ctx)
	r := &recorder{}
	done := make(chan error, 1)
	began := time.Now()
	go func() {
		done <- WatchContainerd(ctx, ContainerdConfig{
			Address:    ctd.Address(),
			Namespaces: []string{ctrTestNS},
			Runtimes:   []string{testctr.RuntimeRunc},
			Kata:       KataLayout{Wrapper: "/tmp/x/w/{id}.sock", GoMonitor: "/tmp/x/{id}.sock"},
		}, r.sink)
	}()
	t.Cleanup(func() { // before the fixture's cleanup: the source logs to t
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("WatchContainerd = %v, want nil", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("WatchContainerd did not return 10s after ctx ended")
		}
	})

	sandbox := func(id string, ns testnet.NS) Sandbox {
		// Neither monitor exists: the wrapper's is waited for.
		return Sandbox{ID: id, Netns: ns.Path, QMP: "/tmp/x/w/" + id + ".sock", Protocol: ProtoQMP, Wrapped: true, Runtime: testctr.RuntimeRunc, Flavour: FlavourGo}
	}
	upsert := func(sb Sandbox) func(Event) bool {
		return func(e Event) bool {
			got := e.Sandbox
			got.MonitorNote = ""
			return e.Kind == KindUpsert && e.Source == SourceContainerd && got == sb
		}
	}
	upsertOf := func(id string) func(Event) bool {
		return func(e Event) bool { return e.Kind == KindUpsert && e.Sandbox.ID == id }
	}
	goneOf := func(id string) func(Event) bool {
		return func(e Event) bool { return e.Kind == KindGone && e.Source == SourceContainerd && e.ID == id }
	}
	resync := func(e Event) bool { return e.Kind == KindResyncAll && e.Source == SourceContainerd }

	// Connect: Upsert of the running sandbox, then ResyncAll.
	_, iA := r.wait(t, 0, "Upsert sb-a from the listing", upsert(sandbox("sb-a", nsA)))
	_, iR := r.wait(t, 0, "ResyncAll after connecting", resync)
	if iR < iA {
		t.Errorf("ResyncAll (#%d) before the listing's Upsert (#%d)", iR, iA)
	}
	t.Logf("connected and listed in %v", time.Since(began).Round(time.Millisecond))

	// A new sandbox: Upsert from /tasks/start.
	nsB := testnet.NewNS(t, "ctrw")
	from := r.len()
	b := run("sb-b", nsB.Path, testctr.RuntimeRunc, sandboxAnn)
	started := time.Now()
	r.wait(t, from, "Upsert sb-b on task start", upsert(sandbox("sb-b", nsB)))
	t.Logf("event latency, task started → Upsert: %v", time.Since(started).Round(time.Millisecond))

	// Not sandboxes: another runtime, a CRI app container, a private
	// netns, another containerd namespace; an exec in a sandbox ends
	// nothing. sb-f then proves the source got past all of them (events
	// are handled in order).
	nsC := testnet.NewNS(t, "ctrw")
	from = r.len()
	c := run("other-runtime", nsC.Path, testctr.RuntimeOther, sandboxAnn)
	run("app", nsB.Path, testctr.RuntimeRunc, map[string]string{criContainerType: "container"})
	run("private", "", testctr.RuntimeRunc, nil)
	// Sandboxes whose netns is not one we may wire: bound outside
	// netns_dir, or the host's.
	outsideDir := t.TempDir()
	bindNetns(t, nsC.Path, filepath.Join(outsideDir, "pod"))
	run("outside", filepath.Join(outsideDir, "pod"), testctr.RuntimeRunc, sandboxAnn)
	run("hostns", "/proc/self/ns/net", testctr.RuntimeRunc, sandboxAnn)
	testctr.RunSandbox(t, ctd, "other-ns", "elsewhere", nsC.Path, testctr.RuntimeRunc, sandboxAnn)
	if out, err := b.Exec("true"); err != nil {
		t.Fatalf("exec in sb-b: %v: %s", err, out)
	}
	run("sb-f", nsC.Path, testctr.RuntimeRunc, nil)
	r.wait(t, from, "Upsert sb-f", upsert(sandbox("sb-f", nsC)))
	r.none(t, from, "event for a container that is not a sandbox", func(e Event) bool {
		return e.Kind != KindUpsert || e.Sandbox.ID != "sb-f"
	})
	logs.waitLine(t, "private netns skipped loudly", "private network namespace", `"level":"warn"`)
	logs.waitLine(t, "netns outside netns_dir refused", `"sandbox":"outside"`, "outside netns_dir", `"level":"warn"`)
	logs.waitLine(t, "host netns refused", `"sandbox":"hostns"`, "not /proc/<pid>/ns/net of the task", `"level":"warn"`)

	// Deleting a sandbox: Gone (from exit, task delete and container
	// delete); deleting a container of another runtime: nothing.
	from = r.len()
	if err := c.Delete(); err != nil {
		t.Fatal(err)
	}
	deleting := time.Now()
	if err := b.Delete(); err != nil {
		t.Fatal(err)
	}
	_, iGone := r.wait(t, from, "Gone sb-b", goneOf("sb-b"))
	t.Logf("delete requested (SIGKILL, wait, delete) → Gone: %v", time.Since(deleting).Round(time.Millisecond))
	r.none(t, from, "event for the other runtime's container", func(e Event) bool {
		return e.ID == "other-runtime" || e.Sandbox.ID == "other-runtime"
	})
	r.none(t, iGone, "Upsert of sb-b after its Gone", upsertOf("sb-b"))

	// containerd crashes and comes back: the running sandboxes are listed
	// again (their shims survived), then ResyncAll; sb-b stays gone.
	from = r.len()
	restarted := time.Now()
	ctd.Restart()
	r.wait(t, from, "Upsert sb-a after containerd restart", upsert(sandbox("sb-a", nsA)))
	r.wait(t, from, "Upsert sb-f after containerd restart", upsert(sandbox("sb-f", nsC)))
	r.wait(t, from, "ResyncAll after containerd restart", resync)
	t.Logf("containerd killed → reconnected and listed: %v", time.Since(restarted).Round(time.Millisecond))
	r.none(t, from, "Upsert of deleted sb-b after restart", upsertOf("sb-b"))
	for _, id := range []string{"outside", "hostns"} {
		if n := strings.Count(logs.String(), `"sandbox":"`+id+`"`); n != 1 {
			t.Errorf("refused sandbox %s logged %d times across a reconnect, want once", id, n)
		}
	}

	// containerd away for a while (socket gone): the source keeps
	// retrying, then catches up.
	lost := strings.Count(logs.String(), "containerd unavailable")
	ctd.Stop()
	deadline := time.Now().Add(20 * time.Second)
	for strings.Count(logs.String(), "containerd unavailable") == lost {
		if time.Now().After(deadline) {
			t.Fatalf("source did not notice containerd stopping; log:\n%s", logs.String())
		}
		time.Sleep(2 * time.Millisecond)
	}
	from = r.len()
	ctd.Restart()
	r.wait(t, from, "ResyncAll after containerd came back", resync)
	r.wait(t, from, "Upsert sb-a after containerd came back", upsert(sandbox("sb-a", nsA)))

	// Still following events after all that.
	nsG := testnet.NewNS(t, "ctrw")
	from = r.len()
	run("sb-g", nsG.Path, testctr.RuntimeRunc, sandboxAnn)
	r.wait(t, from, "Upsert sb-g after reconnects", upsert(sandbox("sb-g", nsG)))
}

// TestContainerdAdmit: a sandbox's netns from its OCI spec is vetted; a
// refused one is logged once per reason and not reported, and one
// reported before and refused now is reported gone.
func TestContainerdAdmit(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ctx, logs := testCtx(t)
	log := zerolog.Ctx(ctx)
	ns := testnet.NewNS(t, "ctra")
	dir, outside := t.TempDir(), t.TempDir()
	bindNetns(t, ns.Path, filepath.Join(dir, "good"))
	bindNetns(t, ns.Path, filepath.Join(outside, "pod"))
	bindNetns(t, "/proc/self/ns/net", filepath.Join(dir, "host"))
	if err := os.Symlink(filepath.Join(outside, "pod"), filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r := &recorder{}
	w := newCtrWatcher(ContainerdConfig{NetnsDir: dir}.withDefaults(), r.sink, log)

	for _, tc := range []struct{ id, netns, why string }{
		{"outside", filepath.Join(outside, "pod"), "outside netns_dir"},
		{"link", filepath.Join(dir, "link"), "a symlink"},
		{"file", filepath.Join(dir, "file"), "a placeholder"},
		{"host", filepath.Join(dir, "host"), "host network namespace"},
		{"proc", "/proc/self/ns/net", "not /proc/<pid>/ns/net of the task"},
	} {
		for range 3 { // listed again and again: logged once
			if sb, ok := w.admit("k8s.io", Sandbox{ID: tc.id, Netns: tc.netns}, 42); ok {
				t.Errorf("%s: admitted %+v, want refused", tc.id, sb)
			}
		}
		line := logs.waitLine(t, tc.id+" refused", `"sandbox":"`+tc.id+`"`, tc.why)
		if !strings.Contains(line, `"level":"warn"`) {
			t.Errorf("%s: refusal logged as %s, want warn", tc.id, line)
		}
		if n := strings.Count(logs.String(), `"sandbox":"`+tc.id+`"`); n != 1 {
			t.Errorf("%s: refusal logged %d times, want once", tc.id, n)
		}
	}
	if n := r.len(); n != 0 {
		t.Errorf("refused sandboxes made events:\n%s", formatEvents(r.all(), 0))
	}

	// Accepted, under the path in netns_dir whatever the spelling.
	sb, ok := w.admit("k8s.io", Sandbox{ID: "sb", Netns: dir + "/./good"}, 42)
	if want := (Sandbox{ID: "sb", Netns: filepath.Join(dir, "good")}); !ok || sb != want {
		t.Errorf("admit good = %+v, %v; want %+v", sb, ok, want)
	}
	// The same sandbox now refused (its netns replaced by the host's):
	// it is gone, and its end is not reported again.
	if err := unix.Unmount(filepath.Join(dir, "good"), unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	mountNetns(t, "/proc/self/ns/net", filepath.Join(dir, "good"))
	if _, ok := w.admit("k8s.io", Sandbox{ID: "sb", Netns: filepath.Join(dir, "good")}, 42); ok {
		t.Error("admit of the host netns under the good name: admitted")
	}
	r.wait(t, 0, "Gone sb", func(e Event) bool { return e.Kind == KindGone && e.ID == "sb" })
	if err := w.gone(ctx, nil, "k8s.io", "sb", "task exited", false); err != nil {
		t.Fatal(err)
	}
	if n := r.len(); n != 1 {
		t.Errorf("events after the refusal and exit:\n%s", formatEvents(r.all(), 0))
	}
}

// TestContainerdRateAnnotations: Kata's rate annotations reach the
// sandbox as bit/s; a value that is not a non-negative integer is refused
// with a log line naming the container, and the configured rate holds.
func TestContainerdRateAnnotations(t *testing.T) {
	ctx, logs := testCtx(t)
	log := zerolog.Ctx(ctx)
	w := &ctrWatcher{cfg: ContainerdConfig{Kata: KataLayout{GoMonitor: "/run/vc/vm/{id}/qmp.sock"}}.withDefaults(), log: log}
	spec := &specs.Spec{Annotations: map[string]string{criContainerType: "sandbox",
		KataRxRateAnnotation: "8000000", KataTxRateAnnotation: "-5"},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: "/var/run/netns/x"}}}}
	any, err := typeurl.MarshalAny(spec)
	if err != nil {
		t.Fatal(err)
	}
	sb, skip := w.sandboxOf("k8s.io", containers.Container{ID: "pod-7", Runtime: containers.RuntimeInfo{Name: "io.containerd.kata.v2"}, Spec: any})
	if skip.why != "" {
		t.Fatalf("skipped: %s", skip.why)
	}
	if sb.RxRate == nil || *sb.RxRate != 8000000 || sb.TxRate != nil {
		t.Errorf("rx %v tx %v, want 8000000 and none", sb.RxRate, sb.TxRate)
	}
	logs.waitLine(t, "the refusal", "rate annotation refused", "pod-7", KataTxRateAnnotation)
}
