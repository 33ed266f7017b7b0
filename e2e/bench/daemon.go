package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tapsync/tapsync/e2e/testproc"
)

// sandboxConf is one [[sandbox]] of the daemon's config; monitor is its
// `monitor` key ("": the default, QMP), agent its `agent_url` ("": none).
type sandboxConf struct{ id, netns, qmp, monitor, agent string }

// logLine is one line of the daemon's log, as B5 reads the passes.
type logLine struct {
	T       time.Time
	Message string
	Action  string  // an applied step's action ("plug-nic"); "" for other lines
	Latency float64 // a "converged" line's latency_ms: from the pass's first trigger
}

// daemon is one `tapsync run` process under measurement.
type daemon struct {
	bin, cfg, metrics, logPath string
	cmd                        *exec.Cmd
	exited                     chan struct{}

	mu        sync.Mutex
	converged chan float64 // latency_ms of "converged" log lines
	mutations int          // sum of "mutations" over log lines that carry it
	errors    int          // log lines at level error
	lines     []logLine    // every line since the last takeLines
}

// writeConfig writes the daemon's config: static sandboxes only, no
// containerd, no /proc discovery, metrics on a free loopback port, the
// operator's defaults otherwise.
func writeConfig(dir, stateDir string, sbs []sandboxConf) (cfg, metrics string, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", "", err
	}
	metrics = ln.Addr().String()
	ln.Close()
	var b strings.Builder
	fmt.Fprintf(&b, "state_dir = %q\nmetrics_address = %q\nlog_format = \"json\"\n[containerd]\nenabled = false\n[discovery]\nproc = false\n", stateDir, metrics)
	for _, s := range sbs {
		fmt.Fprintf(&b, "[[sandbox]]\nid = %q\nnetns = %q\nqmp = %q\n", s.id, s.netns, s.qmp)
		if s.monitor != "" {
			fmt.Fprintf(&b, "monitor = %q\n", s.monitor)
		}
		if s.agent != "" {
			fmt.Fprintf(&b, "agent_url = %q\n", s.agent)
		}
	}
	cfg = filepath.Join(dir, "config.toml")
	return cfg, metrics, os.WriteFile(cfg, []byte(b.String()), 0o600)
}

// startDaemon runs `tapsync run`; its log goes to logPath (appended) and
// is read for "converged" lines, mutations and errors on the way.
func startDaemon(bin, cfg, metrics, logPath string) (*daemon, error) {
	d := &daemon{bin: bin, cfg: cfg, metrics: metrics, logPath: logPath, exited: make(chan struct{}), converged: make(chan float64, 1024)}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	d.cmd = exec.Command(bin, "run", "--config", cfg)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	d.cmd.Stdout = logf
	if err := testproc.Start(d.cmd); err != nil { // dies with the bench
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		d.read(io.TeeReader(stderr, logf))
		_ = d.cmd.Wait()
		logf.Close()
		close(d.exited)
	}()
	return d, nil
}

func (d *daemon) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m struct {
			Time      string  `json:"time"`
			Level     string  `json:"level"`
			Message   string  `json:"message"`
			Action    string  `json:"action"`
			Latency   float64 `json:"latency_ms"`
			Mutations *int    `json:"mutations"`
		}
		if json.Unmarshal(sc.Bytes(), &m) != nil {
			continue
		}
		d.mu.Lock()
		if t, err := time.Parse(daemonTimeFormat, m.Time); err == nil && len(d.lines) < maxLogLines {
			d.lines = append(d.lines, logLine{T: t, Message: m.Message, Action: m.Action, Latency: m.Latency})
		}
		if m.Mutations != nil && m.Message != "converged" { // "converged" repeats the pass's count
			d.mutations += *m.Mutations
		}
		if m.Level == "error" {
			d.errors++
		}
		d.mu.Unlock()
		if m.Message == "converged" {
			select {
			case d.converged <- m.Latency:
			default:
			}
		}
	}
}

// daemonTimeFormat is the daemon's log time stamp (cmd/tapsync's
// logTimeFormat: milliseconds).
const daemonTimeFormat = "2006-01-02T15:04:05.000Z07:00"

// maxLogLines bounds the lines kept between two takeLines.
const maxLogLines = 100000

// takeLines returns the log lines read since the last call.
func (d *daemon) takeLines() []logLine {
	d.mu.Lock()
	defer d.mu.Unlock()
	l := d.lines
	d.lines = nil
	return l
}

// peekLines returns a copy of the log lines read since the last
// takeLines, leaving them.
func (d *daemon) peekLines() []logLine {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.lines)
}

// counts returns the mutations and error lines logged so far.
func (d *daemon) counts() (mutations, errs int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mutations, d.errors
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) signal(s syscall.Signal) error { return d.cmd.Process.Signal(s) }

