package main

import (
	"bufio"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/tapsync/tapsync/e2e/testnet"
)

// oddQEMU is a QMP peer that greets and negotiates like QEMU 7.2 and
// answers the commands tapsync observes a VM with (an empty VM: no
// peripherals, no netdevs, one vCPU), but answers every other command
// (getfd, netdev_add, device_add, query-pci, ...) with a line that is not
// JSON. It serves one client at a time, like QEMU.
type oddQEMU struct {
	path     string
	ln       net.Listener
	commands atomic.Int64 // commands answered with garbage
	wg       sync.WaitGroup
	mu       sync.Mutex
	conn     net.Conn
}

// shortDir is a temp dir for sockets (t.TempDir can exceed the 108-byte
// socket path limit).
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tsq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func startOddQEMU(t *testing.T) *oddQEMU {
	t.Helper()
	return startOddQEMUAt(t, filepath.Join(shortDir(t), "qmp.sock"))
}

func startOddQEMUAt(t *testing.T, path string) *oddQEMU {
	t.Helper()
	q := &oddQEMU{path: path}
	var err error
	if q.ln, err = net.Listen("unix", q.path); err != nil {
		t.Fatal(err)
	}
	q.wg.Go(q.serve)
	t.Cleanup(func() {
		q.ln.Close()
		q.mu.Lock()
		if q.conn != nil {
			q.conn.Close()
		}
		q.mu.Unlock()
		q.wg.Wait()
	})
	return q
}

func (q *oddQEMU) serve() {
	for {
		conn, err := q.ln.Accept()
		if err != nil {
			return
		}
		q.mu.Lock()
		q.conn = conn
		q.mu.Unlock()
		q.serveConn(conn)
		conn.Close()
	}
}

