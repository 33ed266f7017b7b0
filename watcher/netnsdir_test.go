package watcher

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

func TestInDir(t *testing.T) {
	for _, tc := range []struct {
		dir, path string
		ok        bool
	}{
		{"/var/run/netns", "/var/run/netns/cni-1234", true},
		{"/var/run/netns/", "/var/run/netns/cni-1234", true},
		{"/var/run/netns", "/var/run/netns//cni-1234", true},
		{"/var/run/netns", "/var/run/netns/./cni-1234", true},
		{"/var/run/netns", "/var/run/netns/x/../cni-1234", true},
		{"/var/run/netns", "/var/run/netns", false},
		{"/var/run/netns", "/var/run/netns/", false},
		{"/var/run/netns", "/var/run/netns/.", false},
		{"/var/run/netns", "/var/run/netns/..", false},
		{"/var/run/netns", "/var/run/netns/../netns2/x", false},
		{"/var/run/netns", "/var/run/netns/a/b", false},
		{"/var/run/netns", "/run/netns/a", false},
		{"/var/run/netns", "cni-1234", false},
		{"/var/run/netns", "", false},
		{"/var/run/netns", "/var/run/netns2/a", false},
	} {
		err := InDir(tc.dir, tc.path)
		if (err == nil) != tc.ok {
			t.Errorf("InDir(%q, %q) = %v, want ok=%v", tc.dir, tc.path, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "outside netns_dir") {
			t.Errorf("InDir(%q, %q) error %q does not say \"outside netns_dir\"", tc.dir, tc.path, err)
		}
	}
}

func TestIsNetns(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "placeholder")
	if err := os.WriteFile(file, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		want bool
	}{
		{"/proc/self/ns/net", true}, // a magic link: followed
		{"/proc/self/ns/mnt", false},
		{"/proc/self/ns/uts", false},
		{file, false},
		{dir, false},
		{"/dev/null", false},
	} {
		got, err := IsNetns(tc.path)
		if err != nil || got != tc.want {
			t.Errorf("IsNetns(%s) = %v, %v; want %v, nil", tc.path, got, err, tc.want)
		}
	}
	if ok, err := IsNetns(filepath.Join(dir, "missing")); ok || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("IsNetns(missing) = %v, %v; want false, ErrNotExist", ok, err)
	}
}

func TestWatchNetnsDirMissing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "netns")
	err := WatchNetnsDir(context.Background(), missing, func(Event) {})
	if err == nil || !strings.Contains(err.Error(), missing) || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("WatchNetnsDir(missing dir) = %v, want an ErrNotExist error naming %s", err, missing)
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("WatchNetnsDir created %s", missing)
	}
}

// startDirWatch runs watchNetnsDir on dir until the test ends and returns
// its events and log. The placeholder window is shortened to giveUp.
func startDirWatch(t *testing.T, dir string, giveUp time.Duration) (*recorder, *logBuf, <-chan error) {
	ctx, lb := testCtx(t)
	ctx, cancel := context.WithCancel(ctx)
	rec := &recorder{}
	errc := make(chan error, 1)
	go func() {
		errc <- watchNetnsDir(ctx, dir, rec.sink, func(d *netnsDir) { d.giveUp = giveUp })
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("WatchNetnsDir returned %v after its context ended, want nil", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("WatchNetnsDir did not return 10 s after its context ended")
		}
	})
	return rec, lb, errc
}

// bindNetns bind-mounts the netns at src onto dst, creating dst as an empty
// placeholder first, like `ip netns add` does; it is unmounted when the test
// ends.
func bindNetns(t *testing.T, src, dst string) {
	t.Helper()
	placeholder(t, dst)
	mountNetns(t, src, dst)
}

func placeholder(t *testing.T, path string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(path, unix.MNT_DETACH) })
}

// mountNetns binds src onto the existing placeholder dst. It may run on
// any goroutine.
func mountNetns(t *testing.T, src, dst string) {
	// Equivalent to: mount --bind <src> <dst>
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		t.Errorf("mount --bind %s %s: %v", src, dst, err)
	}
}