// stop ends the daemon with SIGTERM (or kill's signal) and waits for it.
func (d *daemon) stop(sig syscall.Signal) {
	_ = d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

// scrape reads the daemon's /metrics into "name{labels}" → value.
// ready asks the daemon's /readyz whether its first full resync is done.
func (d *daemon) ready() (bool, string) {
	resp, err := httpClient.Get("http://" + d.metrics + "/readyz")
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode == http.StatusOK, strings.TrimSpace(string(b))
}

func (d *daemon) scrape() (map[string]float64, error) {
	resp, err := httpClient.Get("http://" + d.metrics + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			m[line[:i]] = v
		}
	}
	return m, sc.Err()
}

// procStats is what /proc says about a process.
type procStats struct {
	RSSKiB, HWMKiB int
	Threads        int
	FDs            int
	CPU            time.Duration // every thread's time on a CPU (schedstat), ns resolution
	Ticks          int           // utime+stime in clock ticks (stat)
}

func readProc(pid int) (procStats, error) {
	var s procStats
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "VmRSS:":
			s.RSSKiB = v
		case "VmHWM:":
			s.HWMKiB = v
		case "Threads:":
			s.Threads = v
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return s, err
	}
	s.FDs = len(fds)
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return s, err
	}
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue // the thread ended
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			ns, _ := strconv.ParseInt(f[0], 10, 64)
			s.CPU += time.Duration(ns)
		}
	}
	b, err = os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// Fields after the command name, which may hold spaces: state is
	// field 3, utime 14, stime 15.
	if i := strings.LastIndexByte(string(b), ')'); i > 0 {
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 12 {
			u, _ := strconv.Atoi(f[11])
			st, _ := strconv.Atoi(f[12])
			s.Ticks = u + st
		}
	}
	return s, nil
}

// machineCPU is the busy, stolen and total time of all CPUs (/proc/stat,
// ticks). Stolen time (the hypervisor running someone else on our CPUs)
// counts as busy: it is time no process here had.
func machineCPU() (busy, steal, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	// user nice system idle iowait irq softirq steal: guest and
	// guest_nice, after them, are counted in user and nice already.
	for i, v := range f[1:min(len(f), 9)] {
		n, _ := strconv.ParseUint(v, 10, 64)
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
		if i == 7 {
			steal = n
		}
	}
	return busy, steal, total
}

// phaseCPU is what a measured phase cost: the CPU time of the process
// under measurement (tapsync or the floor) and of every QEMU, and how busy
// the whole machine was meanwhile (other helpers' work included).
type phaseCPU struct {
	daemon  time.Duration
	qemu    time.Duration // every thread of every sandbox's QEMU (schedstat)
	machine float64       // percent of all CPUs
	steal   float64       // percent of all CPUs the hypervisor gave to others
}

// cpuMark is the start of a phase. pid may be 0 when the process under
// measurement starts with the phase (its CPU time starts at 0): set it
// before since.
type cpuMark struct {
	pid                int
	daemon             time.Duration
	qemus              []int
	qemu               time.Duration
	busy, steal, total uint64
}

func markCPU(pid int, qemus []int) cpuMark {
	m := cpuMark{pid: pid, qemus: qemus}
	if s, err := readProc(pid); pid != 0 && err == nil {
		m.daemon = s.CPU
	}
	m.qemu = schedTime(qemus)
	m.busy, m.steal, m.total = machineCPU()
	return m
}

func (m cpuMark) since() phaseCPU {
	n := markCPU(m.pid, m.qemus)
	p := phaseCPU{daemon: n.daemon - m.daemon, qemu: n.qemu - m.qemu}
	if n.total > m.total {
		p.machine = 100 * float64(n.busy-m.busy) / float64(n.total-m.total)
		p.steal = 100 * float64(n.steal-m.steal) / float64(n.total-m.total)
	}
	return p
}

// schedTime sums the time on a CPU of every thread of the processes
// (/proc/PID/task/*/schedstat, ns); a process or thread that is gone
// counts nothing.
func schedTime(pids []int) time.Duration {
	var sum time.Duration
	for _, pid := range pids {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			continue
		}
		for _, t := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
			if err != nil {
				continue
			}
			if f := strings.Fields(string(b)); len(f) > 0 {
				ns, _ := strconv.ParseInt(f[0], 10, 64)
				sum += time.Duration(ns)
			}
		}
	}
	return sum
}

func (p phaseCPU) String() string {
	return fmt.Sprintf("CPU: own %.0f ms, QEMUs %.0f ms; machine %.0f %% busy, %.0f %% stolen", ms(p.daemon), ms(p.qemu), p.machine, p.steal)
}
