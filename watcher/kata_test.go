package watcher

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/typeurl/v2"
	"github.com/tapsync/tapsync/e2e/testnet"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestRuntimePatterns: the default patterns take every handler
// kata-deploy registers and leave its confidential ones out.
func TestRuntimePatterns(t *testing.T) {
	for _, tc := range []struct {
		runtime       string
		watched, skip bool
	}{
		{"io.containerd.kata.v2", true, false},
		{"io.containerd.kata-qemu.v2", true, false},
		{"io.containerd.kata-qemu-runtime-rs.v2", true, false},
		{"io.containerd.kata-clh.v2", true, false},
		{"io.containerd.kata-fc.v2", true, false},
		{"io.containerd.kata-qemu-coco-dev.v2", true, true},
		{"io.containerd.kata-qemu-coco-dev-runtime-rs.v2", true, true},
		{"io.containerd.kata-qemu-snp.v2", true, true},
		{"io.containerd.kata-qemu-tdx.v2", true, true},
		{"io.containerd.kata-qemu-se.v2", true, true},
		{"io.containerd.kata-qemu-se-runtime-rs.v2", true, true},
		{"io.containerd.kata-qemu-nvidia-gpu-snp.v2", true, true},
		{"io.containerd.kata-qemu-nvidia-gpu-tdx.v2", true, true},
		{"io.containerd.kata-qemu-nvidia-gpu.v2", true, false},
		{"io.containerd.kata-qemu-sev.v2", true, false}, // not a kata-deploy name; "-se" must not catch it
		{"io.containerd.runc.v2", false, false},
		{"io.containerd.kata.v2.evil", false, false},
		{"io.containerd.katana.v2", false, false},
	} {
		if got := MatchRuntime(DefaultRuntimes, tc.runtime); got != tc.watched {
			t.Errorf("%s watched = %v, want %v", tc.runtime, got, tc.watched)
		}
		if got := MatchRuntime(DefaultSkipRuntimes, tc.runtime); got != tc.skip {
			t.Errorf("%s skipped = %v, want %v", tc.runtime, got, tc.skip)
		}
	}
	if err := ValidRuntimePatterns([]string{"io.containerd.kata-*.v2", "a[b"}); err == nil || !strings.Contains(err.Error(), "a[b") {
		t.Errorf("malformed pattern: %v, want an error naming it", err)
	}
}

// TestKataResolve: the flavour follows what exists on the node.
func TestKataResolve(t *testing.T) {
	dir := t.TempDir()
	l := KataLayout{RsDir: dir + "/kata/{id}", GoMonitor: dir + "/vc/vm/{id}/extra-monitor.sock", GoAgentURL: "kata-shim://" + dir + "/vc/sbs/{id}/shim-monitor.sock",
		RsAgentURL: "kata-shim://" + dir + "/kata/{id}/shim-monitor.sock",
		BundleDirs: []string{dir + "/task/{namespace}/{id}", dir + "/shim/{namespace}/{id}"}}
	if err := l.Validate(); err != nil {
		t.Fatal(err)
	}
	l.Wrapper = dir + "/w/{id}.sock"
	mkfile := func(f string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(f), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	check := func(what string, got, want KataSandbox, note string) {
		t.Helper()
		if !strings.Contains(got.WrapperNote, note) || (note == "") != (got.WrapperNote == "") {
			t.Errorf("%s: note %q, want one containing %q", what, got.WrapperNote, note)
		}
		got.WrapperNote = ""
		if got != want {
			t.Errorf("%s = %+v, want %+v", what, got, want)
		}
	}
	goAgent := "kata-shim://" + dir + "/vc/sbs/p1/shim-monitor.sock"
	rsAgent := "kata-shim://" + dir + "/kata/p1/shim-monitor.sock"

	// Nothing yet: the wrapper's monitor is waited for.
	check("Go handler, no monitor", l.Resolve("k8s.io", "p1", "io.containerd.kata-qemu.v2"),
		KataSandbox{Flavour: FlavourGo, Monitor: dir + "/w/p1.sock", Protocol: ProtoQMP, Wrapped: true, AgentURL: goAgent}, "neither")
	// The Go runtime's debug monitor.
	mkfile(dir + "/vc/vm/p1/extra-monitor.sock")
	check("Go handler, debug monitor", l.Resolve("k8s.io", "p1", "io.containerd.kata-qemu.v2"),
		KataSandbox{Flavour: FlavourGo, Monitor: dir + "/vc/vm/p1/extra-monitor.sock", Protocol: ProtoQMP, AgentURL: goAgent}, "no tapsync-qemu monitor at "+dir+"/w/p1.sock")
	// A runtime-rs state dir makes it runtime-rs whatever the name; the
	// shim sandboxer's bundle dir is taken when it is the one that exists.
	for _, d := range []string{dir + "/kata/p1", dir + "/shim/k8s.io/p1"} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	mkfile(dir + "/shim/k8s.io/p1/debug-monitor.sock")
	check("runtime-rs, debug monitor", l.Resolve("k8s.io", "p1", "io.containerd.kata.v2"),
		KataSandbox{Flavour: FlavourRs, Monitor: dir + "/shim/k8s.io/p1/debug-monitor.sock", Protocol: ProtoHMP,
			Bundle: dir + "/shim/k8s.io/p1", AgentURL: rsAgent}, "no tapsync-qemu monitor")
	// Not a socket at the wrapper's path: not taken.
	mkfile(dir + "/w/p1.sock")
	check("runtime-rs, a file at the wrapper's path", l.Resolve("k8s.io", "p1", "io.containerd.kata.v2"),
		KataSandbox{Flavour: FlavourRs, Monitor: dir + "/shim/k8s.io/p1/debug-monitor.sock", Protocol: ProtoHMP,
			Bundle: dir + "/shim/k8s.io/p1", AgentURL: rsAgent}, "is not a socket")
	// The wrapper's socket: preferred over any debug monitor.
	os.Remove(dir + "/w/p1.sock")
	ln, err := net.Listen("unix", dir+"/w/p1.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	check("runtime-rs, wrapped", l.Resolve("k8s.io", "p1", "io.containerd.kata.v2"),
		KataSandbox{Flavour: FlavourRs, Monitor: dir + "/w/p1.sock", Protocol: ProtoQMP, Wrapped: true, AgentURL: rsAgent}, "")
	check("Go, wrapped", l.Resolve("k8s.io", "p1", "io.containerd.kata-qemu.v2"),
		KataSandbox{Flavour: FlavourRs, Monitor: dir + "/w/p1.sock", Protocol: ProtoQMP, Wrapped: true, AgentURL: rsAgent}, "")
	for _, bad := range []KataLayout{{RsMonitor: "../x.sock"}, {RsMonitor: "/abs.sock"}, {GoMonitor: "rel/{id}"}, {BundleDirs: []string{"/run/no-id"}}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v: valid, want refused", bad)
		}
	}
}