func isNetnsEvent(kind Kind, path string) func(Event) bool {
	return func(e Event) bool { return e.Kind == kind && e.Path == path && e.Source == SourceNetnsDir }
}

func TestWatchNetnsDir(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tsw")
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing")
	bindNetns(t, ns.Path, existing)
	if err := os.Mkdir(filepath.Join(dir, "subdir"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A symlink to a real netns: not followed, so ignored.
	if err := os.Symlink(ns.Path, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	// Another namespace type bound in the netns dir.
	bindNetns(t, "/proc/self/ns/uts", filepath.Join(dir, "uts"))

	rec, lb, _ := startDirWatch(t, dir, 500*time.Millisecond)

	t.Run("existing netns is reported at start", func(t *testing.T) {
		rec.wait(t, 0, "KindNetns for "+existing, isNetnsEvent(KindNetns, existing))
		lb.waitLine(t, "symlink ignored", `"netns":"`+filepath.Join(dir, "link")+`"`, `"reason":"symlink"`, "ignoring")
		lb.waitLine(t, "directory ignored", `"netns":"`+filepath.Join(dir, "subdir")+`"`, `"reason":"directory"`, "ignoring")
		lb.waitLine(t, "uts namespace ignored", `"netns":"`+filepath.Join(dir, "uts")+`"`, `"reason":"other namespace type"`, "ignoring")
	})

	t.Run("placeholder reported once the bind mount lands", func(t *testing.T) {
		late := filepath.Join(dir, "late")
		from := rec.len()
		placeholder(t, late)
		var mu sync.Mutex
		var mounted time.Time
		time.AfterFunc(200*time.Millisecond, func() {
			mountNetns(t, ns.Path, late)
			mu.Lock()
			mounted = time.Now()
			mu.Unlock()
		})
		e, _ := rec.wait(t, from, "KindNetns for "+late, isNetnsEvent(KindNetns, late))
		seen := time.Now()
		mu.Lock()
		lag := seen.Sub(mounted)
		mu.Unlock()
		t.Logf("placeholder seen as a netns %s after its bind mount (why: %s)", lag.Round(time.Millisecond), e.Why)
	})

	t.Run("regular file that never becomes a netns is ignored", func(t *testing.T) {
		junk := filepath.Join(dir, "junk")
		from := rec.len()
		if err := os.WriteFile(junk, []byte("not a namespace"), 0o644); err != nil {
			t.Fatal(err)
		}
		lb.waitLine(t, "give up on junk", `"netns":"`+junk+`"`, `"level":"warn"`, "gave up")
		rec.none(t, from, "event for "+junk, func(e Event) bool { return e.Path == junk })
	})

	t.Run("removal is reported", func(t *testing.T) {
		from := rec.len()
		if err := unix.Unmount(existing, unix.MNT_DETACH); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(existing); err != nil {
			t.Fatal(err)
		}
		rec.wait(t, from, "KindNetnsGone for "+existing, isNetnsEvent(KindNetnsGone, existing))
	})

	t.Run("names created and removed at once make no events", func(t *testing.T) {
		from := rec.len()
		for i := range 200 {
			p := filepath.Join(dir, fmt.Sprintf("quick%d", i))
			if err := os.WriteFile(p, nil, 0); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
		}
		// Events are handled in order: once the marker is reported, the
		// quick names have all been seen.
		marker := filepath.Join(dir, "marker")
		bindNetns(t, ns.Path, marker)
		rec.wait(t, from, "KindNetns for "+marker, isNetnsEvent(KindNetns, marker))
		rec.none(t, from, "event for a quick name", func(e Event) bool { return strings.Contains(e.Path, "quick") })
	})

	t.Run("nothing reported for ignored entries", func(t *testing.T) {
		for _, name := range []string{"subdir", "link", "uts", "junk"} {
			p := filepath.Join(dir, name)
			rec.none(t, 0, "event for "+p, func(e Event) bool { return e.Path == p })
		}
	})
}

func TestWatchNetnsDirRemoved(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "netns")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, lb, errc := startDirWatchNoCleanupCheck(t, dir)
	lb.waitLine(t, "watch started", "watching netns dir")
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), dir) {
			t.Fatalf("WatchNetnsDir = %v after its dir was removed, want an error naming %s", err, dir)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WatchNetnsDir did not return within 10 s of its dir being removed")
	}
}