func (q *oddQEMU) serveConn(conn net.Conn) {
	w := bufio.NewWriter(conn)
	send := func(line string) bool {
		w.WriteString(line + "\n")
		return w.Flush() == nil
	}
	if !send(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "odd"}, "capabilities": ["oob"]}}`) {
		return
	}
	dec := json.NewDecoder(conn)
	for {
		var cmd struct {
			Execute   string          `json:"execute"`
			Arguments map[string]any  `json:"arguments"`
			ID        json.RawMessage `json:"id"`
		}
		if err := dec.Decode(&cmd); err != nil {
			return
		}
		reply := func(ret string) string { return `{"return": ` + ret + `, "id": ` + string(cmd.ID) + `}` }
		var line string
		switch {
		case cmd.Execute == "qmp_capabilities":
			line = reply(`{}`)
		case cmd.Execute == "human-monitor-command" && cmd.Arguments["command-line"] == "info qtree":
			line = reply(qtreeWithBridge)
		case cmd.Execute == "human-monitor-command" && cmd.Arguments["command-line"] == "info network":
			line = reply(`""`)
		case cmd.Execute == "query-cpus-fast":
			line = reply(`[{"cpu-index": 0, "thread-id": 1, "qom-path": "/machine/unattached/device[0]", "target": "x86_64"}]`)
		default:
			q.commands.Add(1)
			line = `{"return": {]]` // not JSON: the client cannot tell where the next message starts
		}
		if !send(line) {
			return
		}
	}
}

// qtreeWithBridge is HMP "info qtree" of a q35 VM with one empty
// pci-bridge, as a JSON string.
var qtreeWithBridge = func() string {
	b, _ := json.Marshal("bus: main-system-bus\r\n  type System\r\n  dev: q35-pcihost, id \"\"\r\n" +
		"    bus: pcie.0\r\n      type PCIE\r\n      dev: pci-bridge, id \"br1\"\r\n        addr = 02.0\r\n" +
		"        bus: br1\r\n          type PCI\r\n")
	return string(b)
}()

// passes is how many reconcile passes the daemon has run (the count of
// its pass duration histogram).
func passes(t *testing.T, d *daemon) uint64 {
	t.Helper()
	var m dto.Metric
	if err := d.m.reconcileDuration.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// A VM whose QEMU answers hot-plug commands with garbage: every pass
// fails, and each failed hot-add opens and closes the new tap's queues, a
// carrier change the daemon's own netlink watcher sees. Those events must
// not start passes past the backoff. Counted over a window, the daemon
// runs the backoff schedule's passes, not hundreds.
func TestFailingSandboxKeepsItsBackoff(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	sbNS := testnet.NewNS(t, "tshot")
	peerNS := testnet.NewNS(t, "tshotp")
	mac, _ := net.ParseMAC("02:00:00:a0:00:01")
	testnet.Veth(t, sbNS, "eth0", mac, peerNS, "peer0")
	qemu := startOddQEMU(t)

	cfg := quietConfig(t)
	one := 1
	cfg.Sandboxes = []StaticSandbox{{ID: "odd", Netns: sbNS.Path, QMP: qemu.path, Queues: &one}}
	s := serveDaemon(t, cfg, nil)
	eventually(t, "the first failed pass", func() bool { return s.d.status("odd").LastError != "" }, s.log.String)

	// The backoff schedule (10 ms doubling from the first failure) allows
	// about 9 passes in the first 3 s (at 0, 10, 30, 70, 150, 310, 630,
	// 1270 and 2550 ms after it): the window below starts at the first
	// failure, so it holds at most those. 20 leaves room for a slow machine
	// (a pass that starts late only delays the ones after it) and a stray
	// trigger or two, and is still far below the hundreds a second that
	// event-driven passes reach.
	const window, bound = 3 * time.Second, 20
	start := passes(t, s.d)
	deadline := time.Now().Add(window)
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // a counting window, not a wait for a condition
	}
	n := passes(t, s.d) - start
	t.Logf("%d passes in %s (%d garbage-answered commands); last error: %s", n, window, qemu.commands.Load(), s.d.status("odd").LastError)
	if n > bound {
		t.Errorf("%d passes in %s over a failing sandbox, want at most %d (its backoff schedule allows about 9)", n, window, bound)
	}
	if n == 0 {
		t.Errorf("no pass in %s: the failing sandbox is not retried", window)
	}
	// (c) the error names the misbehaving socket.
	if st := s.d.status("odd"); !strings.Contains(st.LastError, qemu.path) {
		t.Errorf("last error %q does not name the QMP socket %s", st.LastError, qemu.path)
	}
	// The failure shows once per distinct error (two here: the first
	// hot-add, then the retries that find the tap made), and once more at
	// the 8th failure, not per pass; it is counted under its cause.
	failed := strings.Count(s.log.String(), "pass failed; retried with backoff")
	if failed < 1 || failed > 3 {
		t.Errorf("%d failure log lines for %d passes, want 1 to 3; log:\n%s", failed, passes(t, s.d), s.log.String())
	}
	if got, total := errorsByCause(t, s.d, "qmp"), passes(t, s.d); got == 0 || got > total {
		t.Errorf("%d qmp errors counted for %d passes", got, total)
	}
}

// errorsByCause reads tapsync_reconcile_errors_total{cause}.
func errorsByCause(t *testing.T, d *daemon, cause string) uint64 {
	t.Helper()
	var m dto.Metric
	if err := d.m.reconcileErrors.WithLabelValues(cause).Write(&m); err != nil {
		t.Fatal(err)
	}
	return uint64(m.GetCounter().GetValue())
}

// A Kata sandbox without its extra monitor (Kata serves it only with
// enable_debug = true): the failure is logged with what Kata needs, its
// count and next attempt, and counted under qmp; when the monitor
// appears, the recovery is logged with the number of failures.
func TestMissingMonitorShowsAndRecovers(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tsmon")
	sock := filepath.Join(shortDir(t), "extra-monitor.sock")
	cfg := quietConfig(t)
	one := 1
	cfg.Sandboxes = []StaticSandbox{{ID: "nomon", Netns: ns.Path, QMP: sock, Queues: &one}}
	s := serveDaemon(t, cfg, nil)
	eventually(t, "the missing monitor logged", func() bool {
		return strings.Contains(s.log.String(), "pass failed; retried with backoff")
	}, s.log.String)
	line := ""
	for _, l := range strings.Split(s.log.String(), "\n") {
		if strings.Contains(l, "pass failed") {
			line = l
		}
	}
	for _, want := range []string{`"sandbox":"nomon"`, `"cause":"qmp"`, `"retries":1`, `"next_attempt"`, sock, `extra_monitor_socket = \"qmp\"`} {
		if !strings.Contains(line, want) {
			t.Errorf("failure line lacks %s: %s", want, line)
		}
	}
	if errorsByCause(t, s.d, "qmp") == 0 {
		t.Error("no qmp error counted")
	}
	startOddQEMUAt(t, sock) // an empty VM: nothing to plug, the pass succeeds
	eventually(t, "the recovery logged", func() bool {
		return strings.Contains(s.log.String(), "sandbox nomon reconciled after ")
	}, s.log.String)
	if n := strings.Count(s.log.String(), "pass failed"); n > 2 {
		t.Errorf("%d failure lines for one missing socket, want at most 2; log:\n%s", n, s.log.String())
	}
}
