package main

import (
	"bytes"
	"context"
	"fmt"
	"github.com/tapsync/tapsync/e2e/testnet"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/state"
	"github.com/tapsync/tapsync/watcher"
)

// syncBuffer is a log sink shared by the daemon's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// quietConfig is a daemon config that reaches nothing outside the test:
// its own netns and state dirs, no containerd, no metrics listener, no
// /proc discovery.
func quietConfig(t *testing.T) Config {
	cfg := DefaultConfig()
	cfg.NetnsDir = t.TempDir()
	cfg.StateDir = filepath.Join(t.TempDir(), "state")
	cfg.Containerd.Enabled = false
	cfg.MetricsAddress = ""
	cfg.Discovery.Proc = false
	return cfg
}

// served is a daemon running serve on a goroutine, fed signals by the test.
type served struct {
	d       *daemon
	log     *syncBuffer
	signals chan os.Signal
	done    chan struct{} // closed when serve has returned, with err set
	err     error
}

func serveDaemon(t *testing.T, cfg Config, setup func(*daemon)) *served {
	t.Helper()
	d, err := newDaemon(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(d)
	}
	s := &served{d: d, log: &syncBuffer{}, signals: make(chan os.Signal, 4), done: make(chan struct{})}
	ctx, cancel := context.WithCancel(zerolog.New(s.log).WithContext(context.Background()))
	go func() {
		s.err = d.serve(ctx, s.signals)
		close(s.done)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-s.done:
		case <-time.After(time.Minute):
			t.Errorf("daemon did not stop at cleanup; log:\n%s", s.log)
		}
	})
	return s
}

