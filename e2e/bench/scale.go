package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// statusEntry is the part of `tapsync status --json` the bench reads.
type statusEntry struct {
	ID            string     `json:"id"`
	LastReconcile *time.Time `json:"last_reconcile"`
	LastError     string     `json:"last_error"`
	Mutations     int        `json:"last_mutations"`
	Pending       []int      `json:"pending_removals"`
	Guest         string     `json:"guest"`
	Endpoints     []struct {
		Link     string `json:"link"`
		Removing bool   `json:"removing"`
		Guest    string `json:"guest"`
	} `json:"endpoints"`
}

// daemonStatus asks the daemon in stateDir for its status on its control
// socket, as `tapsync status --json` does, without a CLI process taking a
// CPU from the daemon each time the bench looks.
func daemonStatus(stateDir string) ([]statusEntry, error) {
	sock := filepath.Join(stateDir, "control.sock")
	c := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://tapsync/v1/status")
	if err != nil {
		return nil, fmt.Errorf("status on %s: %w", sock, err)
	}
	defer resp.Body.Close()
	var st []statusEntry
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("status on %s: %w", sock, err)
	}
	return st, nil
}

// allPassedSince: every sandbox has finished a pass after t0 without an
// error; it returns the latest pass end, the time the last of them was done.
func allPassedSince(st []statusEntry, n int, t0 time.Time) (time.Time, bool, string) {
	var last time.Time
	behind := 0
	for _, s := range st {
		if s.LastReconcile == nil || s.LastReconcile.Before(t0) || s.LastError != "" {
			behind++
			continue
		}
		if s.LastReconcile.After(last) {
			last = *s.LastReconcile
		}
	}
	return last, len(st) == n && behind == 0, fmt.Sprintf("%d of %d sandboxes listed, %d not passed since the start", len(st), n, behind)
}

// passesMetric counts the daemon's passes (the reconcile duration
// histogram's count).
const passesMetric = "tapsync_reconcile_duration_seconds_count"

// since is a scrape's samples less an earlier scrape's.
func since(m, m0 map[string]float64) map[string]float64 {
	d := make(map[string]float64, len(m))
	for k, v := range m {
		d[k] = v - m0[k]
	}
	return d
}

// triggersBySource lists the daemon's tapsync_triggers_total samples of a
// scrape as "source n" pairs, most first, leaving out those at 0.
func triggersBySource(m map[string]float64) string {
	type count struct {
		source string
		n      float64
	}
	var cs []count
	for k, v := range m {
		if src, ok := strings.CutPrefix(k, `tapsync_triggers_total{source="`); ok && v > 0 {
			cs = append(cs, count{strings.TrimSuffix(src, `"}`), v})
		}
	}
	slices.SortFunc(cs, func(a, b count) int { return cmp.Or(cmp.Compare(b.n, a.n), cmp.Compare(a.source, b.source)) })
	var out []string
	for _, c := range cs {
		out = append(out, fmt.Sprintf("%s %.0f", c.source, c.n))
	}
	return strings.Join(out, ", ")
}

// passEnds is when, after t0, the first, the median and the last
// sandbox finished its pass: how the resync spreads over its time.
func passEnds(st []statusEntry, t0 time.Time) [3]time.Duration {
	var d []time.Duration
	for _, s := range st {
		if s.LastReconcile != nil {
			d = append(d, s.LastReconcile.Sub(t0))
		}
	}
	if len(d) == 0 {
		return [3]time.Duration{}
	}
	slices.Sort(d)
	return [3]time.Duration{d[0], d[len(d)/2], d[len(d)-1]}
}

