//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"github.com/tapsync/tapsync/state"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// tapsyncBinary builds cmd/tapsync once per test process.
func tapsyncBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tapsync-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "tapsync")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/tapsync/tapsync/cmd/tapsync").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// oneSandboxConfig writes a daemon config for one sandbox "sb1" from the
// config file, with no agent, containerd or /proc discovery.
func oneSandboxConfig(t *testing.T, stateDir, netns, qmpPath string) string {
	t.Helper()
	return writeConfig(t, fmt.Sprintf(`
netns_dir = "/var/run/netns"
state_dir = %q
metrics_address = "127.0.0.1:0"
[containerd]
enabled = false
[discovery]
proc = false
[[sandbox]]
id = "sb1"
netns = %q
qmp = %q
`, stateDir, netns, qmpPath))
}

// writeConfig writes a tapsync config file for test t and returns its path.
func writeConfig(t *testing.T, body string) string {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// daemonProc is one `tapsync run` process with its log.
type daemonProc struct {
	t   *testing.T
	cmd *exec.Cmd
	mu  sync.Mutex
	log []map[string]any
	// dupes are log lines with a key twice (a logger labelled twice
	// along a call path); JSON consumers keep one of the two, or reject
	// the line.
	dupes []string
	done  chan struct{}
}

func startDaemon(t *testing.T, args ...string) *daemonProc {
	t.Helper()
	return startDaemonEnv(t, nil, args...)
}

// startDaemonEnv starts `tapsync run` with extra environment variables.
func startDaemonEnv(t *testing.T, env []string, args ...string) *daemonProc {
	t.Helper()
	cmd := exec.Command(tapsyncBinary(t), append([]string{"run", "--log-format", "json", "--log-level", "debug"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := testproc.Start(cmd); err != nil {
		t.Fatal(err)
	}
	d := &daemonProc{t: t, cmd: cmd, done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				m = map[string]any{"message": sc.Text()}
			}
			dup := duplicateKey(sc.Bytes())
			d.mu.Lock()
			d.log = append(d.log, m)
			if dup != "" {
				d.dupes = append(d.dupes, fmt.Sprintf("key %q twice in %s", dup, sc.Text()))
			}
			d.mu.Unlock()
		}
		cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.stop(syscall.SIGKILL)
		d.mu.Lock()
		for _, s := range d.dupes {
			t.Errorf("daemon log line with a duplicate key: %s", s)
		}
		d.mu.Unlock()
		if t.Failed() {
			d.dumpLog()
		}
	})
	return d
}

// duplicateKey returns a key that a JSON object line holds twice at its
// top level, or "" (also for a line that is no JSON object).
func duplicateKey(line []byte) string {
	dec := json.NewDecoder(bytes.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return ""
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		k, _ := tok.(string)
		if seen[k] {
			return k
		}
		seen[k] = true
		var v json.RawMessage
		if dec.Decode(&v) != nil {
			return ""
		}
	}
	return ""
}

func (d *daemonProc) dumpLog() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, m := range d.log {
		b, _ := json.Marshal(m)
		d.t.Logf("daemon: %s", b)
	}
}

// stop signals the daemon (by its pid) and waits for it to exit.
func (d *daemonProc) stop(sig syscall.Signal) {
	select {
	case <-d.done:
		return
	default:
	}
	d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
		d.t.Errorf("daemon did not exit within 30s of %v", sig)
	}
}

// mark is the position of the next log event, for waitLogAfter.
func (d *daemonProc) mark() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.log)
}

// waitLog waits for a log event whose message contains msg and whose
// fields match, and returns it.
func (d *daemonProc) waitLog(msg string, fields map[string]any) map[string]any {
	d.t.Helper()
	return d.waitLogAfter(0, msg, fields)
}

