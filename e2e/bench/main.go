// Command tapsync-bench is issue 9's measurement: it prints one table of
// what tapsync costs next to the floor of its design, and its goal.
//
//   - B1 / B1': a link appears in (is deleted from) a sandbox netns → the
//     virtio-net device is answered by QEMU (netdev and tap are gone, less
//     the guest's ACPI acknowledgement), for tapsync (the daemon binary)
//     and for tapsync-floor (e2e/bench/floor: the same datapath primitives
//     and the three QMP commands, connections already open), over QMP and
//     over HMP (QEMU's human monitor, as Kata's runtime-rs serves it), and
//     over the QMP socket tapsync-qemu (cmd/tapsync-qemu) adds to a VM
//     started through it, the only monitor the wirer is given there, in
//     rounds that rotate their order, each on its own sandbox with a
//     booted TCG guest.
//   - B5: time to a usable network (b5.go): a real CNI ADD of a second
//     network into a running sandbox, wired by tapsync (with the guest's
//     agent) or by the floor's B5 mode, until the guest interface has its
//     address and answers a ping, and where that time goes in QEMU, the
//     guest kernel, the guest agent and tapsync's passes.
//   - B2–B4: N sandboxes with paused QEMUs (-m 16, no guest OS) and two
//     links each: daemon start, a SIGHUP resync, memory, goroutines, fds,
//     idle CPU, a storm of a third link everywhere, SIGKILL and restart.
//     B3 and B4 also for the floor's scale mode (the same work with a
//     worker pool and nothing else), first, on the same netns; each phase
//     with the CPU time of the process and of every QEMU.
//
// Times come from timestamps, never from when the bench noticed: QEMU
// traces every QMP command and reply with wall-clock microseconds
// (-trace handle_qmp_command,monitor_qmp_respond; for HMP
// handle_hmp_command,monitor_suspend, and acpi_pci_eject_slot for the
// guest's unplug acknowledgement; for B5 the guest's accesses to the
// ACPI hot-plug registers), the daemon's status gives each sandbox's
// last pass end, and B5's guest agent keeps a timeline on the guest's
// clock, whose skew to the host's the bench measures each round. The
// bench polls only to know when to look. It is a measurement, not a test: nothing is asserted. Run it as
// root (`make bench`).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

type benchConfig struct {
	n, rounds        int
	idle             time.Duration
	tapsync, floor   string
	wrapper          string // tapsync-qemu
	skipB1, skipScal bool
	skipFloor        bool
	skipHMP          bool
	skipWrapper      bool
	skipB5           bool
	b5Rounds         int
	restartRounds    int // more B4s, each side in turn
}

// perQEMU is the memory budgeted per paused QEMU (measured RSS ≈ 38 MB,
// plus page tables and the kernel's share).
const perQEMU = 48 << 20

var keep bool

