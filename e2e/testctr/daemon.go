package testctr

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/tapsync/tapsync/e2e/testproc"
)

// Daemon is one containerd process that a test harness runs on a socket
// of its own, the log it writes, and a client of it: Containerd's, and
// testcri's containerd with CRI.
type Daemon struct {
	t       testing.TB
	name    string // the harness, in what the Daemon logs
	sock    string
	logPath string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	client *client.Client
}

// NewDaemon returns a Daemon, not started, for a containerd serving sock
// and logging to logPath; name is the harness ("testctr"), in what the
// Daemon logs.
func NewDaemon(t testing.TB, name, sock, logPath string) *Daemon {
	return &Daemon{t: t, name: name, sock: sock, logPath: logPath}
}

// Start runs cmd, a containerd serving the Daemon's socket, with its
// output appended to the log, and waits until it answers, polling every
// poll for up to timeout; then Client is a new client of it (the old one
// closed). containerd gets its own process group, so that a ^C to the
// test does not reach it before the cleanup does, and dies with the test
// binary (its shims, which daemonize, do not: the cleanup handles those).
func (d *Daemon) Start(cmd *exec.Cmd, timeout, poll time.Duration) error {
	logf, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "=== %s: starting containerd at %s\n", d.name, time.Now().Format(time.RFC3339Nano))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := testproc.Start(cmd); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	d.mu.Lock()
	d.cmd, d.exited = cmd, exited
	d.mu.Unlock()

	// Poll: first for the socket to accept, then for an answer.
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("containerd exited during startup (%v); log:\n%s", cmd.ProcessState, d.LogTail(30))
		default:
		}
		if last = d.ping(); last == nil {
			break
		}
		time.Sleep(poll)
	}
	if last != nil {
		return fmt.Errorf("containerd at %s not answering after %v: %v; log:\n%s", d.sock, timeout, last, d.LogTail(30))
	}
	cli, err := client.New(d.sock, client.WithTimeout(callTimeout))
	if err != nil {
		return err
	}
	d.mu.Lock()
	old := d.client
	d.client = cli
	d.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

// ping asks containerd its version over a fresh connection (a cached one
// would sit in gRPC's reconnect backoff).
func (d *Daemon) ping() error {
	conn, err := net.DialTimeout("unix", d.sock, time.Second)
	if err != nil {
		return err
	}
	conn.Close()
	cli, err := client.New(d.sock, client.WithTimeout(time.Second))
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = cli.Version(ctx)
	return err
}

// Client is a client of this containerd, in no namespace; a new one after
// each Start. The Daemon owns it: do not close it.
func (d *Daemon) Client() *client.Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.client
}

// Pid is containerd's pid, or 0 when it is not running.
func (d *Daemon) Pid() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Running reports whether containerd was started and not killed since.
func (d *Daemon) Running() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cmd != nil
}

// Kill signals containerd and waits for it to exit; SIGKILL follows
// after 10 s. It does nothing when containerd is not running. The client
// stays, for the next Start to replace.
func (d *Daemon) Kill(sig syscall.Signal) {
	d.mu.Lock()
	cmd, exited := d.cmd, d.exited
	d.cmd = nil
	d.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(sig)
	select {
	case <-exited:
		return
	case <-time.After(10 * time.Second):
	}
	d.t.Logf("%s: containerd pid %d ignored %v for 10s; SIGKILL", d.name, cmd.Process.Pid, sig)
	cmd.Process.Kill()
	<-exited
}

// Close stops containerd as Kill(SIGTERM) does and closes the client; when
// the test has failed, it logs the tail of containerd's log.
func (d *Daemon) Close() {
	d.Kill(syscall.SIGTERM)
	d.mu.Lock()
	if d.client != nil {
		d.client.Close()
		d.client = nil
	}
	d.mu.Unlock()
	if d.t.Failed() {
		d.t.Logf("%s: containerd log (tail):\n%s", d.name, d.LogTail(40))
	}
}

// LogTail returns the last n lines of containerd's log.
func (d *Daemon) LogTail(n int) string {
	b, _ := os.ReadFile(d.logPath)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
