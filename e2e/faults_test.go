//go:build e2e && faults

// The slow fault scenarios of issue 17, run by `make faults` (build tags
// e2e and faults, tests named TestFault…). Each asserts an end state,
// never a timing. The fast fault scenarios stay in `make test`:
//   - a full state dir: cmd/tapsync TestFullStateDirIsCauseState
//   - hung QEMUs: cmd/tapsync TestHungQEMUsDoNotDelayOthers
//   - a guest reset and address flush: e2e TestGuestRepairedAfterResetAndFlush

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

// endpointLinks are the container links of st's endpoints, sorted.
func endpointLinks(st map[string]any) []string {
	var links []string
	eps, _ := st["endpoints"].([]any)
	for _, e := range eps {
		m := e.(map[string]any)
		if r, _ := m["removing"].(bool); r {
			links = append(links, fmt.Sprint(m["link"])+"(removing)")
			continue
		}
		links = append(links, fmt.Sprint(m["link"]))
	}
	slices.Sort(links)
	return links
}

// nothingLeftOver says what differs from exactly want wired in sandbox
// sb1 and nothing more of ours: taps, redirects, owned NICs and netdevs
// in the QEMU behind testQMP, the record's endpoints and the status. ""
// when all agree.
func nothingLeftOver(t *testing.T, ctx context.Context, stateDir string, n *datapath.Netns, testQMP string, want []string) string {
	t.Helper()
	slices.Sort(want)
	st := sandboxStatus(t, stateDir, "sb1")
	if st == nil {
		return "no sandbox sb1 in status"
	}
	if e, _ := st["last_error"].(string); e != "" {
		return "last error: " + e
	}
	if got := endpointLinks(st); !slices.Equal(got, want) {
		return fmt.Sprintf("status endpoints %v, want %v", got, want)
	}
	obs, err := n.Observe(datapath.All)
	if err != nil {
		return "observe: " + err.Error()
	}
	if len(obs.Taps) != len(want) || len(obs.Redirects) != 2*len(want) {
		return fmt.Sprintf("taps %v, redirects %v; want %d and %d", obs.Taps, obs.Redirects, len(want), 2*len(want))
	}
	for _, rd := range obs.Redirects {
		if !rd.Owned || rd.ToName == "" {
			return fmt.Sprintf("unexpected or dangling redirect %v", rd)
		}
	}
	c, err := qmp.Dial(ctx, testQMP, qmp.Options{})
	if err != nil {
		return "dial test QMP: " + err.Error()
	}
	defer c.Close()
	nics, err := c.ListNICs(ctx)
	if err != nil {
		return "list NICs: " + err.Error()
	}
	netdevs, err := c.ListNetdevs(ctx)
	if err != nil {
		return "list netdevs: " + err.Error()
	}
	netdevs = slices.DeleteFunc(netdevs, func(id string) bool { return !strings.HasPrefix(id, "tapsync-") })
	owned := slices.DeleteFunc(slices.Clone(nics), func(n qmp.NICInfo) bool { return !n.Owned })
	if len(owned) != len(want) || len(netdevs) != len(want) {
		return fmt.Sprintf("owned NICs %+v, netdevs %v; want %d", owned, netdevs, len(want))
	}
	store, err := state.Open(stateDir)
	if err != nil {
		return "state: " + err.Error()
	}
	rec, err := store.Load(ctx, "sb1")
	if err != nil {
		return "load record: " + err.Error()
	}
	if len(rec.Endpoints) != len(want) {
		return fmt.Sprintf("record endpoints %+v, want %d", rec.Endpoints, len(want))
	}
	return ""
}