func main() {
	var cfg benchConfig
	flag.IntVar(&cfg.n, "n", 250, "sandboxes for B2–B4 (lowered to what free memory allows)")
	flag.IntVar(&cfg.rounds, "rounds", 20, "B1 add/remove rounds per wirer")
	flag.DurationVar(&cfg.idle, "idle", 10*time.Second, "window for the idle CPU measurement")
	flag.IntVar(&cfg.restartRounds, "restart-rounds", 4, "B4 restarts of each side in turn after the first (their medians are a row of their own; 0: none)")
	flag.StringVar(&cfg.tapsync, "tapsync", "bin/tapsync", "tapsync binary")
	flag.StringVar(&cfg.floor, "floor", "bin/tapsync-floor", "floor binary (e2e/bench/floor)")
	flag.StringVar(&cfg.wrapper, "tapsync-qemu", "bin/tapsync-qemu", "QEMU wrapper binary (cmd/tapsync-qemu), for B1 through its socket")
	flag.BoolVar(&cfg.skipB1, "skip-b1", false, "skip B1/B1'")
	flag.BoolVar(&cfg.skipHMP, "skip-hmp", false, "skip B1/B1' over HMP")
	flag.BoolVar(&cfg.skipWrapper, "skip-wrapper", false, "skip B1/B1' through tapsync-qemu's socket")
	flag.BoolVar(&cfg.skipScal, "skip-scale", false, "skip B2–B4")
	flag.BoolVar(&cfg.skipB5, "skip-b5", false, "skip B5 (time to a usable network)")
	flag.IntVar(&cfg.b5Rounds, "b5-rounds", b5Rounds, "B5 rounds (CNI ADD and DEL of a second network) per wirer")
	flag.BoolVar(&verbose, "b5-verbose", false, "print each B5 round's timeline on stderr")
	flag.BoolVar(&cfg.skipFloor, "skip-floor", false, "skip the floor's B3/B4 (tapsync's rows only)")
	flag.BoolVar(&keep, "keep", false, "keep the work dir (daemon logs, QEMU traces)")
	flag.StringVar(&perfDir, "perf", "", "record each scale phase with `perf record -a -g` into this dir")
	flag.IntVar(&perfFreq, "perf-freq", perfFreq, "perf's sampling rate in Hz, with -perf")
	flag.Parse()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg benchConfig) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: network namespaces, taps, QEMU")
	}
	for _, b := range []*string{&cfg.tapsync, &cfg.floor, &cfg.wrapper} {
		abs, err := filepath.Abs(*b)
		if err != nil {
			return err
		}
		*b = abs
	}
	avail, err := memAvailable()
	if err != nil {
		return err
	}
	if fit := int((avail - 3<<30) / perQEMU); cfg.n > fit {
		fmt.Fprintf(os.Stderr, "bench: %d MiB available: N lowered from %d to %d (about %d MiB per paused QEMU, 3 GiB kept free)\n",
			avail>>20, cfg.n, max(fit, 1), perQEMU>>20)
		cfg.n = max(fit, 1)
	}
	machine := describeMachine()
	load0 := loadavg()

	// Short paths: QEMU's sockets live under base and sun_path is 108 bytes.
	base, err := os.MkdirTemp("/tmp", "tsb")
	if err != nil {
		return err
	}
	if keep {
		fmt.Fprintf(os.Stderr, "bench: logs and traces stay in %s\n", base)
	} else {
		defer os.RemoveAll(base)
	}
	// The state dir on tmpfs, as /run is on a systemd node.
	state := filepath.Join(base, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		return err
	}
	if err := sh("mount", "-t", "tmpfs", "-o", "mode=0700,size=64m", "tsb-state", state); err != nil {
		return err
	}
	defer sh("umount", state)
	peerName := fmt.Sprintf("tsb%d-peer", os.Getpid())
	_, peerNS, err := newNetns(peerName)
	if err != nil {
		return err
	}
	defer func() { peerNS.Close(); _ = sh("ip", "netns", "del", peerName) }()

	var b1 b1Set
	if !cfg.skipB1 {
		fmt.Fprintf(os.Stderr, "bench: B1/B1', %d rounds\n", cfg.rounds)
		if b1, err = runB1(ctx, cfg, base, peerNS); err != nil {
			return err
		}
	}
	var b5 b5Pair
	if !cfg.skipB5 {
		fmt.Fprintf(os.Stderr, "bench: B5, %d rounds\n", cfg.b5Rounds)
		if b5, err = runB5(ctx, cfg, base); err != nil {
			return err
		}
	}
	var sc scaleResult
	if !cfg.skipScal {
		fmt.Fprintf(os.Stderr, "bench: B2–B4 with N=%d\n", cfg.n)
		if sc, err = runScale(ctx, cfg, base, peerNS); err != nil {
			return err
		}
	}
	printReport(os.Stdout, cfg, machine, load0, loadavg(), b1, b5, sc)
	return nil
}