// eventually polls cond until it holds or a generous deadline passes.
func eventually(t *testing.T, what string, cond func() bool, last func() string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last seen: %s", what, last())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The /proc walk can block on a process in D state: it must hold up
// neither SIGTERM nor itself (requests made meanwhile coalesce; no second
// walk piles up behind the first).
func TestStopWhileDiscoveryIsStuck(t *testing.T) {
	cfg := quietConfig(t)
	cfg.Discovery.Proc = true
	entered := make(chan struct{})
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	var walks atomic.Int32
	s := serveDaemon(t, cfg, func(d *daemon) {
		d.scan = func(context.Context) ([]watcher.Sandbox, error) {
			if walks.Add(1) == 1 {
				close(entered)
			}
			<-release // an uninterruptible read: ignores its context
			return nil, nil
		}
	})
	select {
	case <-entered:
	case <-s.done:
		t.Fatalf("daemon stopped before discovery started: %v\n%s", s.err, s.log)
	case <-time.After(20 * time.Second):
		t.Fatalf("startup discovery never ran; log:\n%s", s.log)
	}
	// Events and the periodic resync keep asking while it hangs.
	for i := range 5 {
		s.d.handle(watcher.Event{Kind: watcher.KindNetns, Source: watcher.SourceNetnsDir, Path: fmt.Sprintf("%s/ns%d", cfg.NetnsDir, i)})
	}
	s.signals <- syscall.SIGTERM
	select {
	case <-s.done:
		if s.err != nil {
			t.Fatalf("serve = %v", s.err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("SIGTERM not handled while /proc discovery hangs; log:\n%s", s.log)
	}
	if n := walks.Load(); n != 1 {
		t.Errorf("%d /proc walks started, want 1 (requests during a stuck walk must coalesce)", n)
	}
}

// A second daemon on one state dir is refused, naming the first one's
// pid, and the first one's control socket stays as it was.
func TestSecondDaemonOnStateDirRefused(t *testing.T) {
	cfg := quietConfig(t)
	first := serveDaemon(t, cfg, nil)
	sock := controlSocketPath(cfg.StateDir)
	var before os.FileInfo
	eventually(t, "the control socket", func() bool {
		var err error
		before, err = os.Stat(sock)
		return err == nil
	}, first.log.String)

	second, err := newDaemon(cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = second.serve(context.Background(), make(chan os.Signal))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) {
		t.Fatalf("second daemon: %v; want a refusal naming pid %d", err, os.Getpid())
	}
	after, err := os.Stat(sock)
	if err != nil || !os.SameFile(before, after) {
		t.Errorf("control socket replaced or removed by the refused daemon: %v", err)
	}
	select {
	case <-first.done:
		t.Fatalf("first daemon stopped: %v", first.err)
	default:
	}
}

// SIGHUP reloads the config file: [[sandbox]] entries removed are
// unregistered (their record kept), new ones registered, changed ones
// updated, other sandboxes take the new defaults; a bad file changes
// nothing.
func TestSIGHUPReloadsConfig(t *testing.T) {
	cfg := quietConfig(t)
	path := filepath.Join(t.TempDir(), "config.toml")
	write := func(top, tables string) {
		t.Helper()
		head := fmt.Sprintf("netns_dir = %q\nstate_dir = %q\nmetrics_address = \"\"\n%s[containerd]\nenabled = false\n[discovery]\nproc = false\n",
			cfg.NetnsDir, cfg.StateDir, top)
		if err := os.WriteFile(path, []byte(head+tables), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	sandbox := func(id, qmp string) string {
		return fmt.Sprintf("[[sandbox]]\nid = %q\nnetns = %q\nqmp = %q\n", id, filepath.Join(cfg.NetnsDir, id), qmp)
	}
	write("", sandbox("a", "/run/a.sock")+sandbox("b", "/run/b.sock"))
	load := func() (Config, error) {
		c, err := LoadConfig(path, false)
		if err != nil {
			return Config{}, err
		}
		return c, c.Validate()
	}
	start, err := load()
	if err != nil {
		t.Fatal(err)
	}
	s := serveDaemon(t, start, func(d *daemon) { d.reload = load })
	d := s.d
	sandboxes := func() string { return strings.Join(d.rec.Sandboxes(), ",") }
	eventually(t, "sandboxes a,b", func() bool { return sandboxes() == "a,b" }, sandboxes)
	// a has endpoints on record: unregistering must not lose them.
	rec := state.Record{Sandbox: "a", Netns: filepath.Join(cfg.NetnsDir, "a"),
		Endpoints: []state.Endpoint{{Index: 0, LinkName: "eth0", LinkIfindex: 2, LinkMAC: "02:00:00:00:00:01", Queues: 1}}}
	if err := d.store.Save(rec); err != nil {
		t.Fatal(err)
	}
	d.handle(watcher.Event{Kind: watcher.KindUpsert, Source: watcher.SourceContainerd,
		Sandbox: watcher.Sandbox{ID: "pod", Netns: filepath.Join(cfg.NetnsDir, "pod"), QMP: "/run/pod.sock"}})
	eventually(t, "sandbox pod", func() bool { return sandboxes() == "a,b,pod" }, sandboxes)

	write("workers = 9\n", "[defaults]\nqueues = 3\n"+sandbox("b", "/run/b2.sock")+sandbox("c", "/run/c.sock"))
	s.signals <- syscall.SIGHUP
	eventually(t, "sandboxes b,c,pod after the reload", func() bool {
		return sandboxes() == "b,c,pod" && strings.Contains(s.log.String(), "resyncing every sandbox") &&
			strings.Contains(s.log.String(), "sandbox unregistered")
	}, func() string { return sandboxes() + "\n" + s.log.String() })
	if sb := d.status("b").Sandbox; sb.QMP != "/run/b2.sock" || sb.Queues != 3 {
		t.Errorf("b = %+v, want the new QMP socket and 3 queues", sb)
	}
	if sb := d.status("pod").Sandbox; sb.Queues != 3 {
		t.Errorf("containerd sandbox pod has %d queues, want the reloaded default 3", sb.Queues)
	}
	if got, err := d.store.Load(context.Background(), "a"); err != nil || len(got.Endpoints) != 1 {
		t.Errorf("record of unregistered a = %+v, %v; want it kept", got, err)
	}
	if w := d.config().Workers; w != start.Workers {
		t.Errorf("workers = %d after reload; a restart-only key must keep its running value %d", w, start.Workers)
	}
	for _, msg := range []string{`"keys":["workers"]`, "sandbox unregistered", "sandbox updated from the config file", "resyncing every sandbox"} {
		if !strings.Contains(s.log.String(), msg) {
			t.Errorf("log lacks %q:\n%s", msg, s.log)
		}
	}

	write("", "[defaults]\nqueues = -1\n"+sandbox("d", "/run/d.sock"))
	mark := strings.Count(s.log.String(), "resyncing every sandbox")
	s.signals <- syscall.SIGHUP
	eventually(t, "the refused reload", func() bool { return strings.Count(s.log.String(), "resyncing every sandbox") > mark }, s.log.String)
	if !strings.Contains(s.log.String(), "config reload refused") || !strings.Contains(s.log.String(), "defaults.queues") {
		t.Errorf("a bad config is not logged with its errors:\n%s", s.log)
	}
	if got := sandboxes(); got != "b,c,pod" {
		t.Errorf("sandboxes = %s after a refused reload, want b,c,pod", got)
	}
	if q := d.config().Defaults.Queues; q != 3 {
		t.Errorf("defaults.queues = %d after a refused reload, want 3", q)
	}
}

// Keys bound at start are listed as restart-only, and every other key a
// reload applies: a new Config field must be placed on one side.
func TestRestartOnlyKeys(t *testing.T) {
	running, next := DefaultConfig(), DefaultConfig()
	next.StateDir, next.Workers, next.Containerd.Runtimes = "/elsewhere", 7, []string{"x"}
	next.ResyncInterval, next.Defaults.Queues = time.Hour, 2
	changed := keepRestartOnly(&next, &running)
	slices.Sort(changed)
	if want := []string{"containerd", "state_dir", "workers"}; !slices.Equal(changed, want) {
		t.Errorf("changed restart-only keys = %v, want %v", changed, want)
	}
	if next.StateDir != running.StateDir || next.Workers != running.Workers || !slices.Equal(next.Containerd.Runtimes, running.Containerd.Runtimes) {
		t.Errorf("restart-only keys not kept: %+v", next)
	}
	if next.ResyncInterval != time.Hour || next.Defaults.Queues != 2 {
		t.Errorf("reloadable keys lost: resync %v, queues %d", next.ResyncInterval, next.Defaults.Queues)
	}
}

// /healthz answers while a pass hangs on a monitor that never greets;
// /readyz only once every sandbox has had its first pass.
func TestHealthAndReadiness(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tsready")
	sock := filepath.Join(shortDir(t), "mute.sock")
	ln, err := net.Listen("unix", sock) // accepts, never greets
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	cfg := quietConfig(t)
	cfg.NetnsDir = "/var/run/netns"
	cfg.Defaults.QMPTimeout = 2 * time.Second
	cfg.Sandboxes = []StaticSandbox{{ID: "mute", Netns: ns.Path, QMP: sock}}
	s := serveDaemon(t, cfg, nil)
	h := s.d.metricsHandler()
	get := func(path string) int {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		return rec.Code
	}
	if c := get("/readyz"); c != http.StatusServiceUnavailable {
		t.Errorf("/readyz during the first pass = %d, want 503", c)
	}
	if c := get("/healthz"); c != http.StatusOK {
		t.Errorf("/healthz during a hanging pass = %d, want 200", c)
	}
	eventually(t, "ready after the first pass", func() bool { return get("/readyz") == http.StatusOK }, func() string { return s.log.String() })
	if c := get("/healthz"); c != http.StatusOK {
		t.Errorf("/healthz = %d, want 200", c)
	}
}
