package testvm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tapsync/tapsync/e2e/testproc"
)

// EnvAccel overrides Options.Accel: tcg, kvm or auto.
const EnvAccel = "TAPSYNC_E2E_ACCEL"

// kernelCmdline keeps the console to our markers and panics (quiet,
// loglevel=3) and turns a dead /init into a QEMU exit (panic=-1 with
// -no-reboot). Flags meant to speed up a TCG boot (mitigations=off,
// 8250.nr_uarts=1, i8042.noaux/nokbd, tsc=reliable) made no measurable
// difference to the ~2.8 s to READY, so they are left out.
const kernelCmdline = "console=ttyS0 panic=-1 quiet loglevel=3"

// selfConfigFlag on the kernel command line tells init.sh to configure NICs
// itself (Options.SelfConfig).
const selfConfigFlag = "tapsync.selfconfig=1"

// Names of the guest agent's virtio-serial ports. The guest agent serves
// every port whose name starts with "agent."; a QEMU socket chardev takes
// one client at a time, hence one port for the code under test (the name
// Kata gives its agent port) and one for the test.
const (
	agentPortName     = "agent.channel.0"
	testAgentPortName = "agent.test.0"
)

// maxRootPorts: one pcie-root-port per slot on pcie.0 from 0x02 to 0x1d
// (0x00 is the host bridge, 0x01 the agent's virtio-serial, 0x1e the
// pci-bridge, 0x1f the ICH9 LPC/SATA/SMBus functions).
const maxRootPorts = 28

// Every VM has one pci-bridge, as Kata's q35 VMs do (Kata: id pci-bridge-0,
// shpc=off, in slot 2 of pcie.0; here slot 0x1e, above the root ports).
// Its 31 slots (1..31; slot 0 takes no hot-plug) are hot-plugged through
// ACPI (ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on): the guest's
// acpiphp acknowledges an unplug at once. A NIC in its slot S has the
// agent's devicePath "1e/<S>".
const (
	BridgeID   = "pci-bridge-0"
	BridgeSlot = 0x1e
)

// Options configure Start.
type Options struct {
	Image     *Image // nil: no guest OS at all (QEMU sits in firmware; device_del never completes)
	NetNS     string // path of the network namespace QEMU runs in (via nsenter --net=PATH); "" = the test process's own
	Dir       string // directory for sockets, serial and QEMU logs; "" = a new temp dir removed by Stop (in a caller's Dir, Stop keeps the logs)
	RootPorts int    // number of pcie-root-port devices (ids rp1..rpN, slots 0x02..), default 4, at most 28; every VM also has a pci-bridge (BridgeID)
	Accel     string // "tcg", "kvm" or "" = auto; $TAPSYNC_E2E_ACCEL (tcg|kvm|auto) overrides
	MemoryMB  int    // default 256
	// SelfConfig makes the guest give every new NIC GuestIP(mac)/24 itself
	// and announce it (NICUpRE, NICGoneRE), as no real guest does: only for
	// tests of the host side that want a reachable guest without an agent
	// client. Without it, NICs stay unconfigured until someone asks the
	// agent (VM.Agent, VM.TestAgent).
	SelfConfig bool
	// Logf receives decisions worth knowing (the accelerator); nil = none.
	Logf func(format string, args ...any)
	// Cwd is QEMU's working directory ("": the test's), where relative
	// socket paths among Args are bound (runtime-rs binds its monitors
	// in the bundle dir so). ExtraFiles are passed to QEMU as fds 3, 4, …
	// (a monitor the caller bound, as a shim passes one). Name is
	// QEMU's -name (default tapsync-testvm; Kata's is sandbox-<id>).
	Cwd        string
	ExtraFiles []*os.File
	Name       string
	// Binary is what is executed as QEMU ("": qemu-system-x86_64 from
	// PATH), e.g. a wrapper that execs it, as Kata's [hypervisor.qemu]
	// path may name one.
	Binary string
	// Args are appended to QEMU's command line as they are, for callers
	// that want what no other option offers: a paused VM (-S) for the
	// benchmarks, QEMU's trace events (-trace, -D, -msg timestamp=on).
	Args []string
}