// waitLogAfter is waitLog for events logged at or after mark.
func (d *daemonProc) waitLogAfter(mark int, msg string, fields map[string]any) map[string]any {
	d.t.Helper()
	deadline := time.Now().Add(time.Minute)
	seen := mark
	for {
		d.mu.Lock()
		for ; seen < len(d.log); seen++ {
			m := d.log[seen]
			if s, _ := m["message"].(string); !strings.Contains(s, msg) {
				continue
			}
			ok := true
			for k, v := range fields {
				if fmt.Sprint(m[k]) != fmt.Sprint(v) {
					ok = false
				}
			}
			if ok {
				d.mu.Unlock()
				return m
			}
		}
		d.mu.Unlock()
		select {
		case <-d.done:
			d.t.Fatalf("daemon exited (%v) while waiting for %q", d.cmd.ProcessState, msg)
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("no daemon log %q %v within a minute", msg, fields)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sandboxStatus is sandbox id's entry in `tapsync status`, nil if absent.
func sandboxStatus(t *testing.T, stateDir, id string) map[string]any {
	t.Helper()
	for _, st := range status(t, stateDir) {
		if st["id"] == id {
			return st
		}
	}
	return nil
}

// status runs `tapsync status --json` against the daemon.
func status(t *testing.T, stateDir string) []map[string]any {
	t.Helper()
	out, err := exec.Command(tapsyncBinary(t), "status", "--json", "--state-dir", stateDir).Output()
	if err != nil {
		t.Fatalf("tapsync status: %v", err)
	}
	var st []map[string]any
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("status output %q: %v", out, err)
	}
	return st
}

// waitReconciled waits until status shows a reconcile of the sandbox
// newer than since, and returns that status.
func waitReconciled(t *testing.T, stateDir string, since time.Time) map[string]any {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		st := status(t, stateDir)
		if len(st) == 1 {
			if ts, ok := st[0]["last_reconcile"].(string); ok {
				if at, err := time.Parse(time.RFC3339Nano, ts); err == nil && at.After(since) {
					return st[0]
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reconcile after %v; status %v", since, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDaemon runs the real binary on a sandbox from its config file: links
// added to the netns appear in the guest with no other action, deleted
// ones are unplugged, SIGHUP resyncs, and SIGKILL + restart changes
// nothing while ping keeps working.
func TestDaemon(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	r := newRig(t, 1)
	cfg := oneSandboxConfig(t, r.stateDir, r.sb.Path, r.vm.QMP)

	// systemd's notify socket: the daemon says READY=1 once it runs and
	// pings the watchdog.
	notifyPath := filepath.Join(t.TempDir(), "notify.sock")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	d := startDaemonEnv(t, []string{"NOTIFY_SOCKET=" + notifyPath, "WATCHDOG_USEC=200000"}, "--config", cfg)
	d.waitLog("tapsync running", nil)
	// Like systemd, keep reading the socket for the daemon's whole life.
	notified := make(chan string, 64)
	go func() {
		buf := make([]byte, 256)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				return
			}
			select {
			case notified <- string(buf[:n]):
			default:
			}
		}
	}()
	gotNotify := map[string]bool{}
	for timeout := time.After(30 * time.Second); !gotNotify["READY=1"] || !gotNotify["WATCHDOG=1"]; {
		select {
		case m := <-notified:
			gotNotify[m] = true
		case <-timeout:
			t.Fatalf("systemd notifications: got %v, want READY=1 and WATCHDOG=1", gotNotify)
		}
	}
	metricsAddr := d.waitLog("serving metrics", nil)["address"].(string)
	sock := filepath.Join(r.stateDir, "control.sock")
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket %s: %v, mode %v; want 0600", sock, err, fi.Mode().Perm())
	}
	// A non-root caller is turned away even if the mode were looser.
	os.Chmod(r.stateDir, 0o755)
	os.Chmod(sock, 0o666)
	cmd := exec.Command(tapsyncBinary(t), "status", "--state-dir", r.stateDir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("tapsync status as uid 65534 succeeded: %s", out)
	}
	os.Chmod(sock, 0o600)
	os.Chmod(r.stateDir, 0o700)

	eth0, net1 := testvm.TestMAC(1), testvm.TestMAC(2)
	off := r.vm.SerialOffset()
	r.addLink("eth0", eth0)
	r.waitSerial(off, testvm.NICUpRE(eth0))
	pingable(t, r.host, testvm.GuestIP(eth0))

	off = r.vm.SerialOffset()
	r.addLink("net1", net1)
	r.waitSerial(off, testvm.NICUpRE(net1))
	pingable(t, r.host, testvm.GuestIP(net1))
	off = r.vm.SerialOffset()
	r.delLink("net1")
	r.waitSerial(off, testvm.NICGoneRE(net1))
	eventuallyChecked(t, r)

	// Our filters deleted by hand while the daemon runs: their tc
	// messages outdate what the netns kept of those links' filters, and
	// the passes they start add them back.
	for _, dev := range []string{"eth0", "tsn0"} {
		testnet.Run(t, "tc", "-n", r.sb.Name, "filter", "del", "dev", dev, "ingress", "prio", fmt.Sprint(datapath.FilterPriority))
	}
	eventuallyChecked(t, r)

	// The CLI: plan shows nothing to do, resync is accepted, unknown
	// sandboxes are named in the error.
	cli := func(args ...string) (string, error) {
		out, err := exec.Command(tapsyncBinary(t), append(args, "--state-dir", r.stateDir)...).CombinedOutput()
		return string(out), err
	}
	if out, err := cli("plan", "sb1"); err != nil || !strings.Contains(out, "converged, nothing to do") {
		t.Errorf("tapsync plan sb1: %v: %s", err, out)
	}
	if out, err := cli("plan", "nope"); err == nil || !strings.Contains(out, `unknown sandbox "nope"`) {
		t.Errorf("tapsync plan nope: %v: %s", err, out)
	}
	before, mark := time.Now(), d.mark()
	if out, err := cli("resync", "sb1"); err != nil || !strings.Contains(out, "resync requested for sb1") {
		t.Errorf("tapsync resync sb1: %v: %s", err, out)
	}
	d.waitLogAfter(mark, "resync requested", nil)
	waitReconciled(t, r.stateDir, before)
	if out, err := cli("status"); err != nil || !strings.Contains(out, "tsn0  eth0") {
		t.Errorf("tapsync status: %v:\n%s", err, out)
	}

	// Metrics on loopback.
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`tapsync_triggers_total{source="netlink"}`, "tapsync_trigger_to_converged_seconds_count",
		`tapsync_endpoints{state="wired"} 1`, "tapsync_reconcile_duration_seconds_bucket", "tapsync_queue_depth 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	// SIGHUP: a resync of a converged sandbox changes nothing.
	before, mark = time.Now(), d.mark()
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLogAfter(mark, "resyncing every sandbox", map[string]any{"reason": "SIGHUP"})
	if st := waitReconciled(t, r.stateDir, before); st["last_mutations"].(float64) != 0 || st["last_error"] != nil {
		t.Errorf("SIGHUP resync of a converged sandbox: %v", st)
	}

	// SIGKILL, then restart: zero mutations, the device is the same, ping works.
	dev := r.deviceOf(eth0)
	d.stop(syscall.SIGKILL)
	pingable(t, r.host, testvm.GuestIP(eth0)) // VMs keep their network while tapsync is down
	before = time.Now()
	d2 := startDaemon(t, "--config", cfg, "--metrics-address", "")
	d2.waitLog("tapsync running", nil)
	if st := waitReconciled(t, r.stateDir, before); st["last_mutations"].(float64) != 0 || st["last_error"] != nil {
		t.Errorf("first reconcile after restart: %v", st)
	}
	if now := r.deviceOf(eth0); now.ID != dev.ID || now.Bus != dev.Bus || now.Addr != dev.Addr {
		t.Errorf("device changed across the restart: %+v → %+v", dev, now)
	}
	pingable(t, r.host, testvm.GuestIP(eth0))
	r.check()

	// SIGTERM: clean exit 0, endpoints stay.
	d2.stop(syscall.SIGTERM)
	if code := d2.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code after SIGTERM = %d", code)
	}
	pingable(t, r.host, testvm.GuestIP(eth0))
}

// TestCheckCommand: `tapsync check` passes on this node for a reachable
// VM and fails, saying what to do, for a missing QMP socket.
func TestCheckCommand(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	sb := testnet.NewNS(t, "tapsync-chk")
	vm := testvm.StartNoGuest(t, testvm.Options{NetNS: sb.Path})
	run := func(qmpPath string) (string, error) {
		cfg := writeConfig(t, fmt.Sprintf("state_dir = %q\n[containerd]\nenabled = false\n[[sandbox]]\nid = \"vm\"\nnetns = %q\nqmp = %q\n",
			t.TempDir(), sb.Path, qmpPath))
		out, err := exec.Command(tapsyncBinary(t), "check", "--config", cfg).CombinedOutput()
		return string(out), err
	}
	out, err := run(vm.QMP)
	if err != nil || !strings.Contains(out, "ingress qdisc, u32, mirred") || !strings.Contains(out, "answers") {
		t.Errorf("check on a good node: %v\n%s", err, out)
	}
	out, err = run("/nonexistent/qmp.sock")
	if err == nil || !strings.Contains(out, "FAIL  sandbox vm: QMP socket /nonexistent/qmp.sock") || !strings.Contains(out, "→ start the VM with -qmp") {
		t.Errorf("check with a missing QMP socket: %v\n%s", err, out)
	}
}

// eventuallyChecked waits for the rig to pass check (the daemon converges
// on its own).
func eventuallyChecked(t *testing.T, r *rig) {
	t.Helper()
	ctx, cancel := context.WithTimeout(r.ctx, time.Minute)
	defer cancel()
	// The record is read as well: a removal's last step forgets the
	// endpoint after its tap is gone, so the netns converges first.
	recorded := func() bool {
		store, err := state.Open(r.stateDir)
		if err != nil {
			return false
		}
		rec, err := store.Load(r.ctx, "sb1")
		return err == nil && len(rec.Endpoints) == len(r.links) &&
			!slices.ContainsFunc(rec.Endpoints, func(e state.Endpoint) bool { return e.Removing })
	}
	for ctx.Err() == nil {
		st, err := r.n.Observe(datapath.All)
		if err == nil && len(st.Taps) == len(r.links) && len(st.Redirects) == 2*len(r.links) && recorded() {
			r.check()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.check()
}

// TestDaemonRefusesBadConfig: the daemon does not start half-configured.
func TestDaemonRefusesBadConfig(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	for name, tc := range map[string]struct{ body, want string }{
		"unknown key":       {"netns_dirr = \"/var/run/netns\"\n", "unknown key netns_dirr"},
		"netns outside dir": {"[[sandbox]]\nid = \"a\"\nnetns = \"/etc/a\"\nqmp = \"/run/a.sock\"\n", `sandbox "a".netns`},
		"bad duration":      {"resync_interval = \"often\"\n", "resync_interval"},
	} {
		cfg := writeConfig(t, tc.body)
		state := t.TempDir()
		out, err := exec.Command(tapsyncBinary(t), "run", "--config", cfg, "--state-dir", state).CombinedOutput()
		if err == nil {
			t.Errorf("%s: daemon started", name)
			continue
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("%s: output %q does not name %q", name, out, tc.want)
		}
		if _, err := os.Stat(filepath.Join(state, "control.sock")); err == nil {
			t.Errorf("%s: control socket created by a refused daemon", name)
		}
	}
}
