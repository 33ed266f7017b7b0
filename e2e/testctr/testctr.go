// Package testctr runs a private containerd for privileged tests, with
// busybox containers (no image pull) that join a given network namespace,
// so that tapsync's containerd source and the daemon can be tested against
// the real event stream. Its Daemon, the containerd process itself
// (started, polled until it answers, stopped, its log), runs testcri's
// containerd too. It is test support only: nothing in the daemon imports
// it.
//
// Everything lives in one temporary directory (config, sockets, root,
// state, runc state, FIFOs, logs) plus one cgroup parent, both removed when
// the test ends, pass or fail; the system's /var/lib/containerd and
// /run/containerd/runc are never touched. One thing cannot be moved:
// containerd 1.6 puts its shims' sockets in /run/containerd/s (named by a
// hash of our socket path, so they never collide with a system
// containerd); the cleanup removes ours, the directory stays.
package testctr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/tapsync/tapsync/e2e/testproc"
)

const (
	// RuntimeRunc is containerd's runc shim.
	RuntimeRunc = "io.containerd.runc.v2"
	// RuntimeOther is a second runtime name served by the same runc shim
	// (containerd-shim-tapsynctest-v2, a symlink on containerd's PATH),
	// for tests that need a container of a runtime they do not watch.
	RuntimeOther = "io.containerd.tapsynctest.v2"

	startTimeout = 30 * time.Second
	callTimeout  = 30 * time.Second
)

// Containerd is a private containerd daemon.
type Containerd struct {
	t    testing.TB
	dir  string // everything below here
	sock string
	d    *Daemon

	mu     sync.Mutex
	rootfs string
}

// Start starts a private containerd and stops it, its containers and
// shims in t.Cleanup. It skips t unless root.
func Start(t testing.TB) *Containerd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testctr: skipped, needs root to run containerd and runc; run as root, e.g. sudo go test")
	}
	for _, bin := range []string{"containerd", "containerd-shim-runc-v2", "runc"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("testctr: %s not found: install Debian's containerd and runc (apt-get install containerd runc): %v", bin, err)
		}
	}
	// A short directory: the sockets inside must fit in sun_path (108
	// bytes), which t.TempDir() with a long test name would not.
	dir, err := os.MkdirTemp("", "testctr-")
	if err != nil {
		t.Fatalf("testctr: %v", err)
	}
	sock := filepath.Join(dir, "containerd.sock")
	c := &Containerd{t: t, dir: dir, sock: sock, d: NewDaemon(t, "testctr", sock, filepath.Join(dir, "containerd.log"))}
	t.Cleanup(c.cleanup)
	if err := c.setup(); err != nil {
		t.Fatalf("testctr: %v", err)
	}
	if err := c.start(); err != nil {
		t.Fatalf("testctr: %v", err)
	}
	return c
}

// Address is the containerd socket.
func (c *Containerd) Address() string { return c.sock }

// Dir is the directory holding everything of this containerd.
func (c *Containerd) Dir() string { return c.dir }

// Client is a client of this containerd; a new one after each Restart.
// The fixture owns it: do not close it.
func (c *Containerd) Client() *client.Client { return c.d.Client() }

// Restart kills containerd with SIGKILL, as a crash would, and starts it
// again on the same directories and socket. Running containers survive:
// their shims outlive containerd, and it reconnects to them.
func (c *Containerd) Restart() {
	c.t.Helper()
	c.d.Kill(syscall.SIGKILL)
	if err := c.start(); err != nil {
		c.t.Fatalf("testctr: restart: %v", err)
	}
}

// Stop stops containerd (SIGTERM, then SIGKILL after 10 s). Containers
// keep running in their shims; Restart or the test's cleanup deals with
// them.
func (c *Containerd) Stop() {
	c.d.Kill(syscall.SIGTERM)
}