func printReport(out io.Writer, cfg benchConfig, machine, load0, load1 string, b1 b1Set, b5 b5Pair, sc scaleResult) {
	fmt.Fprintf(out, "tapsync bench, %s\n\n%s\nload average before/after: %s / %s\n\n", time.Now().Format(time.DateTime), machine, load0, load1)
	fmt.Fprintln(out, "| measure | value | goal |")
	fmt.Fprintln(out, "|---|---|---|")
	row := func(m, v, g string) { fmt.Fprintf(out, "| %s | %s | %s |\n", m, v, g) }
	ratio := func(a, b float64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f×", a/b)
	}
	if !cfg.skipB1 {
		printQMP(row, ratio, b1.qmp)
		if !cfg.skipHMP {
			printHMP(row, ratio, b1.qmp, b1.hmp)
		}
		if !cfg.skipWrapper {
			printWrapper(row, ratio, b1.qmp, b1.wrapper)
		}
	}
	if !cfg.skipB5 {
		printB5(row, ratio, b5)
	}
	if !cfg.skipScal {
		n := sc.n
		row(fmt.Sprintf("B2: %d sandboxes × 2 links, SIGHUP → every sandbox passed", n),
			fmt.Sprintf("**%.0f ms** (%.0f passes, ended from %.0f ms, half by %.0f ms; %s)", ms(sc.sighup), sc.sighupPasses,
				ms(sc.sighupEnds[0]), ms(sc.sighupEnds[1]), sc.sighupCPU), "≤ 200 ms")
		row("B2: QMP commands per sandbox in that resync", perSandbox(sc.sighupQMP, n)+
			fmt.Sprintf("; QEMU busy answering %.2f ms per sandbox", ms(sc.sighupBusy)/float64(n)), "few, if any")
		row("B2: daemon RSS / goroutines / fds / threads",
			fmt.Sprintf("**%.1f MiB** (peak %.1f; Go heap in use %.1f MiB, runtime total %.1f MiB) / %.0f (%.1f per sandbox) / %d / %d",
				float64(sc.proc.RSSKiB)/1024, float64(sc.proc.HWMKiB)/1024, sc.heapInuse/(1<<20), sc.goSys/(1<<20),
				sc.goroutines, sc.goroutines/float64(n), sc.proc.FDs, sc.proc.Threads),
			"≤ 40 MiB, ≤ 2 goroutines per sandbox")
		row(fmt.Sprintf("B2: idle CPU of the daemon, converged (%v window)", sc.idleWindow),
			fmt.Sprintf("**%.3f %%** (%d ticks), from %d idle seconds in a row after the resync (%.0f s after it)", sc.idleCPU, sc.idleTicks, settleSeconds, sc.settleTail.Seconds()), "≤ 0.1 %")
		// The floor's figures, zero with -skip-floor (then not shown).
		var f floorScale
		floor := sc.floor != nil
		if floor {
			f = *sc.floor
		}
		vs := func(t, fl time.Duration, tc, fc phaseCPU) string {
			if !floor {
				return fmt.Sprintf("**%.0f ms** (%s)", ms(t), tc)
			}
			return fmt.Sprintf("tapsync **%.0f ms**, floor %.0f ms: **%s** (tapsync %s; floor %s)", ms(t), ms(fl), ratio(ms(t), ms(fl)), tc, fc)
		}
		cmds := func(t, fl map[string]int) string {
			if !floor {
				return perSandbox(t, n)
			}
			return "tapsync " + perSandbox(t, n) + "; floor " + perSandbox(fl, n)
		}
		row(fmt.Sprintf("B3: daemon start, %d sandboxes → all %d NICs answered", n, 2*n),
			vs(sc.start, f.start, sc.startCPU, f.startCPU)+fmt.Sprintf("; tapsync's own CPU until at rest %.0f ms", ms(sc.startCPURest)), "≤ 1.5 s")
		row("B3: QMP commands per sandbox during start", cmds(sc.startQMP, f.startQMP), "-")
		inject := fmt.Sprintf("; the bench took %.0f ms to add the links", ms(sc.stormInject))
		if floor {
			inject = fmt.Sprintf("; the bench took %.0f / %.0f ms to add the links", ms(sc.stormInject), ms(f.stormInject))
		}
		row(fmt.Sprintf("B3: storm, a third link in all %d → all present", n),
			vs(sc.storm, f.storm, sc.stormCPU, f.stormCPU)+inject+
				fmt.Sprintf("; %.0f passes (triggers: %s); tapsync's own CPU until at rest %.0f ms", sc.stormPasses, sc.stormTriggers, ms(sc.stormCPURest)), "≤ 1 s")
		mut := fmt.Sprintf("; %.0f passes (triggers: %s); mutations: %d logged, %d mutating QMP commands", sc.restartPasses, sc.restartTriggers, sc.restartMutations, sc.restartQMPMutations)
		if floor {
			mut += fmt.Sprintf(" (floor: %d)", f.restartQMPMutations)
		}
		row("B4: SIGKILL + restart → every sandbox verified",
			vs(sc.restart, f.restart, sc.restartCPU, f.restartCPU)+mut,
			"≤ 500 ms, 0 mutations")
		if floor {
			// The floor above neither checks a redirect nor hears an
			// event: tapsync must do both before it says a sandbox is
			// verified (docs/benchmarks.md, B4).
			row("B4: the same against a floor that also checks each endpoint's redirects and subscribes to every netns's link events",
				vs(sc.restart, f.restartDatapath, sc.restartCPU, f.restartDatapathCPU), "≤ 1.0× the floor")
		}
		if rs := sc.restartRounds; floor && len(rs) > 0 {
			row(fmt.Sprintf("B4: %d more restarts, each side in turn (medians)", len(rs)), restartRoundsText(rs), "≤ 1.0× the floor")
		}
		row("B4: QMP commands per sandbox in the restart pass", cmds(sc.restartQMP, f.restartQMP), "-")
		// What bounds B3/B4: QEMU's own CPU time, spread over every core,
		// is the least wall time the phase can take whoever drives it.
		var bound []string
		for _, p := range []struct {
			name   string
			t, fl  phaseCPU
			perNIC int // NICs added per sandbox in the phase
		}{{"start", sc.startCPU, f.startCPU, 2}, {"storm", sc.stormCPU, f.stormCPU, 1}, {"restart", sc.restartCPU, f.restartCPU, 0}} {
			per := func(c phaseCPU) string {
				if p.perNIC == 0 {
					return fmt.Sprintf("%.2f ms per sandbox", ms(c.qemu)/float64(n))
				}
				return fmt.Sprintf("%.2f ms per NIC", ms(c.qemu)/float64(n*p.perNIC))
			}
			cores := float64(runtime.NumCPU())
			s := fmt.Sprintf("%s: tapsync %s → %.0f ms", p.name, per(p.t), ms(p.t.qemu)/cores)
			if floor {
				s += fmt.Sprintf(", floor %s → %.0f ms", per(p.fl), ms(p.fl.qemu)/cores)
			}
			bound = append(bound, s)
		}
		row(fmt.Sprintf("B3/B4 bound: QEMU CPU time, and that ÷ %d cores (the least wall time for QEMU's share alone)", runtime.NumCPU()),
			strings.Join(bound, "; "), "-")
		if floor {
			row("floor at scale", fmt.Sprintf("%d workers; one netlink socket with NETLINK_LISTEN_ALL_NSID for every netns; B4: qom-list /machine/peripheral and one link dump per sandbox", floorWorkers), "-")
		}
	}
}