// scaleResult is B2–B4.
type scaleResult struct {
	n                                         int
	start                                     time.Duration // B3: daemon start → all 2N NICs answered by QEMU
	startQMP                                  map[string]int
	sighup                                    time.Duration // B2: SIGHUP → every sandbox passed
	sighupPasses                              float64
	sighupQMP                                 map[string]int
	sighupBusy                                time.Duration    // summed QEMU request→reply time during the resync
	sighupEnds                                [3]time.Duration // first, median and last pass end after the signal
	proc                                      procStats
	goroutines                                float64
	heapInuse, goSys                          float64       // go_memstats_heap_inuse_bytes, go_memstats_sys_bytes when converged
	settleTail                                time.Duration // from "quiet" to the first idle second
	idleCPU                                   float64       // percent of one CPU
	idleTicks                                 int
	idleWindow                                time.Duration
	storm                                     time.Duration // B3: first link add → all N third NICs answered
	stormInject                               time.Duration // the bench adding the N links
	restart                                   time.Duration // B4: exec → every sandbox passed
	restartMutations                          int           // logged by the daemon
	restartPasses                             float64       // passes the new daemon had made at the scrape after every sandbox passed
	restartTriggers                           string        // its triggers by source then: why it made those passes
	startCPURest, stormCPURest                time.Duration // the daemon's own CPU until it is at rest after the phase: its confirming passes too
	stormPasses                               float64       // passes from the storm's start to its last NIC
	stormTriggers                             string        // their triggers by source
	restartQMPMutations                       int           // mutating QMP commands QEMU received
	restartQMP                                map[string]int
	restartRounds                             []restartRound // -restart-rounds: more B4s, each side in turn
	startCPU, sighupCPU, stormCPU, restartCPU phaseCPU
	floor                                     *floorScale // nil with -skip-floor
}

// fleet is the N sandboxes of B2–B4.
type fleet []*sandbox

func (f fleet) pollTraces() error {
	for _, sb := range f {
		if err := sb.trace.poll(); err != nil {
			return err
		}
	}
	return nil
}

func (f fleet) qemuPids() []int {
	pids := make([]int, len(f))
	for i, sb := range f {
		pids[i] = sb.vm.Pid
	}
	return pids
}

// nicsSince: every QEMU answered `want` device_adds since t0; the latest
// answer is when the last NIC was present.
func (f fleet) nicsSince(t0 time.Time, want int) func() (bool, string, error) {
	return func() (bool, string, error) {
		if err := f.pollTraces(); err != nil {
			return false, "", err
		}
		behind := 0
		for _, sb := range f {
			if len(okReplies(sb.trace.after(t0), "device_add")) < want {
				behind++
			}
		}
		return behind == 0, fmt.Sprintf("%d sandboxes short of %d NICs", behind, want), nil
	}
}

// lastNIC is the time of the latest of the want-th device_add replies
// since t0.
func (f fleet) lastNIC(t0 time.Time, want int) time.Time {
	var last time.Time
	for _, sb := range f {
		if ts := okReplies(sb.trace.after(t0), "device_add"); len(ts) >= want && ts[want-1].After(last) {
			last = ts[want-1]
		}
	}
	return last
}

// qmpSince counts the QMP commands QEMUs received in [t0, t1] and sums
// their request→reply times.
func (f fleet) qmpSince(t0, t1 time.Time) (map[string]int, time.Duration) {
	n := map[string]int{}
	var busy time.Duration
	for _, sb := range f {
		var recs []qmpRecord
		for _, rec := range sb.trace.after(t0) {
			if rec.T.After(t1) {
				break
			}
			recs = append(recs, rec)
		}
		for k, v := range commandCounts(recs) {
			n[k] += v
		}
		busy += monitorBusy(recs)
	}
	return n, busy
}

// addLinks adds the container links eth0..eth<k-1> of sandbox i, their
// peers in peerNS.
func (f fleet) addLinks(i, k int, peerNS netns.NsHandle) error {
	for j := range k {
		if err := f[i].addLink(fmt.Sprintf("eth%d", j), testvm.TestMAC(1+j), fmt.Sprintf("p%d-%d", i, j), peerNS); err != nil {
			return err
		}
	}
	return nil
}

// scaleVM is a paused QEMU without guest OS: adds complete, unplugs never.
var scaleVM = testvm.Options{RootPorts: 1, MemoryMB: 16, Accel: "tcg"}