func startDirWatchNoCleanupCheck(t *testing.T, dir string) (*recorder, *logBuf, <-chan error) {
	ctx, lb := testCtx(t)
	ctx, cancel := context.WithCancel(ctx)
	rec := &recorder{}
	errc := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		errc <- WatchNetnsDir(ctx, dir, rec.sink)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return rec, lb, errc
}

// TestNetnsDirLostEvents feeds the loop an overflow error instead of the
// events it stands for: the resync and rescan must find what changed.
func TestNetnsDirLostEvents(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tso")
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	bindNetns(t, ns.Path, a)

	ctx, _ := testCtx(t)
	ctx, cancel := context.WithCancel(ctx)
	rec := &recorder{}
	d, err := newNetnsDir(dir, rec.sink)
	if err != nil {
		t.Fatal(err)
	}
	events, errs := make(chan fsnotify.Event), make(chan error)
	done := make(chan error, 1)
	go func() { done <- d.run(ctx, events, errs) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run returned %v", err)
		}
	})
	rec.wait(t, 0, "KindNetns for "+a, isNetnsEvent(KindNetns, a))

	// Both changes happen without an event reaching the loop.
	if err := unix.Unmount(a, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(a); err != nil {
		t.Fatal(err)
	}
	bindNetns(t, ns.Path, b)
	from := rec.len()
	errs <- fsnotify.ErrEventOverflow

	rec.wait(t, from, "KindResyncAll", func(e Event) bool { return e.Kind == KindResyncAll && e.Source == SourceNetnsDir })
	rec.wait(t, from, "KindNetnsGone for "+a, isNetnsEvent(KindNetnsGone, a))
	rec.wait(t, from, "KindNetns for "+b, isNetnsEvent(KindNetns, b))
}

