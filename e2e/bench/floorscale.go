package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// floorWorkers is the floor's worker pool at scale: tapsync's default
// `workers`.
const floorWorkers = 4

// floorScale is the floor's B3/B4, measured as tapsync's rows are.
type floorScale struct {
	start               time.Duration // exec → the last of 2N device_add replies
	startQMP            map[string]int
	storm               time.Duration // first third link added → the last of N device_add replies
	stormInject         time.Duration
	restart             time.Duration // exec of -verify → its "verified" timestamp
	restartDatapath     time.Duration // the same with -verify-datapath
	restartDatapathCPU  phaseCPU
	restartQMP          map[string]int
	restartQMPMutations int
	startCPU, stormCPU  phaseCPU
	restartCPU          phaseCPU
}

// writeFloorList writes the floor's -sandboxes file for sbs in dir: a
// netns path and a QMP socket per line.
func writeFloorList(dir string, sbs fleet) (string, error) {
	var b strings.Builder
	for _, sb := range sbs {
		fmt.Fprintf(&b, "%s %s\n", sb.path, sb.vm.QMP)
	}
	list := filepath.Join(dir, "sandboxes")
	return list, os.WriteFile(list, []byte(b.String()), 0o644)
}

// floorProc is one tapsync-floor process in scale mode.
type floorProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string // its stdout, line by line
	exited chan struct{}
}