// runScale runs the floor's B3/B4 phases (unless -skip-floor), then
// tapsync's B2–B4, on the same N netns. The floor goes first: its NICs
// can never be unplugged from the paused QEMUs, so before tapsync every
// sandbox is renewed (new QEMU, links made again); tapsync's daemon, once
// started, stays until the end. One QEMU set exists at a time.
func runScale(ctx context.Context, cfg benchConfig, base string, peerNS netns.NsHandle) (r scaleResult, err error) {
	r.n = cfg.n
	sbs := make(fleet, cfg.n)
	defer func() {
		_ = parallel(len(sbs), 4, func(i int) error {
			if sbs[i] != nil {
				sbs[i].close()
			}
			return nil
		})
	}()
	started := time.Now()
	err = parallel(cfg.n, 4, func(i int) error {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		sb, err := newSandbox(sctx, fmt.Sprintf("sb%d", i), fmt.Sprintf("tsb%d-%d", os.Getpid(), i),
			filepath.Join(base, fmt.Sprint(i)), scaleVM)
		if err != nil {
			return err
		}
		sbs[i] = sb
		if err := sb.pauseAfterFirmware(sctx); err != nil {
			return err
		}
		return sbs.addLinks(i, 2, peerNS)
	})
	if err != nil {
		return r, err
	}
	fmt.Fprintf(os.Stderr, "bench: %d paused QEMUs with 2 links each ready in %v\n", cfg.n, time.Since(started).Round(time.Second))

	if !cfg.skipFloor {
		fl, err := runFloorScale(ctx, cfg, base, sbs, peerNS)
		if err != nil {
			return r, fmt.Errorf("floor: %w", err)
		}
		r.floor = &fl
		started = time.Now()
		err = parallel(cfg.n, 4, func(i int) error {
			sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			if err := sbs[i].renew(sctx, filepath.Join(base, fmt.Sprint(i), "t"), scaleVM); err != nil {
				return err
			}
			if err := sbs[i].pauseAfterFirmware(sctx); err != nil {
				return err
			}
			return sbs.addLinks(i, 2, peerNS)
		})
		if err != nil {
			return r, err
		}
		fmt.Fprintf(os.Stderr, "bench: %d sandboxes renewed for tapsync in %v\n", cfg.n, time.Since(started).Round(time.Second))
	}

	var confs []sandboxConf
	for _, sb := range sbs {
		confs = append(confs, sandboxConf{id: sb.id, netns: sb.path, qmp: sb.vm.QMP})
	}
	dir := filepath.Join(base, "scale")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return r, err
	}
	stateDir := filepath.Join(base, "state", "scale")
	conf, metrics, err := writeConfig(dir, stateDir, confs)
	if err != nil {
		return r, err
	}
	logPath := filepath.Join(dir, "daemon.log")
	quiet := func(wired int) error {
		return eventually(ctx, 5*time.Minute, 200*time.Millisecond, "daemon quiet", func() (bool, string, error) {
			m, err := d0scrape(metrics)
			if err != nil {
				return false, err.Error(), nil
			}
			w, q := m[`tapsync_endpoints{state="wired"}`], m["tapsync_queue_depth"]
			return int(w) == wired && q == 0, fmt.Sprintf("wired %v, queue %v", w, q), nil
		})
	}
	if err := sbs.pollTraces(); err != nil {
		return r, err
	}
	qemus := sbs.qemuPids()

	// B3: start.
	fmt.Fprintf(os.Stderr, "bench: B3 start (daemon log %s)\n", logPath)
	stopPerf := profilePhase("start")
	mark := markCPU(0, qemus)
	t0 := time.Now()
	d, err := startDaemon(cfg.tapsync, conf, metrics, logPath)
	if err != nil {
		return r, err
	}
	defer func() { d.stop(unix.SIGTERM) }()
	if err := eventually(ctx, 10*time.Minute, 50*time.Millisecond, "all 2N NICs after start", sbs.nicsSince(t0, 2)); err != nil {
		return r, err
	}
	mark.pid = d.pid()
	r.startCPU = mark.since()
	stopPerf()
	t1 := sbs.lastNIC(t0, 2)
	r.start = t1.Sub(t0)
	r.startQMP, _ = sbs.qmpSince(t0, t1)
	if err := quiet(2 * cfg.n); err != nil {
		return r, err
	}
	// At rest as the storm's figure is (no pass for 3 s): the queue's
	// depth leaves out a pass that is running.
	if err := atRest(ctx, metrics, 3*time.Second, 30*time.Second); err != nil {
		return r, err
	}
	if p, err := readProc(d.pid()); err == nil {
		r.startCPURest = p.CPU // from exec: its confirming passes too
	}

	// B2: SIGHUP no-op resync.
	fmt.Fprintf(os.Stderr, "bench: B3 start took %v; B2 SIGHUP\n", r.start)
	m0, err := d.scrape()
	if err != nil {
		return r, err
	}
	_ = sbs.pollTraces()
	stopPerf = profilePhase("sighup")
	mark = markCPU(d.pid(), qemus)
	t0 = time.Now()
	if err := d.signal(unix.SIGHUP); err != nil {
		return r, err
	}
	var t1b time.Time
	if err := eventually(ctx, 5*time.Minute, 100*time.Millisecond, "every sandbox passed after SIGHUP", func() (bool, string, error) {
		st, err := daemonStatus(stateDir)
		if err != nil {
			return false, err.Error(), nil
		}
		last, ok, why := allPassedSince(st, cfg.n, t0)
		t1b = last
		if ok {
			r.sighupEnds = passEnds(st, t0)
		}
		return ok, why, nil
	}); err != nil {
		return r, err
	}
	r.sighupCPU = mark.since()
	stopPerf()
	r.sighup = t1b.Sub(t0)
	m1, err := d.scrape()
	if err != nil {
		return r, err
	}
	r.sighupPasses = m1[passesMetric] - m0[passesMetric]
	_ = sbs.pollTraces()
	r.sighupQMP, r.sighupBusy = sbs.qmpSince(t0, t1b)

	// B2: resources and idle CPU, converged.
	fmt.Fprintf(os.Stderr, "bench: B2 SIGHUP took %v; idle for %v\n", r.sighup, cfg.idle)
	if err := quiet(2 * cfg.n); err != nil {
		return r, err
	}
	m2, err := d.scrape()
	if err != nil {
		return r, err
	}
	// The resync's tail (its last passes, the status and metrics answers
	// the bench asked for, the garbage collection after them) runs on for
	// a few seconds; the idle window starts once settleSeconds whole
	// seconds in a row have passed with under a millisecond of CPU each,
	// so that it measures what wakes a converged daemon, not the end of
	// the work before.
	settled, err := settle(d.pid(), 30*time.Second)
	if err != nil {
		return r, err
	}
	r.settleTail = settled
	r.goroutines = m2["go_goroutines"]
	r.heapInuse, r.goSys = m2["go_memstats_heap_inuse_bytes"], m2["go_memstats_sys_bytes"]
	s0, err := readProc(d.pid())
	if err != nil {
		return r, err
	}
	r.idleWindow = cfg.idle
	time.Sleep(cfg.idle) // the measurement window itself, not a wait for something
	s1, err := readProc(d.pid())
	if err != nil {
		return r, err
	}
	r.proc = s1
	r.idleCPU = 100 * float64(s1.CPU-s0.CPU) / float64(cfg.idle)
	r.idleTicks = s1.Ticks - s0.Ticks
	if perfDir != "" {
		// One SIGHUP resync is a few tens of ms, too few samples for a
		// profile: profile ten in a row instead.
		stop := profilePhase("sighup-loop")
		for range 10 {
			if err := d.signal(unix.SIGHUP); err != nil {
				return r, err
			}
			time.Sleep(500 * time.Millisecond) // spacing of the signals, not a wait for something
		}
		stop()
		if err := quiet(2 * cfg.n); err != nil {
			return r, err
		}
	}

	// B3: storm, a third link in every sandbox at once.
	fmt.Fprintf(os.Stderr, "bench: B3 storm\n")
	_ = sbs.pollTraces()
	mStorm, err := d.scrape()
	if err != nil {
		return r, err
	}
	stopPerf = profilePhase("storm")
	mark = markCPU(d.pid(), qemus)
	stormMark := mark
	t0 = time.Now()
	if err := sbs.addThird(peerNS); err != nil {
		return r, err
	}
	r.stormInject = time.Since(t0)
	if err := eventually(ctx, 10*time.Minute, 50*time.Millisecond, "every third NIC", sbs.nicsSince(t0, 1)); err != nil {
		return r, err
	}
	r.stormCPU = mark.since()
	stopPerf()
	if m, err := d.scrape(); err == nil {
		r.stormPasses = m[passesMetric] - mStorm[passesMetric]
		r.stormTriggers = triggersBySource(since(m, mStorm))
	}
	r.storm = sbs.lastNIC(t0, 1).Sub(t0)
	if err := quiet(3 * cfg.n); err != nil {
		return r, err
	}
	// The storm's links finish IPv6 duplicate address detection a second
	// or two after they came up, and each such address event is a pass:
	// B4 restarts a node at rest, so it waits until no pass has run for
	// 3 s (at most 30 s).
	if err := atRest(ctx, metrics, 3*time.Second, 30*time.Second); err != nil {
		return r, err
	}
	r.stormCPURest = stormMark.since().daemon

	// B4: SIGKILL and restart.
	fmt.Fprintf(os.Stderr, "bench: B3 storm took %v; B4 SIGKILL and restart\n", r.storm)
	// restart kills the daemon and starts it again: exec → the last pass
	// end among the sandboxes' first passes, and the CPU of that phase.
	restart := func(phase string) (t0 time.Time, _ time.Duration, _ phaseCPU, _ error) {
		d.stop(unix.SIGKILL)
		_ = sbs.pollTraces()
		stopPerf := profilePhase(phase)
		defer stopPerf()
		mark := markCPU(0, qemus)
		t0 = time.Now()
		var err error
		d, err = startDaemon(cfg.tapsync, conf, metrics, logPath)
		if err != nil {
			return t0, 0, phaseCPU{}, err
		}
		var t1 time.Time
		// The daemon is asked whether it is ready (/readyz, a few bytes)
		// until it is, and only then for every sandbox's status: the
		// status of 250 sandboxes every 50 ms cost the daemon ~5 % of its
		// restart CPU, a load the floor, which prints when it is done,
		// does not bear.
		if err := eventually(ctx, 5*time.Minute, 50*time.Millisecond, "every sandbox verified after restart", func() (bool, string, error) {
			if ok, why := d.ready(); !ok {
				return false, why, nil
			}
			st, err := daemonStatus(stateDir)
			if err != nil {
				return false, err.Error(), nil
			}
			last, ok, why := allPassedSince(st, cfg.n, t0)
			t1 = last
			return ok, why, nil
		}); err != nil {
			return t0, 0, phaseCPU{}, err
		}
		mark.pid = d.pid()
		return t0, t1.Sub(t0), mark.since(), nil
	}
	// t0, exec of the new daemon, starts the window of its QMP commands.
	if t0, r.restart, r.restartCPU, err = restart("restart"); err != nil {
		return r, err
	}
	m, err := d.scrape()
	if err != nil {
		return r, err
	}
	r.restartPasses = m[passesMetric]
	r.restartTriggers = triggersBySource(m)
	if err := quiet(3 * cfg.n); err != nil {
		return r, err
	}
	r.restartMutations, _ = d.counts() // the new daemon's own log
	_ = sbs.pollTraces()
	r.restartQMP, _ = sbs.qmpSince(t0, time.Now())
	r.restartQMPMutations = mutations(r.restartQMP)

	// More restarts, each side in turn on the same wired node: one
	// restart moves by tens of percent from run to run on this machine,
	// their median much less.
	if r.floor == nil || cfg.restartRounds == 0 {
		return r, nil
	}
	list, err := writeFloorList(dir, sbs) // the QEMUs renewed for tapsync
	if err != nil {
		return r, err
	}
	for i := range cfg.restartRounds {
		fmt.Fprintf(os.Stderr, "bench: B4 in turn, round %d of %d\n", i+1, cfg.restartRounds)
		var round restartRound
		phase := fmt.Sprintf("-%d", i+2)
		floor := func(name string, res *time.Duration, cpu *phaseCPU, extra ...string) func() error {
			return func() (err error) {
				d.stop(unix.SIGKILL) // a QMP socket serves one client
				*res, *cpu, _, err = floorVerify(cfg, list, sbs, qemus, name+phase, extra...)
				return err
			}
		}
		steps := []func() error{
			floor("floor-restart", &round.floor, &round.floorCPU),
			floor("floor-restart-datapath", &round.floorDatapath, &round.floorDatapathCPU, "-verify-datapath"),
			func() (err error) {
				if _, round.tapsync, round.tapsyncCPU, err = restart("restart" + phase); err != nil {
					return err
				}
				return quiet(3 * cfg.n)
			},
		}
		// Each round starts with the next side, so that none always
		// follows the same one (whose sweep over every netns and socket
		// leaves the caches warm or cold for the next).
		for k := range steps {
			if err := steps[(i+k)%len(steps)](); err != nil {
				return r, err
			}
		}
		r.restartRounds = append(r.restartRounds, round)
	}
	return r, nil
}