// metricValue is the sum of the samples of metric name (any labels) on
// the daemon's metrics endpoint at addr.
func metricValue(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range strings.Split(string(body), "\n") {
		rest, ok := strings.CutPrefix(line, name)
		if !ok || (rest != "" && rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(rest[strings.LastIndex(rest, "}")+1:])
		if len(f) > 0 {
			v, _ := strconv.ParseFloat(f[0], 64)
			sum += v
		}
	}
	return sum
}

// openFDs is the number of open fds of process pid.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestFaultQEMUKilledDuringAdd: QEMU is SIGKILLed while the daemon adds
// a link. In the first case the kill follows QEMU's trace of entering
// netdev_add (-trace qmp_enter_netdev_add in its log), so it lands with
// the add in flight: after getfd and netdev_add reached QEMU, as a rule
// before the NIC is added. The other cases kill 0–16 ms after a link
// appears, which lands before or around the add. Either way the daemon
// survives, status shows the error, and once a new QEMU serves the same
// socket every link is wired again with no stray tap, redirect, NIC or
// record entry.
func TestFaultQEMUKilledDuringAdd(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ctx := t.Context()
	sb, host := testnet.NewNS(t, "tapsync-fk"), testnet.NewNS(t, "tapsync-fkhost")
	vmDir, stateDir := t.TempDir(), t.TempDir()
	startVM := func() *testvm.VM {
		return testvm.StartNoGuest(t, testvm.Options{NetNS: sb.Path, Dir: vmDir, RootPorts: 8,
			Args: []string{"-trace", "qmp_enter_netdev_add"}})
	}
	// netdevAdds is how many netdev_adds the running QEMU has entered.
	netdevAdds := func(vm *testvm.VM) int {
		b, _ := os.ReadFile(vm.Log)
		return bytes.Count(b, []byte("qmp_enter_netdev_add"))
	}
	vm := startVM()
	n := openNetns(t, sb.Path)
	d := startDaemon(t, "--config", oneSandboxConfig(t, stateDir, sb.Path, vm.QMP))
	d.waitLog("tapsync running", nil)

	const atNetdevAdd = -1 // kill once QEMU entered netdev_add
	var want []string
	for i, offset := range []time.Duration{atNetdevAdd, 0, 2 * time.Millisecond, 4 * time.Millisecond, 8 * time.Millisecond, 16 * time.Millisecond} {
		name := fmt.Sprintf("k%d", i)
		adds := netdevAdds(vm)
		testnet.Veth(t, sb, name, testvm.TestMAC(10+i), host, "p"+name)
		want = append(want, name)
		if offset == atNetdevAdd {
			// Polls QEMU's log as fast as it can: the kill is to land
			// while the add is in flight, not at some time.
			deadline := time.Now().Add(time.Minute)
			for netdevAdds(vm) == adds {
				if time.Now().After(deadline) {
					log, _ := os.ReadFile(vm.Log)
					t.Fatalf("QEMU entered no netdev_add for %s within a minute; its log:\n%s", name, log)
				}
				time.Sleep(100 * time.Microsecond)
			}
		} else {
			// The fault, injected at a fixed offset into the add (not a wait).
			time.Sleep(offset)
		}
		if err := syscall.Kill(vm.Pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-vm.Exited()
		eventually(t, fmt.Sprintf("status shows the dead QEMU's error (kill %v after %s appeared; -1: at netdev_add)", offset, name), func() string {
			st := sandboxStatus(t, stateDir, "sb1")
			if e, _ := st["last_error"].(string); e == "" {
				return fmt.Sprintf("no last_error; status %v", st)
			}
			return ""
		})
		t.Logf("kill %v after %s (-1ns: as QEMU entered netdev_add): status error %q", offset, name, sandboxStatus(t, stateDir, "sb1")["last_error"])
		if err := vm.Stop(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-d.done:
			t.Fatalf("daemon exited (%v) after QEMU was killed", d.cmd.ProcessState)
		default:
		}
		vm = startVM()
		eventually(t, fmt.Sprintf("links %v wired in the new QEMU, nothing left over", want), func() string {
			return nothingLeftOver(t, ctx, stateDir, n, vm.TestQMP, slices.Clone(want))
		})
	}
}

// TestFaultNetlinkBurstOverflow: 3000 bridge links (the planner skips
// them with a reason, so the burst is cheap to resync; bridges, not
// dummies, since not every test kernel has the dummy module) are added in one
// sandbox netns while the daemon is stopped (SIGSTOP), so that its
// netlink socket overflows. The daemon resubscribes and resyncs
// (tapsync_netlink_resubscriptions_total) and ends converged: the veths
// wired, every bridge skipped, a veth added after the burst wired too.
func TestFaultNetlinkBurstOverflow(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ctx := t.Context()
	sb, host := testnet.NewNS(t, "tapsync-fb"), testnet.NewNS(t, "tapsync-fbhost")
	vm := testvm.StartNoGuest(t, testvm.Options{NetNS: sb.Path, RootPorts: 8})
	n := openNetns(t, sb.Path)
	stateDir := t.TempDir()
	d := startDaemon(t, "--config", oneSandboxConfig(t, stateDir, sb.Path, vm.QMP))
	metrics := d.waitLog("serving metrics", nil)["address"].(string)
	d.waitLog("tapsync running", nil)
	testnet.Veth(t, sb, "v0", testvm.TestMAC(1), host, "pv0")
	testnet.Veth(t, sb, "v1", testvm.TestMAC(2), host, "pv1")
	eventually(t, "v0 and v1 wired", func() string { return nothingLeftOver(t, ctx, stateDir, n, vm.TestQMP, []string{"v0", "v1"}) })

	const burst = 3000
	batch := func(cmd string) {
		var b bytes.Buffer
		for i := range burst {
			fmt.Fprintf(&b, cmd+"\n", i)
		}
		ip := exec.Command("ip", "-n", sb.Name, "-force", "-batch", "-")
		ip.Stdin = &b
		if out, err := ip.CombinedOutput(); err != nil {
			t.Fatalf("ip -batch %q: %v\n%s", cmd, err, out)
		}
	}
	// Bursts (each link added, set up and, but for the last round,
	// deleted) while the daemon cannot read, until its socket overflowed;
	// a few rounds at most.
	before := metricValue(t, metrics, "tapsync_netlink_resubscriptions_total")
	var resubs float64
	for round := 1; ; round++ {
		d.cmd.Process.Signal(syscall.SIGSTOP)
		batch("link add b%d type bridge")
		batch("link set b%d up")
		d.cmd.Process.Signal(syscall.SIGCONT)
		// Resubscription follows the overflow's ENOBUFS at the next read.
		deadline := time.Now().Add(30 * time.Second)
		for resubs = metricValue(t, metrics, "tapsync_netlink_resubscriptions_total") - before; resubs == 0 && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
			resubs = metricValue(t, metrics, "tapsync_netlink_resubscriptions_total") - before
		}
		t.Logf("round %d: %d bridges added and set up while stopped; resubscriptions +%v", round, burst, resubs)
		if resubs > 0 {
			break
		}
		if round == 3 {
			t.Fatalf("no netlink resubscription after %d bursts of %d links", round, burst)
		}
		batch("link del b%d")
	}
	d.waitLog("resubscribed and resyncing every watched sandbox", nil)

	testnet.Veth(t, sb, "v2", testvm.TestMAC(3), host, "pv2")
	want := []string{"v0", "v1", "v2"}
	eventually(t, "veths wired and every bridge skipped after the overflow", func() string {
		if s := nothingLeftOver(t, ctx, stateDir, n, vm.TestQMP, want); s != "" {
			return s
		}
		st := sandboxStatus(t, stateDir, "sb1")
		bridges := 0
		sk, _ := st["skipped"].([]any)
		for _, s := range sk {
			m := s.(map[string]any)
			if m["kind"] == "bridge" {
				bridges++
			}
		}
		if bridges != burst {
			return fmt.Sprintf("%d bridges skipped, want %d", bridges, burst)
		}
		return ""
	})
	select {
	case <-d.done:
		t.Fatalf("daemon exited: %v", d.cmd.ProcessState)
	default:
	}
}

// TestFaultChurnSoak adds and removes a link in a loop for $FAULTS_SOAK
// (default 3m). Afterwards the daemon's fds and goroutines come back to
// within a small margin of their converged baseline.
func TestFaultChurnSoak(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	soak := 3 * time.Minute
	if s := os.Getenv("FAULTS_SOAK"); s != "" {
		var err error
		if soak, err = time.ParseDuration(s); err != nil {
			t.Fatalf("FAULTS_SOAK=%q: %v", s, err)
		}
	}
	ctx := t.Context()
	sb, host := testnet.NewNS(t, "tapsync-fs"), testnet.NewNS(t, "tapsync-fshost")
	vm := testvm.ForTest(t, testvm.Options{NetNS: sb.Path, RootPorts: 8, SelfConfig: true})
	n := openNetns(t, sb.Path)
	stateDir := t.TempDir()
	d := startDaemon(t, "--config", oneSandboxConfig(t, stateDir, sb.Path, vm.QMP))
	metrics := d.waitLog("serving metrics", nil)["address"].(string)
	d.waitLog("tapsync running", nil)
	pid := d.cmd.Process.Pid
	testnet.Veth(t, sb, "eth0", testvm.TestMAC(1), host, "peth0")
	base := []string{"eth0"}
	eventually(t, "eth0 wired", func() string { return nothingLeftOver(t, ctx, stateDir, n, vm.TestQMP, base) })
	fds0, gr0 := openFDs(t, pid), metricValue(t, metrics, "go_goroutines")

	end := time.Now().Add(soak)
	cycles := 0
	for ; time.Now().Before(end); cycles++ {
		name := fmt.Sprintf("c%d", cycles%2)
		testnet.Veth(t, sb, name, testvm.TestMAC(20+cycles%2), host, "p"+name)
		eventually(t, name+" wired", func() string {
			if got := endpointLinks(sandboxStatus(t, stateDir, "sb1")); !slices.Contains(got, name) {
				return fmt.Sprintf("endpoints %v", got)
			}
			return ""
		})
		testnet.IP(t, "-n", sb.Name, "link", "del", name)
		eventually(t, name+" unwired", func() string {
			if s := nothingLeftOver(t, ctx, stateDir, n, vm.TestQMP, base); s != "" {
				return s
			}
			return ""
		})
	}
	const fdMargin, grMargin = 2, 3
	var fds1 int
	var gr1 float64
	eventually(t, "fds and goroutines back near their baseline", func() string {
		fds1, gr1 = openFDs(t, pid), metricValue(t, metrics, "go_goroutines")
		if fds1 > fds0+fdMargin || gr1 > gr0+grMargin {
			return fmt.Sprintf("fds %d→%d, goroutines %v→%v", fds0, fds1, gr0, gr1)
		}
		return ""
	})
	t.Logf("%d add/remove cycles in %v: fds %d→%d, goroutines %v→%v", cycles, soak, fds0, fds1, gr0, gr1)
}

// TestFaultSimultaneousStarts: 10 `tapsync run` on one state dir at once.
// Exactly one runs; the other nine exit non-zero naming its pid.
func TestFaultSimultaneousStarts(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	bin := tapsyncBinary(t)
	stateDir := t.TempDir()
	cfg := writeConfig(t, fmt.Sprintf("state_dir = %q\nmetrics_address = \"\"\n[containerd]\nenabled = false\n[discovery]\nproc = false\n", stateDir))
	type run struct {
		cmd  *exec.Cmd
		out  bytes.Buffer
		done chan struct{}
	}
	const starts = 10
	runs := make([]*run, starts)
	for i := range runs {
		r := &run{done: make(chan struct{})}
		r.cmd = exec.Command(bin, "run", "--config", cfg, "--state-dir", stateDir)
		r.cmd.Stdout, r.cmd.Stderr = &r.out, &r.out
		runs[i] = r
	}
	// Started back to back, before any can have taken the lock; killed at
	// the end even if a later start fails.
	var wg sync.WaitGroup
	t.Cleanup(func() {
		for _, r := range runs {
			if r.cmd.Process != nil {
				r.cmd.Process.Kill()
			}
		}
		wg.Wait()
	})
	for _, r := range runs {
		if err := testproc.Start(r.cmd); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.cmd.Wait()
			close(r.done)
		}()
	}

	exited := func() (n int) {
		for _, r := range runs {
			select {
			case <-r.done:
				n++
			default:
			}
		}
		return n
	}
	eventually(t, "nine of ten daemons exit", func() string {
		if n := exited(); n < starts-1 {
			return fmt.Sprintf("%d exited", n)
		}
		return ""
	})
	var winner *run
	for _, r := range runs {
		select {
		case <-r.done:
		default:
			winner = r
		}
	}
	if winner == nil {
		t.Fatal("all ten daemons exited")
	}
	// The winner is past its lock: it serves the control socket.
	eventually(t, "the running daemon serves", func() string {
		if _, err := os.Stat(filepath.Join(stateDir, "control.sock")); err != nil {
			return err.Error()
		}
		select {
		case <-winner.done:
			return "the last daemon exited too"
		default:
		}
		return ""
	})
	if n := exited(); n != starts-1 {
		t.Fatalf("%d daemons exited, want %d", n, starts-1)
	}
	want := strconv.Itoa(winner.cmd.Process.Pid)
	for _, r := range runs {
		if r == winner {
			continue
		}
		out := r.out.String()
		if r.cmd.ProcessState.ExitCode() == 0 || !strings.Contains(out, "held by pid "+want) {
			t.Errorf("daemon %d: exit %d, output does not name the running pid %s:\n%s", r.cmd.Process.Pid, r.cmd.ProcessState.ExitCode(), want, out)
		}
	}
}