func startFloorProc(bin string, args ...string) (*floorProc, error) {
	p := &floorProc{cmd: exec.Command(bin, args...), lines: make(chan string, 16), exited: make(chan struct{})}
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	p.cmd.Stderr = os.Stderr
	if err := testproc.Start(p.cmd); err != nil { // dies with the bench
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

func (p *floorProc) pid() int { return p.cmd.Process.Pid }

// line waits for the next line of the floor's stdout.
func (p *floorProc) line(limit time.Duration) (string, error) {
	select {
	case l := <-p.lines:
		return l, nil
	case <-p.exited:
		return "", fmt.Errorf("tapsync-floor exited: %v", p.cmd.ProcessState)
	case <-time.After(limit):
		return "", fmt.Errorf("tapsync-floor printed nothing within %v", limit)
	}
}

// failed is a check for eventually: the floor died before it was done.
func (p *floorProc) failed() error {
	select {
	case <-p.exited:
		return fmt.Errorf("tapsync-floor exited: %v", p.cmd.ProcessState)
	default:
		return nil
	}
}

// stop ends the floor: closing stdin asks it to go; SIGKILL is the crash
// of B4, and the fallback.
func (p *floorProc) stop(sig syscall.Signal) {
	if sig == unix.SIGKILL {
		_ = p.cmd.Process.Kill()
	} else {
		p.stdin.Close()
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// runFloorScale runs the floor's three phases on the sandboxes, each
// measured as tapsync's: B3 start (exec → the last of 2N device_add
// replies in QEMU's traces), B3 storm (the bench's first RTM_NEWLINK of a
// third veth → the last of N device_add replies), B4 (SIGKILL, then exec
// of the -verify floor → its own end timestamp, as tapsync's status gives
// its pass end). The sandboxes keep the floor's NICs and taps and a third
// link afterwards: the caller renews them.
func runFloorScale(ctx context.Context, cfg benchConfig, base string, sbs fleet, peerNS netns.NsHandle) (r floorScale, err error) {
	dir := filepath.Join(base, "floor")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return r, err
	}
	list, err := writeFloorList(dir, sbs)
	if err != nil {
		return r, err
	}
	if err := sbs.pollTraces(); err != nil {
		return r, err
	}
	qemus := sbs.qemuPids()
	n := len(sbs)
	// nics is fleet.nicsSince that gives up when the floor died.
	nics := func(p *floorProc, t0 time.Time, want int) func() (bool, string, error) {
		check := sbs.nicsSince(t0, want)
		return func() (bool, string, error) {
			if err := p.failed(); err != nil {
				return false, "", err
			}
			return check()
		}
	}

	// B3 start.
	fmt.Fprintf(os.Stderr, "bench: floor B3 start, %d sandboxes, %d workers\n", n, floorWorkers)
	stopPerf := profilePhase("floor-start")
	mark := markCPU(0, qemus)
	t0 := time.Now()
	p, err := startFloorProc(cfg.floor, "-sandboxes", list, "-bus", testvm.BridgeID, "-workers", fmt.Sprint(floorWorkers))
	if err != nil {
		stopPerf()
		return r, err
	}
	defer func() { p.stop(unix.SIGTERM) }()
	if err := eventually(ctx, 10*time.Minute, 50*time.Millisecond, "floor: all 2N NICs after start", nics(p, t0, 2)); err != nil {
		stopPerf()
		return r, err
	}
	mark.pid = p.pid()
	r.startCPU = mark.since()
	stopPerf()
	t1 := sbs.lastNIC(t0, 2)
	r.start = t1.Sub(t0)
	r.startQMP, _ = sbs.qmpSince(t0, t1)
	if l, err := p.line(time.Minute); err != nil || l != "started" {
		return r, fmt.Errorf("floor start: %q %v", l, err)
	}

	// B3 storm.
	fmt.Fprintf(os.Stderr, "bench: floor B3 start took %v; storm\n", r.start)
	_ = sbs.pollTraces()
	stopPerf = profilePhase("floor-storm")
	mark = markCPU(p.pid(), qemus)
	t0 = time.Now()
	if err := sbs.addThird(peerNS); err != nil {
		stopPerf()
		return r, err
	}
	r.stormInject = time.Since(t0)
	if err := eventually(ctx, 10*time.Minute, 50*time.Millisecond, "floor: every third NIC", nics(p, t0, 1)); err != nil {
		stopPerf()
		return r, err
	}
	r.stormCPU = mark.since()
	stopPerf()
	r.storm = sbs.lastNIC(t0, 1).Sub(t0)

	// B4: SIGKILL and the least verification, then the same with the
	// datapath checked and the events heard (floor -verify-datapath).
	fmt.Fprintf(os.Stderr, "bench: floor B3 storm took %v; B4 SIGKILL and verify\n", r.storm)
	// As for tapsync (atRest): the storm's links finish IPv6 duplicate
	// address detection before the restart, not during it.
	time.Sleep(3 * time.Second)
	p.stop(unix.SIGKILL)
	if r.restart, r.restartCPU, r.restartQMP, err = floorVerify(cfg, list, sbs, qemus, "floor-restart"); err != nil {
		return r, err
	}
	r.restartQMPMutations = mutations(r.restartQMP)
	fmt.Fprintf(os.Stderr, "bench: floor B4 took %v; again with the datapath checked\n", r.restart)
	if r.restartDatapath, r.restartDatapathCPU, _, err = floorVerify(cfg, list, sbs, qemus, "floor-restart-datapath", "-verify-datapath"); err != nil {
		return r, err
	}
	fmt.Fprintf(os.Stderr, "bench: floor B4 with the datapath checked took %v\n", r.restartDatapath)
	return r, nil
}

// floorVerify runs the floor's -verify (with extra flags) until it says
// every sandbox is verified, and stops it: its time from exec to its own
// "verified" timestamp, its CPU and the QMP commands QEMU received.
func floorVerify(cfg benchConfig, list string, sbs fleet, qemus []int, phase string, extra ...string) (time.Duration, phaseCPU, map[string]int, error) {
	_ = sbs.pollTraces()
	stopPerf := profilePhase(phase)
	mark := markCPU(0, qemus)
	t0 := time.Now()
	v, err := startFloorProc(cfg.floor, append([]string{"-sandboxes", list, "-verify", "-workers", fmt.Sprint(floorWorkers)}, extra...)...)
	if err != nil {
		stopPerf()
		return 0, phaseCPU{}, nil, err
	}
	defer v.stop(unix.SIGTERM) // its QMP connections go: a socket serves one client
	l, err := v.line(5 * time.Minute)
	if err != nil {
		stopPerf()
		return 0, phaseCPU{}, nil, err
	}
	mark.pid = v.pid()
	cpu := mark.since()
	stopPerf()
	us, ok := strings.CutPrefix(l, "verified ")
	at, perr := strconv.ParseInt(us, 10, 64)
	if !ok || perr != nil {
		return 0, phaseCPU{}, nil, errors.New("floor verify printed " + strconv.Quote(l))
	}
	_ = sbs.pollTraces()
	qmp, _ := sbs.qmpSince(t0, time.Now())
	return time.UnixMicro(at).Sub(t0), cpu, qmp, nil
}