// restartRound is one more B4 of each side, in turn (-restart-rounds).
type restartRound struct {
	tapsync, floor, floorDatapath          time.Duration
	tapsyncCPU, floorCPU, floorDatapathCPU phaseCPU
}

// addThird adds eth2 in every sandbox, one after another.
func (f fleet) addThird(peerNS netns.NsHandle) error {
	for i, sb := range f {
		if err := sb.addLink("eth2", testvm.TestMAC(3), fmt.Sprintf("p%d-2", i), peerNS); err != nil {
			return err
		}
	}
	return nil
}

// mutations counts the mutating commands among counts.
func mutations(counts map[string]int) int {
	n := 0
	for k, v := range counts {
		if mutating[k] {
			n += v
		}
	}
	return n
}

// atRest waits until the daemon at metrics has made no pass for rest, or
// gives up after limit (the restart is then measured all the same).
func atRest(ctx context.Context, metrics string, rest, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	last, since := -1.0, time.Now()
	for time.Now().Before(deadline) {
		m, err := d0scrape(metrics)
		if err != nil {
			return fmt.Errorf("waiting for the daemon at rest: %w", err)
		}
		if n := m[passesMetric]; n != last {
			last, since = n, time.Now()
		} else if time.Since(since) >= rest {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond): // polling interval
		}
	}
	fmt.Fprintf(os.Stderr, "bench: the daemon still made passes after %v; restarting it all the same\n", limit)
	return nil
}