// VM is a running QEMU started by Start.
type VM struct {
	QMP     string // QMP unix socket for the code under test
	TestQMP string // a second QMP unix socket for the test's own observations
	// Agent is the guest agent for the code under test, as a URL
	// "unix:///path" (a QEMU socket chardev wired to the guest's
	// virtio-serial port agent.channel.0). One client at a time.
	Agent string
	// TestAgent is a second guest agent URL "unix:///path" (port
	// agent.test.0), for the test's own observations, also the one that
	// takes the test-only Restart (RestartAgent).
	TestAgent string
	Serial    string // file with the guest's serial console output
	Log       string // QEMU's own stdout and stderr
	Dir       string // where the files above live
	Pid       int    // QEMU's pid (nsenter execs QEMU, so also with NetNS)
	Accel     string // accelerator in use: "tcg" or "kvm"

	agentSock, testAgentSock string     // paths behind Agent and TestAgent
	testAgentMu              sync.Mutex // the helpers' turns on TestAgent (RestartAgent, traffic.go)
	ownDir                   bool
	cmd                      *exec.Cmd
	exited                   chan struct{} // closed once cmd.Wait returned
	stopOnce                 sync.Once
	stopErr                  error
}

// Start runs QEMU and returns once both QMP sockets answer a command (ctx
// bounds that wait, 30 s if it has no deadline). It does not wait for the
// guest: use WaitReady. The agent sockets exist from then on; a client may
// connect before the guest agent runs and is served once it does. QEMU runs until Stop, or until the test process dies
// (it gets SIGKILL then), whatever happens to ctx. QMP is the first -qmp on
// QEMU's command line, TestQMP the second.
func Start(ctx context.Context, opts Options) (*VM, error) {
	accel, err := chooseAccel(ctx, opts)
	if err != nil {
		return nil, err
	}
	return start(ctx, opts, accel)
}