// TestWatchNetnsDirIPNetns follows `ip netns add` and `ip netns del` in
// the real /var/run/netns: the placeholder-then-mount sequence of iproute2.
func TestWatchNetnsDirIPNetns(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	const dir = "/var/run/netns"
	// ip creates the dir on first use; make sure it exists before watching.
	first := testnet.NewNS(t, "tsa")
	rec, lb, _ := startDirWatch(t, dir, placeholderGiveUp)
	rec.wait(t, 0, "KindNetns for "+first.Path, isNetnsEvent(KindNetns, first.Path))

	b := make([]byte, 4)
	rand.Read(b)
	name := "tsa-" + hex.EncodeToString(b)
	path := filepath.Join(dir, name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	from := rec.len()
	added := time.Now()
	testnet.IP(t, "netns", "add", name)
	rec.wait(t, from, "KindNetns for "+path, isNetnsEvent(KindNetns, path))
	t.Logf("ip netns add → KindNetns: %s; %s", time.Since(added).Round(time.Microsecond),
		lb.waitLine(t, "found line", `"netns":"`+path+`"`, "netns found"))

	from = rec.len()
	testnet.IP(t, "netns", "del", name)
	rec.wait(t, from, "KindNetnsGone for "+path, isNetnsEvent(KindNetnsGone, path))
}

// TestCheckNetns: a netns path from an OCI spec is taken only when it is a
// netns bound directly in netns_dir (reached by any spelling of that
// directory), never through a symlink, never a plain file, never the
// host's netns.
func TestCheckNetns(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tcn")
	dir := t.TempDir()
	outside := t.TempDir()
	bindNetns(t, ns.Path, filepath.Join(dir, "good"))
	bindNetns(t, ns.Path, filepath.Join(outside, "pod"))
	bindNetns(t, "/proc/self/ns/net", filepath.Join(dir, "host"))
	if err := os.Symlink(filepath.Join(outside, "pod"), filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	bindNetns(t, ns.Path, filepath.Join(dir, "sub", "deeper"))
	// Another spelling of dir, as /var/run is of /run.
	alias := filepath.Join(t.TempDir(), "alias")
	if err := os.Symlink(dir, alias); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good")
	for _, tc := range []struct {
		path string
		want string // accepted path, or "" when refused
		err  string
	}{
		{path: good, want: good},
		{path: dir + "//good", want: good},
		{path: filepath.Join(alias, "good"), want: good},
		{path: filepath.Join(outside, "pod"), err: "outside netns_dir"},
		{path: dir + "/../" + filepath.Base(outside) + "/pod", err: "outside netns_dir"},
		{path: filepath.Join(dir, "sub", "deeper"), err: "outside netns_dir"},
		{path: filepath.Join(dir, "link"), err: "a symlink, not a network namespace"},
		{path: filepath.Join(dir, "file"), err: "a placeholder, not a network namespace"},
		{path: filepath.Join(dir, "sub"), err: "a directory, not a network namespace"},
		{path: filepath.Join(dir, "host"), err: "host network namespace"},
		{path: filepath.Join(dir, "missing"), err: "no such file"},
		{path: "good", err: "not an absolute path"},
		{path: "", err: "not an absolute path"},
		{path: dir, err: "outside netns_dir"},
	} {
		got, err := CheckNetns(dir, tc.path)
		if got != tc.want || (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("CheckNetns(%q) = %q, %v; want %q, error containing %q", tc.path, got, err, tc.want, tc.err)
		}
	}
	// netns_dir itself given by another spelling.
	if got, err := CheckNetns(alias+"/", good); err != nil || got != filepath.Join(alias, "good") {
		t.Errorf("CheckNetns(%q, %q) = %q, %v; want the path in netns_dir as configured", alias, good, got, err)
	}
	if _, err := CheckNetns(filepath.Join(dir, "nodir"), good); err == nil {
		t.Error("CheckNetns with a missing netns_dir: no error")
	}
}

// TestCheckTaskNetns: /proc/<pid>/ns/net is taken for the task's own pid
// only, and never when it is the host's netns.
func TestCheckTaskNetns(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tcn")
	cmd := exec.Command("nsenter", "--net="+ns.Path, "--", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() // by pid: the process we started
		cmd.Wait()
	})
	pid := uint32(cmd.Process.Pid)
	// nsenter execs sleep after setns: wait for the switch.
	want, err := nsIDOf(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	path := fmt.Sprintf("/proc/%d/ns/net", pid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		id, err := nsIDOf(path)
		if err == nil && id == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never entered %s: %v %v", pid, ns.Path, id, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := checkTaskNetns(path, pid); err != nil {
		t.Errorf("checkTaskNetns(%s, %d) = %v, want nil", path, pid, err)
	}
	if err := checkTaskNetns(path, pid+1); err == nil || !strings.Contains(err.Error(), "not /proc/<pid>/ns/net of the task") {
		t.Errorf("checkTaskNetns(%s, another pid) = %v, want refused", path, err)
	}
	if err := checkTaskNetns(path, 0); err == nil {
		t.Errorf("checkTaskNetns(%s, no pid) = nil, want refused", path)
	}
	self := fmt.Sprintf("/proc/%d/ns/net", os.Getpid())
	if err := checkTaskNetns(self, uint32(os.Getpid())); err == nil || !strings.Contains(err.Error(), "host network namespace") {
		t.Errorf("checkTaskNetns(%s) = %v, want refused as the host's", self, err)
	}
	uts := fmt.Sprintf("/proc/%d/ns/uts", pid)
	if err := checkTaskNetns(uts, pid); err == nil {
		t.Errorf("checkTaskNetns(%s) = nil, want refused", uts)
	}
}