// d0scrape scrapes a metrics address without a daemon handle.
func d0scrape(addr string) (map[string]float64, error) { return (&daemon{metrics: addr}).scrape() }

// perSandbox formats command counts divided by n, largest first.
func perSandbox(counts map[string]int, n int) string {
	type kv struct {
		k string
		v int
	}
	var kvs []kv
	total := 0
	for k, v := range counts {
		kvs = append(kvs, kv{k, v})
		total += v
	}
	sort.Slice(kvs, func(i, j int) bool { return kvs[i].v > kvs[j].v || kvs[i].v == kvs[j].v && kvs[i].k < kvs[j].k })
	var parts []string
	for _, e := range kvs {
		parts = append(parts, fmt.Sprintf("%s %.3g", e.k, float64(e.v)/float64(n)))
	}
	return fmt.Sprintf("%.3g: %s", float64(total)/float64(n), strings.Join(slices.Clip(parts), ", "))
}

// settle waits, up to limit, for settleSeconds seconds in a row in each
// of which process pid runs under a millisecond, and returns how long that
// took (limit if never).
func settle(pid int, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	prev, err := readProc(pid)
	if err != nil {
		return 0, err
	}
	quiet := 0
	for time.Since(start) < limit {
		time.Sleep(time.Second) // the sampling interval itself
		cur, err := readProc(pid)
		if err != nil {
			return 0, err
		}
		if cur.CPU-prev.CPU >= time.Millisecond {
			quiet = 0
		} else if quiet++; quiet == settleSeconds {
			return time.Since(start), nil
		}
		prev = cur
	}
	return limit, nil
}

// settleSeconds is how many seconds in a row the daemon must run under a
// millisecond for the idle window to begin. One was not enough once the
// resync got short: its tail (seen: 20–50 ms within 3 s, then nothing in
// 30 s) came after a first quiet second.
const settleSeconds = 3