// TestStoreSandbox covers which Sandbox Store records are sandboxes.
func TestStoreSandbox(t *testing.T) {
	dir := t.TempDir()
	w := &ctrWatcher{cfg: ContainerdConfig{Kata: KataLayout{RsDir: dir + "/{id}"}}.withDefaults()}
	meta := func(s string) typeurl.Any {
		return &anypb.Any{TypeUrl: "github.com/containerd/containerd/v2/internal/cri/store/sandbox/Metadata", Value: []byte(s)}
	}
	live := filepath.Join(dir, "netns-live")
	if err := os.WriteFile(live, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	good := `{"Version":"v1","Metadata":{"ID":"p1","Name":"pod","NetNSPath":"` + live + `","RuntimeHandler":"kata-qemu-runtime-rs"}}`
	for _, tc := range []struct {
		name    string
		runtime string
		ext     map[string]typeurl.Any
		live    bool
		skip    string
		loud    bool
	}{
		{name: "runtime-rs pod", runtime: "io.containerd.kata-qemu-runtime-rs.v2", ext: map[string]typeurl.Any{"metadata": meta(good)}, live: true},
		{name: "stopped pod", runtime: "io.containerd.kata-qemu-runtime-rs.v2",
			ext: map[string]typeurl.Any{"metadata": meta(strings.ReplaceAll(good, live, dir+"/gone"))}},
		{name: "runc pod", runtime: "io.containerd.runc.v2", ext: map[string]typeurl.Any{"metadata": meta(good)}, skip: "not watched"},
		{name: "no metadata", runtime: "io.containerd.kata-qemu.v2", skip: "no CRI metadata", loud: true},
		{name: "malformed metadata", runtime: "io.containerd.kata-qemu.v2", ext: map[string]typeurl.Any{"metadata": meta(`{"Metadata":`)}, skip: "malformed", loud: true},
		{name: "wrong shape", runtime: "io.containerd.kata-qemu.v2", ext: map[string]typeurl.Any{"metadata": meta(`{"Metadata":{"NetNSPath":5}}`)}, skip: "malformed", loud: true},
		{name: "host network", runtime: "io.containerd.kata-qemu.v2", ext: map[string]typeurl.Any{"metadata": meta(`{"Version":"v1","Metadata":{"ID":"p1"}}`)}, skip: "host network", loud: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := sandbox.Sandbox{ID: "p1", Runtime: sandbox.RuntimeOpts{Name: tc.runtime}, Sandboxer: "shim", Extensions: tc.ext}
			sb, isLive, skip := w.storeSandbox("k8s.io", rec)
			if !strings.Contains(skip.why, tc.skip) || (tc.skip == "") != (skip.why == "") || skip.loud != tc.loud {
				t.Fatalf("skip = %+v, want one containing %q (loud %v)", skip, tc.skip, tc.loud)
			}
			if tc.skip != "" {
				return
			}
			if isLive != tc.live {
				t.Errorf("live = %v, want %v", isLive, tc.live)
			}
			if sb.ID != "p1" || sb.Flavour != FlavourRs || sb.Runtime != tc.runtime {
				t.Errorf("sandbox = %+v, want p1 of runtime-rs", sb)
			}
		})
	}
}

// TestCheckMonitorPeer: a monitor is trusted only when root's process in
// the sandbox's netns (and, for runtime-rs, in its bundle dir) serves it.
// Here this test process serves it, in its own netns and cwd.
func TestCheckMonitorPeer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: needs root (the listener must be root's, and a second netns)")
	}
	sock := filepath.Join(t.TempDir(), "m.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	conn := c.(*net.UnixConn)
	cwd, _ := os.Getwd()
	other := testnet.NewNS(t, "peer")
	for _, tc := range []struct {
		name, netns, cwd, want string
	}{
		{"its QEMU", "/proc/self/ns/net", "", ""},
		{"its QEMU in the bundle dir", "/proc/self/ns/net", cwd, ""},
		{"another netns", other.Path, "", "not in the sandbox's network namespace"},
		{"another dir", "/proc/self/ns/net", t.TempDir(), "working directory is not the sandbox's bundle dir"},
		{"a netns that is gone", filepath.Join(t.TempDir(), "gone"), "", "not in the sandbox's network namespace"},
	} {
		err := CheckMonitorPeer(conn, tc.netns, tc.cwd)
		if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}