func start(ctx context.Context, opts Options, accel string) (_ *VM, err error) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("find QEMU: %w (install qemu-system-x86)", err)
	}
	if opts.Binary != "" {
		qemu = opts.Binary
	}
	argv := []string{qemu}
	if opts.NetNS != "" {
		if _, err := os.Stat(opts.NetNS); err != nil {
			return nil, fmt.Errorf("netns for QEMU: %w", err)
		}
		nsenter, err := exec.LookPath("nsenter")
		if err != nil {
			return nil, fmt.Errorf("find nsenter: %w (install util-linux)", err)
		}
		// nsenter execs QEMU, so the pid we hold is QEMU's own.
		argv = []string{nsenter, "--net=" + opts.NetNS, "--", qemu}
	}
	ports := opts.RootPorts
	if ports == 0 {
		ports = 4
	}
	if ports < 0 || ports > maxRootPorts {
		return nil, fmt.Errorf("RootPorts %d: want 1..%d", ports, maxRootPorts)
	}
	mem := opts.MemoryMB
	if mem == 0 {
		mem = 256
	}

	v := &VM{Dir: opts.Dir, Accel: accel, exited: make(chan struct{})}
	if v.Dir == "" {
		if v.Dir, err = os.MkdirTemp("", "tapsync-testvm-"); err != nil {
			return nil, fmt.Errorf("create VM dir: %w", err)
		}
		v.ownDir = true
	} else if err := os.MkdirAll(v.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("create VM dir %s: %w", v.Dir, err)
	}
	defer func() {
		if err != nil {
			_ = v.Stop()
		}
	}()
	v.QMP = filepath.Join(v.Dir, "qmp.sock")
	v.TestQMP = filepath.Join(v.Dir, "test-qmp.sock")
	v.agentSock = filepath.Join(v.Dir, "agent.sock")
	v.testAgentSock = filepath.Join(v.Dir, "test-agent.sock")
	v.Agent = "unix://" + v.agentSock
	v.TestAgent = "unix://" + v.testAgentSock
	v.Serial = filepath.Join(v.Dir, "serial.log")
	v.Log = filepath.Join(v.Dir, "qemu.log")
	// QEMU splits option values at commas, and sun_path holds 108 bytes.
	if strings.Contains(v.Dir, ",") {
		return nil, fmt.Errorf("VM dir %q: QEMU cannot take a path with a comma", v.Dir)
	}
	if len(v.testAgentSock) >= 108 { // the longest of the socket paths
		return nil, fmt.Errorf("VM dir %q: socket path %s is longer than a unix socket allows (107 bytes); pick a shorter Dir", v.Dir, v.testAgentSock)
	}
	for _, f := range []string{v.QMP, v.TestQMP, v.agentSock, v.testAgentSock, v.Serial} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove stale %s: %w", f, err)
		}
	}

	name := opts.Name
	if name == "" {
		name = "tapsync-testvm"
	}
	args := []string{
		"-name", name,
		"-machine", "q35",
		"-accel", accel,
		"-nodefaults", "-no-user-config",
		// Not -nographic: with it QEMU wants stdio for the monitor and
		// serial and puts a terminal in raw mode. We use neither.
		"-display", "none",
		// A guest reboot (panic=-1, init died) ends QEMU instead of looping.
		"-no-reboot",
		"-m", fmt.Sprint(mem),
		"-smp", "1",
		"-serial", "file:" + v.Serial,
		"-qmp", "unix:" + v.QMP + ",server=on,wait=off",
		"-qmp", "unix:" + v.TestQMP + ",server=on,wait=off",
		// Unplug through ACPI (the guest's acpiphp acks at once), not
		// native PCIe hotplug with its 5 s attention-button delay. It is
		// already the q35 default since QEMU 6.1; pinned so it stays so.
		"-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on",
		// The agent's ports. The controller sits at 0x01 on pcie.0, the
		// one slot the root ports (0x02..) and ICH9 (0x1f) leave free;
		// pcie.0 takes no hot-plug, so it costs the code under test
		// nothing. Each port is a socket the host may connect to and
		// leave at any time (wait=off: QEMU does not wait for a client).
		"-device", "virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x1",
		"-chardev", "socket,id=agent0,path=" + v.agentSock + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent0,name=" + agentPortName,
		"-chardev", "socket,id=testagent0,path=" + v.testAgentSock + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=testagent0,name=" + testAgentPortName,
	}
	if accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	for i := 1; i <= ports; i++ {
		// One slot per port: each root port is its own hotplug slot.
		args = append(args, "-device",
			fmt.Sprintf("pcie-root-port,id=rp%d,bus=pcie.0,chassis=%d,slot=%d,addr=0x%x", i, i, i, i+1))
	}
	// Kata's flags. shpc=off: ACPI, not the bridge's own SHPC, handles its
	// hot-plug. The reserves make the firmware give the bridge I/O and
	// memory windows although nothing sits behind it at boot; without them
	// a hot-plugged NIC gets no BARs and the guest never sees it. A
	// chassis number no root port uses.
	args = append(args, "-device",
		fmt.Sprintf("pci-bridge,bus=pcie.0,id=%s,chassis_nr=%d,shpc=off,addr=%#x,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
			BridgeID, maxRootPorts+1, BridgeSlot))
	if opts.Image != nil {
		cmdline := kernelCmdline
		if opts.SelfConfig {
			cmdline += " " + selfConfigFlag
		}
		args = append(args, "-kernel", opts.Image.Kernel, "-initrd", opts.Image.Initrd, "-append", cmdline)
	} else {
		// SeaBIOS finds nothing to boot and must stay there, not reboot
		// (which -no-reboot would turn into QEMU exiting). -1 is QEMU's
		// default (seen: still running after 90 s), pinned for clarity.
		args = append(args, "-boot", "reboot-timeout=-1")
	}
	args = append(args, opts.Args...)

	logFile, err := os.Create(v.Log)
	if err != nil {
		return nil, fmt.Errorf("create QEMU log: %w", err)
	}
	// Not CommandContext: the VM lives until Stop, not until ctx ends.
	cmd := exec.Command(argv[0], append(argv[1:], args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Dir, cmd.ExtraFiles = opts.Cwd, opts.ExtraFiles
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:   true,            // a ^C to the test is not QEMU's business; Stop is
		Pdeathsig: syscall.SIGKILL, // no QEMU outlives a crashed test binary
	}
	err = testproc.Start(cmd)
	logFile.Close() // QEMU holds its own copy
	if err != nil {
		return nil, fmt.Errorf("start QEMU: %w", err)
	}
	v.cmd = cmd
	v.Pid = cmd.Process.Pid
	go func() {
		_ = cmd.Wait() // the status is in cmd.ProcessState, read after exited closes
		close(v.exited)
	}()

	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	// Only the test's own monitor is asked: the code under test may be
	// dialling QMP already (a daemon running while its VM is restarted),
	// and QEMU serves one client per monitor, its backlog of one filled
	// by the second: a probe there can wait for ever.
	if err := v.waitQMP(ctx, v.TestQMP); err != nil {
		return nil, err
	}
	// QEMU creates its chardevs before it serves QMP commands.
	for _, sock := range []string{v.QMP, v.agentSock, v.testAgentSock} {
		if _, err := os.Stat(sock); err != nil {
			return nil, fmt.Errorf("socket after QEMU started: %w\n%s", err, v.tails())
		}
	}
	return v, nil
}