// b1Rows is how one monitor's B1 and B1' rows read; printB1 prints them.
type b1Rows struct {
	add, remove string // the rows' measures begin with these: "B1", "B1' remove via HMP"
	// addNote follows the ratio in an add row at quantile p, where a and b
	// are tapsync's and the floor's add; nil for nothing.
	addNote func(p, a, b float64) string
	// removeNote is said in parentheses after the ratio in a removal row.
	removeNote func(p float64) string
	afterAdd   func(row func(m, v, g string)) // rows between the add's and the removal's; nil for none
	after      func(row func(m, v, g string)) // rows after the removal's
}

// printB1 prints B1 (p50, p90) and B1' (p50, p90) over one monitor, then
// that monitor's own rows.
func printB1(row func(m, v, g string), ratio func(a, b float64) string, r b1Pair, rs b1Rows) {
	t, f := r.tapsync, r.floor
	type at struct {
		name string
		p    float64
		goal string
	}
	for _, p := range []at{{"p50", 0.5, "≤ 1.2× the floor"}, {"p90", 0.9, "≤ 1.5× the floor"}} {
		a, b := quantile(t.add, p.p), quantile(f.add, p.p)
		v := fmt.Sprintf("tapsync %.1f ms, floor %.1f ms: **%s**", a, b, ratio(a, b))
		if rs.addNote != nil {
			v += rs.addNote(p.p, a, b)
		}
		row(fmt.Sprintf("%s: link appears → device_add answered, %s (%d rounds)", rs.add, p.name, len(t.add)), v, p.goal)
	}
	if rs.afterAdd != nil {
		rs.afterAdd(row)
	}
	for _, p := range []at{{"p50", 0.5, "≤ 1.2× the floor"}, {"p90", 0.9, "-"}} {
		a, b := quantile(t.remove, p.p), quantile(f.remove, p.p)
		row(fmt.Sprintf("%s: link deleted → netdev deleted and tap gone, less the guest's unplug ack, %s", rs.remove, p.name),
			fmt.Sprintf("tapsync %.1f ms, floor %.1f ms: **%s** (%s)", a, b, ratio(a, b), rs.removeNote(p.p)), p.goal)
	}
	rs.after(row)
}