// setup writes the config and the extra runtime's shim link.
func (c *Containerd) setup() error {
	for _, d := range []string{"root", "state", "bin", "runc", "logs"} {
		if err := os.MkdirAll(filepath.Join(c.dir, d), 0o700); err != nil {
			return err
		}
	}
	shim, err := exec.LookPath("containerd-shim-runc-v2")
	if err != nil {
		return err
	}
	// containerd 1.6 maps runtime io.containerd.X.vY to the binary
	// containerd-shim-X-vY on its PATH.
	if err := os.Symlink(shim, filepath.Join(c.dir, "bin", "containerd-shim-tapsynctest-v2")); err != nil {
		return err
	}
	// Config version 2 (containerd 1.6). CRI is off: it wants CNI and
	// slows startup; opt would create /opt/containerd; the snapshotters
	// other than native and overlayfs only probe and complain.
	cfg := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""
`, filepath.Join(c.dir, "root"), filepath.Join(c.dir, "state"), c.sock, c.sock+".ttrpc")
	return os.WriteFile(filepath.Join(c.dir, "config.toml"), []byte(cfg), 0o600)
}

// start runs containerd and waits until it answers.
func (c *Containerd) start() error {
	began := time.Now()
	cmd := exec.Command("containerd",
		"--config", filepath.Join(c.dir, "config.toml"),
		"--address", c.sock,
		"--root", filepath.Join(c.dir, "root"),
		"--state", filepath.Join(c.dir, "state"))
	cmd.Env = append(os.Environ(), "PATH="+filepath.Join(c.dir, "bin")+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	if err := c.d.Start(cmd, startTimeout, 10*time.Millisecond); err != nil {
		return err
	}
	c.t.Logf("testctr: containerd %s ready in %v (pid %d)", c.sock, time.Since(began).Round(time.Millisecond), c.d.Pid())
	return nil
}

func (c *Containerd) running() bool { return c.d.Running() }

// cleanup removes everything, in the order that leaves nothing behind:
// containers through containerd, containerd, then whatever survived
// (runc containers, shims, their sockets, mounts), then the directory.
func (c *Containerd) cleanup() {
	if c.running() {
		if err := c.deleteAll(); err != nil {
			c.cleanupLogf("%v", err)
		}
	}
	c.d.Close()
	shimSockets := c.shimSockets()
	c.killLeftovers()
	for _, s := range shimSockets {
		os.Remove(s)
	}
	testproc.UnmountBelow(c.dir, c.cleanupLogf)
	testproc.RemoveCgroup(c.cgroupParent(), c.cleanupLogf)
	if err := os.RemoveAll(c.dir); err != nil {
		c.cleanupLogf("%v", err)
	}
}

// cleanupLogf logs what the cleanup found or failed to remove.
func (c *Containerd) cleanupLogf(format string, args ...any) {
	c.t.Helper()
	c.t.Logf("testctr: cleanup: "+format, args...)
}

// deleteAll deletes every task and container in every namespace.
func (c *Containerd) deleteAll() error {
	cli := c.Client()
	if cli == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	nss, err := cli.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("list namespaces: %w", err)
	}
	var errs []error
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		ctrs, err := cli.Containers(nctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("list containers in %s: %w", ns, err))
			continue
		}
		for _, ctr := range ctrs {
			errs = append(errs, deleteContainer(nctx, ctr))
		}
	}
	return errors.Join(errs...)
}

// deleteContainer kills and deletes the task, then deletes the container.
// What is already gone counts as deleted.
func deleteContainer(ctx context.Context, ctr client.Container) error {
	// Equivalent to: ctr task kill -s KILL id; ctr task delete id; ctr container delete id
	if task, err := ctr.Task(ctx, nil); err == nil {
		if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("delete task %s: %w", ctr.ID(), err)
		}
	} else if !errdefs.IsNotFound(err) {
		return fmt.Errorf("load task %s: %w", ctr.ID(), err)
	}
	if err := ctr.Delete(ctx); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("delete container %s: %w", ctr.ID(), err)
	}
	return nil
}

// shimSockets lists the sockets of our shims, from the address files
// containerd keeps in each task bundle.
func (c *Containerd) shimSockets() []string {
	files, _ := filepath.Glob(filepath.Join(c.dir, "state", "io.containerd.runtime.v2.task", "*", "*", "address"))
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		addr := strings.TrimSpace(string(b))
		if p, ok := strings.CutPrefix(addr, "unix://"); ok && strings.HasPrefix(p, "/") {
			out = append(out, p)
		}
	}
	return out
}

// killLeftovers kills what outlived a failed test: containers in our runc
// root (runc delete --force kills them) and shims whose command line names
// our socket, hence started by our containerd.
func (c *Containerd) killLeftovers() {
	roots, _ := filepath.Glob(filepath.Join(c.dir, "runc", "*"))
	for _, root := range roots {
		testproc.RuncDeleteAll(root, c.cleanupLogf)
	}
	testproc.KillNaming(c.sock, c.cleanupLogf)
}

// cgroupParent is the cgroup (below each hierarchy's root) that holds
// this containerd's containers.
func (c *Containerd) cgroupParent() string {
	return "/" + filepath.Base(c.dir)
}