// waitQMP polls until the socket answers a command, then hangs up so that
// the code under test can be the socket's one client.
func (v *VM) waitQMP(ctx context.Context, sock string) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if last = qmpAnswers(sock); last == nil {
			return nil
		}
		select {
		case <-v.exited:
			return v.exitError("before its QMP socket %s was ready", sock)
		case <-ctx.Done():
			return fmt.Errorf("QMP socket %s not ready (last: %v): %w", sock, last, ctx.Err())
		case <-tick.C:
		}
	}
}

// qmpAnswers negotiates capabilities on a new connection. The greeting
// alone proves little: QEMU serves monitors from their own I/O thread and
// greets before it has even loaded the kernel (a missing -kernel file
// fails after the greeting). Commands run in the main loop, so an answer
// means QEMU is past its setup.
func qmpAnswers(sock string) error {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	r := bufio.NewReader(c)
	greeting, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("read QMP greeting: %w", err)
	}
	if !strings.Contains(greeting, `"QMP"`) {
		return fmt.Errorf("unexpected QMP greeting %q", greeting)
	}
	if _, err := io.WriteString(c, `{"execute":"qmp_capabilities"}`+"\n"); err != nil {
		return fmt.Errorf("send qmp_capabilities: %w", err)
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("read qmp_capabilities answer: %w", err)
		}
		switch {
		case strings.HasPrefix(line, `{"return"`):
			return nil
		case strings.HasPrefix(line, `{"error"`):
			return fmt.Errorf("qmp_capabilities: %s", strings.TrimSpace(line))
		}
		// An event: skip it.
	}
}

// Stop kills QEMU (SIGKILL: nothing in the guest is worth a clean
// shutdown), waits for it and removes the sockets. A temporary Dir is
// removed whole; in a caller's Dir the serial and QEMU logs are left for
// the caller to keep. Safe to call more than once.
func (v *VM) Stop() error {
	v.stopOnce.Do(func() { v.stopErr = v.stop() })
	return v.stopErr
}

func (v *VM) stop() error {
	var errs []error
	if v.cmd != nil {
		if err := v.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			errs = append(errs, fmt.Errorf("kill QEMU pid %d: %w", v.Pid, err))
		} else {
			<-v.exited
		}
	}
	if v.ownDir {
		if err := os.RemoveAll(v.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove VM dir: %w", err))
		}
	} else {
		for _, f := range []string{v.QMP, v.TestQMP, v.agentSock, v.testAgentSock} {
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove %s: %w", f, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Exited is closed when QEMU has exited, for whatever reason.
func (v *VM) Exited() <-chan struct{} { return v.exited }

// Alive reports whether QEMU is still running.
func (v *VM) Alive() bool {
	select {
	case <-v.exited:
		return false
	default:
		return true
	}
}

// SerialOffset is the current size of the serial log: pass it to
// WaitSerialFrom to wait only for lines printed after this point.
func (v *VM) SerialOffset() int64 {
	st, err := os.Stat(v.Serial)
	if err != nil {
		return 0
	}
	return st.Size()
}

// WaitReady waits for the guest's READY marker, by default for at most two
// minutes (TCG on a busy two-core machine).
func (v *VM) WaitReady(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
	}
	_, err := v.WaitSerial(ctx, ReadyRE())
	return err
}

// WaitSerial waits for the first serial line, from the start of the log,
// that matches re, and returns re's submatches in it.
func (v *VM) WaitSerial(ctx context.Context, re *regexp.Regexp) ([]string, error) {
	return v.WaitSerialFrom(ctx, 0, re)
}

// WaitSerialFrom is WaitSerial from byte offset off (see SerialOffset), for
// something that must happen after a given point, e.g. NIC-GONE after a
// device_del. It fails at once if QEMU exits, and otherwise when ctx ends;
// either error carries the last serial lines.
func (v *VM) WaitSerialFrom(ctx context.Context, off int64, re *regexp.Regexp) ([]string, error) {
	f, err := os.Open(v.Serial)
	if err != nil {
		return nil, fmt.Errorf("open serial log: %w", err)
	}
	defer f.Close()

	// Polling a log file is fine in a fixture; 50 ms is well under the
	// guest's own 200 ms scan interval.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var pending []byte // an incomplete last line, kept until its newline arrives
	buf := make([]byte, 64*1024)
	exited := false
	for {
		for {
			n, err := f.ReadAt(buf, off)
			off += int64(n)
			pending = append(pending, buf[:n]...)
			if err == io.EOF || n == 0 {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("read serial log: %w", err)
			}
		}
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			line := strings.TrimRight(string(pending[:i]), "\r")
			pending = pending[i+1:]
			if m := re.FindStringSubmatch(line); m != nil {
				return m, nil
			}
		}
		if exited {
			// A line cut short by QEMU's death still counts.
			if m := re.FindStringSubmatch(string(pending)); m != nil {
				return m, nil
			}
			return nil, v.exitError("while waiting for /%s/ on the serial console", re)
		}
		select {
		case <-v.exited:
			exited = true // read once more: the last lines may just have landed
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for /%s/ on serial console %s: %w\nlast serial lines:\n%s",
				re, v.Serial, ctx.Err(), fileTail(v.Serial))
		case <-tick.C:
		}
	}
}