// qmpRemoval is a removal over QMP in its parts, at quantile p.
func qmpRemoval(t, f b1Result, p float64) string {
	return fmt.Sprintf("deletion → device_del received %.1f / %.1f ms, DEVICE_DELETED → done %.1f / %.1f ms; guest ack %.1f / %.1f ms, left out",
		quantile(t.toAsk, p), quantile(f.toAsk, p), quantile(t.afterAck, p), quantile(f.afterAck, p),
		quantile(t.ack, p), quantile(f.ack, p))
}

// monitorCommands prints the monitor commands per add and per remove.
func monitorCommands(row func(m, v, g string), monitor string, t, f b1Result) {
	n := float64(len(t.add))
	row(fmt.Sprintf("B1 %s commands per add (tapsync / floor)", monitor), fmt.Sprintf("%s / %s", perRound(t.cmdsAdd, n), perRound(f.cmdsAdd, n)), "-")
	row(fmt.Sprintf("B1' %s commands per remove (tapsync / floor)", monitor), fmt.Sprintf("%s / %s", perRound(t.cmdsRemove, n), perRound(f.cmdsRemove, n)), "-")
}

// printQMP prints B1 and B1' over the QMP socket on QEMU's command line.
func printQMP(row func(m, v, g string), ratio func(a, b float64) string, q b1Pair) {
	t, f := q.tapsync, q.floor
	printB1(row, ratio, q, b1Rows{
		add:        "B1",
		remove:     "B1'",
		removeNote: func(p float64) string { return qmpRemoval(t, f, p) },
		after:      func(row func(m, v, g string)) { monitorCommands(row, "QMP", t, f) },
	})
}

// printHMP prints B1 and B1' over HMP, with QMP's figures beside them.
func printHMP(row func(m, v, g string), ratio func(a, b float64) string, q, h b1Pair) {
	t, f := h.tapsync, h.floor
	printB1(row, ratio, h, b1Rows{
		add:    "B1 add via HMP",
		remove: "B1' remove via HMP",
		addNote: func(p, a, b float64) string {
			qa, qb := quantile(q.tapsync.add, p), quantile(q.floor.add, p)
			return fmt.Sprintf(" (over QMP %.1f / %.1f ms: HMP costs tapsync %+.1f ms, the floor %+.1f ms)", qa, qb, a-qa, b-qb)
		},
		afterAdd: func(row func(m, v, g string)) {
			row("B1 add: QEMU executing the add's commands / between them (the client's turn; over HMP QEMU reading and echoing the next line), p50",
				fmt.Sprintf("QMP: tapsync %.2f / %.2f ms, floor %.2f / %.2f ms; HMP: tapsync %.2f / %.2f ms, floor %.2f / %.2f ms",
					quantile(q.tapsync.busy, 0.5), quantile(q.tapsync.between, 0.5), quantile(q.floor.busy, 0.5), quantile(q.floor.between, 0.5),
					quantile(t.busy, 0.5), quantile(t.between, 0.5), quantile(f.busy, 0.5), quantile(f.between, 0.5)), "-")
		},
		removeNote: func(p float64) string {
			return fmt.Sprintf("over QMP %.1f / %.1f ms; deletion → device_del received %.1f / %.1f ms, "+
				"ACPI eject → done %.1f / %.1f ms, of it eject → the qom-get that found the device gone %.1f / %.1f ms; "+
				"guest ack, device_del → eject, %.1f / %.1f ms, left out; the whole removal, guest included, %.1f / %.1f ms, over QMP %.1f / %.1f ms",
				quantile(q.tapsync.remove, p), quantile(q.floor.remove, p),
				quantile(t.toAsk, p), quantile(f.toAsk, p), quantile(t.afterAck, p), quantile(f.afterAck, p),
				quantile(t.pollLag, p), quantile(f.pollLag, p), quantile(t.ack, p), quantile(f.ack, p),
				quantile(t.whole, p), quantile(f.whole, p), quantile(q.tapsync.whole, p), quantile(q.floor.whole, p))
		},
		after: func(row func(m, v, g string)) {
			monitorCommands(row, "HMP", t, f)
			lead := append(slices.Clone(q.tapsync.ejectLead), q.floor.ejectLead...)
			row("B1' over QMP: ACPI eject (the guest's ack, HMP's mark) → DEVICE_DELETED (QEMU finalized the device), p50 / max",
				fmt.Sprintf("%.1f / %.1f ms (%d removals)", quantile(lead, 0.5), quantile(lead, 1), len(lead)), "-")
		},
	})
}