// exitError describes an unexpected QEMU exit with everything that helps:
// exit status, QEMU's own messages and the end of the serial console.
func (v *VM) exitError(format string, args ...any) error {
	status := "unknown status"
	if v.cmd != nil && v.cmd.ProcessState != nil {
		status = v.cmd.ProcessState.String() // "exit status 1", "signal: killed"
	}
	return fmt.Errorf("QEMU pid %d exited %s (%s)\n%s", v.Pid, fmt.Sprintf(format, args...), status, v.tails())
}

// tails returns the last lines of QEMU's log and of the serial console,
// for error messages and failed tests.
func (v *VM) tails() string {
	return "last QEMU log lines:\n" + fileTail(v.Log) + "\nlast serial lines:\n" + fileTail(v.Serial)
}

// fileTail returns about the last 20 lines of a log file.
func fileTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	const window = 16 * 1024 // enough for 20 console lines
	start := max(st.Size()-window, 0)
	b := make([]byte, st.Size()-start)
	n, _ := f.ReadAt(b, start)
	lines := lastLines(b[:n], 20)
	if len(lines) == 0 {
		return "(empty)"
	}
	return strings.Join(lines, "\n")
}

// autoAccel is the per-process decision for Accel "" / "auto".
var autoAccel struct {
	mu    sync.Mutex
	accel string // "" until decided
}

// chooseAccel resolves Options.Accel and $TAPSYNC_E2E_ACCEL. In auto mode
// it uses KVM only if a probe boot under KVM reaches READY: on some hosts
// /dev/kvm exists but guests hang under it.
func chooseAccel(ctx context.Context, opts Options) (string, error) {
	mode, from := opts.Accel, "Options.Accel"
	if env := os.Getenv(EnvAccel); env != "" {
		mode, from = env, "$"+EnvAccel
	}
	switch mode {
	case "tcg", "kvm":
		return mode, nil
	case "", "auto":
	default:
		return "", fmt.Errorf("accelerator %q from %s: want tcg, kvm or auto", mode, from)
	}

	if opts.Image == nil {
		// No guest runs and firmware does not care, while a KVM guest aborts on some hosts (kvm_buf_set_msrs): always TCG.
		return "tcg", nil
	}
	autoAccel.mu.Lock()
	defer autoAccel.mu.Unlock()
	if autoAccel.accel != "" {
		return autoAccel.accel, nil
	}
	logf := orDiscard(opts.Logf)
	if _, err := os.Stat("/dev/kvm"); err != nil {
		autoAccel.accel = "tcg"
		logf("testvm: accelerator tcg (no /dev/kvm)")
		return autoAccel.accel, nil
	}
	pctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	probe, err := start(pctx, Options{Image: opts.Image, RootPorts: 1, MemoryMB: opts.MemoryMB}, "kvm")
	if err == nil {
		err = probe.WaitReady(pctx)
		_ = probe.Stop()
	}
	if ctx.Err() != nil {
		return "", fmt.Errorf("probe KVM: %w", ctx.Err()) // the caller gave up; decide another time
	}
	if err != nil {
		autoAccel.accel = "tcg"
		logf("testvm: accelerator tcg (/dev/kvm exists but a probe guest did not boot under it: %v)", err)
	} else {
		autoAccel.accel = "kvm"
		logf("testvm: accelerator kvm (probe guest booted)")
	}
	return autoAccel.accel, nil
}