// printWrapper prints B1 and B1' over tapsync-qemu's QMP socket, with
// the figures over the QMP socket on QEMU's own command line beside them.
func printWrapper(row func(m, v, g string), ratio func(a, b float64) string, q, w b1Pair) {
	t, f := w.tapsync, w.floor
	printB1(row, ratio, w, b1Rows{
		add:    "B1 add via tapsync-qemu",
		remove: "B1' remove via tapsync-qemu",
		addNote: func(p, a, b float64) string {
			qa, qb := quantile(q.tapsync.add, p), quantile(q.floor.add, p)
			v := fmt.Sprintf(" (over QMP on QEMU's command line %.1f / %.1f ms: the wrapper's socket %+.1f / %+.1f ms", qa, qb, a-qa, b-qb)
			if p == 0.5 {
				v += fmt.Sprintf("; QEMU executing / between the add's commands: tapsync %.2f / %.2f ms, floor %.2f / %.2f ms, on the command line's socket %.2f / %.2f, %.2f / %.2f ms",
					quantile(t.busy, p), quantile(t.between, p), quantile(f.busy, p), quantile(f.between, p),
					quantile(q.tapsync.busy, p), quantile(q.tapsync.between, p), quantile(q.floor.busy, p), quantile(q.floor.between, p))
			}
			return v + ")"
		},
		removeNote: func(p float64) string {
			return fmt.Sprintf("over QMP on QEMU's command line %.1f / %.1f ms; ", quantile(q.tapsync.remove, p), quantile(q.floor.remove, p)) +
				qmpRemoval(t, f, p)
		},
		after: func(row func(m, v, g string)) {
			n := float64(len(t.add))
			row("B1 / B1' via tapsync-qemu: QMP commands per add, per remove (tapsync / floor)",
				fmt.Sprintf("%s / %s; %s / %s", perRound(t.cmdsAdd, n), perRound(f.cmdsAdd, n), perRound(t.cmdsRemove, n), perRound(f.cmdsRemove, n)), "-")
		},
	})
}

func perRound(counts map[string]int, n float64) string {
	if n == 0 {
		return "-"
	}
	return perSandbox(counts, int(n))
}

// describeMachine: CPU, cores, memory, kernel, QEMU.
func describeMachine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	var uts syscall.Utsname
	_ = syscall.Uname(&uts)
	kernel := cstr(uts.Release[:])
	qemu := "QEMU ?"
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		qemu, _, _ = strings.Cut(string(out), "\n")
	}
	avail, _ := memAvailable()
	var si syscall.Sysinfo_t
	_ = syscall.Sysinfo(&si)
	return fmt.Sprintf("machine: %s, %d cores, %.1f GiB RAM (%.1f GiB available at start), kernel %s, %s, accel tcg, %s",
		cpu, runtime.NumCPU(), float64(si.Totalram)*float64(si.Unit)/(1<<30), float64(avail)/(1<<30), kernel, qemu, runtime.Version())
}

func cstr(b []int8) string {
	var s []byte
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// restartRoundsText is the row of the restarts in turn: the medians of
// each side's times and own CPU, the ratios of the medians, and every
// round's times.
func restartRoundsText(rs []restartRound) string {
	med := func(f func(restartRound) time.Duration) time.Duration {
		v := make([]time.Duration, 0, len(rs))
		for _, r := range rs {
			v = append(v, f(r))
		}
		slices.Sort(v)
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	t, fl, fd := med(func(r restartRound) time.Duration { return r.tapsync }), med(func(r restartRound) time.Duration { return r.floor }),
		med(func(r restartRound) time.Duration { return r.floorDatapath })
	tc, fc, fdc := med(func(r restartRound) time.Duration { return r.tapsyncCPU.daemon }), med(func(r restartRound) time.Duration { return r.floorCPU.daemon }),
		med(func(r restartRound) time.Duration { return r.floorDatapathCPU.daemon })
	var each []string
	for _, r := range rs {
		each = append(each, fmt.Sprintf("%.0f/%.0f/%.0f", ms(r.tapsync), ms(r.floor), ms(r.floorDatapath)))
	}
	return fmt.Sprintf("tapsync **%.0f ms**, floor %.0f ms: **%.2f×**; the floor that checks the datapath %.0f ms: **%.2f×** (own CPU %.0f / %.0f / %.0f ms; each round, tapsync/floor/datapath floor: %s ms)",
		ms(t), ms(fl), float64(t)/float64(fl), ms(fd), float64(t)/float64(fd), ms(tc), ms(fc), ms(fdc), strings.Join(each, ", "))
}
