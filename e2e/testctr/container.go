package testctr

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// BusyboxPath is the static busybox the root filesystems are made of
// (Debian's busybox-static).
const BusyboxPath = "/bin/busybox"

// rootfsApplets are the busybox applets a test container may run.
var rootfsApplets = []string{"sh", "sleep", "readlink", "cat", "ls", "ip", "ps", "true"}

// Rootfs makes a root filesystem of static busybox in a temporary
// directory: no image, no pull, no snapshotter.
func Rootfs(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if err := makeRootfs(dir); err != nil {
		t.Fatalf("testctr: rootfs: %v", err)
	}
	return dir
}

func makeRootfs(dir string) error {
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp", "etc", "run"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	src, err := os.Open(BusyboxPath)
	if err != nil {
		return fmt.Errorf("%w (install busybox-static)", err)
	}
	defer src.Close()
	dst, err := os.OpenFile(filepath.Join(dir, "bin", "busybox"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	if err := dst.Close(); err != nil {
		return err
	}
	for _, a := range rootfsApplets {
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", a)); err != nil {
			return err
		}
	}
	return nil
}

// Container is a running container of a test.
type Container struct {
	ID        string
	Namespace string // containerd namespace
	Pid       uint32 // of its init process (sleep), in the host's pid namespace

	c    *Containerd
	once sync.Once
	err  error
}

// RunSandbox creates container id in containerd namespace ns with the
// given runtime (RuntimeRunc, RuntimeOther) and OCI annotations, joining
// the network namespace at netnsPath (empty: a private one, as a runtime
// that names no netns would make), runs `sleep 3600` in it and returns
// once its task is running. t.Cleanup kills and deletes it.
func RunSandbox(t testing.TB, c *Containerd, ns, id, netnsPath, runtime string, annotations map[string]string) *Container {
	t.Helper()
	began := time.Now()
	rootfs, err := c.sharedRootfs()
	if err != nil {
		t.Fatalf("testctr: rootfs: %v", err)
	}
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), callTimeout)
	defer cancel()
	cli := c.Client()

	specOpts := []oci.SpecOpts{
		oci.WithRootFSPath(rootfs),
		oci.WithDefaultPathEnv,
		// Under this containerd's own cgroup parent, removed at cleanup,
		// instead of the default /<ns>/<id> that all tests would share.
		oci.WithCgroup(path.Join(c.cgroupParent(), ns, id)),
		oci.WithProcessArgs("sleep", "3600"),
		// The default spec has a private network namespace; a path
		// joins an existing one instead.
		oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: netnsPath}),
	}
	if len(annotations) > 0 {
		specOpts = append(specOpts, oci.WithAnnotations(annotations))
	}
	ct := &Container{ID: id, Namespace: ns, c: c}
	// Equivalent to: ctr -n ns run --runtime runtime --rootfs rootfs --with-ns network:netnsPath id sleep 3600
	ctr, err := cli.NewContainer(ctx, id,
		// runc keeps its state in our directory, not /run/containerd/runc.
		client.WithRuntime(runtime, &options.Options{Root: filepath.Join(c.dir, "runc")}),
		client.WithNewSpec(specOpts...))
	if err != nil {
		t.Fatalf("testctr: create container %s in namespace %s: %v", id, ns, err)
	}
	t.Cleanup(func() {
		if !c.running() {
			return // stopped by the test: the fixture's cleanup kills what is left
		}
		if err := ct.Delete(); err != nil {
			t.Errorf("testctr: cleanup: %v", err)
		}
	})
	task, err := ctr.NewTask(ctx, cio.LogFile(filepath.Join(c.dir, "logs", ns+"-"+id+".log")))
	if err != nil {
		t.Fatalf("testctr: create task %s in namespace %s: %v", id, ns, err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatalf("testctr: start task %s in namespace %s: %v", id, ns, err)
	}
	ct.Pid = task.Pid()
	t.Logf("testctr: container %s/%s (%s) running in %v, pid %d", ns, id, runtime, time.Since(began).Round(time.Millisecond), ct.Pid)
	return ct
}

// Delete kills and deletes the container's task, then the container.
// Deleting what is gone succeeds; later calls return the first result.
func (ct *Container) Delete() error {
	ct.once.Do(func() {
		if !ct.c.running() {
			ct.err = fmt.Errorf("delete container %s/%s: containerd is stopped", ct.Namespace, ct.ID)
			return
		}
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ct.Namespace), callTimeout)
		defer cancel()
		ctr, err := ct.c.Client().LoadContainer(ctx, ct.ID)
		if errdefs.IsNotFound(err) {
			return
		}
		if err != nil {
			ct.err = fmt.Errorf("load container %s/%s: %w", ct.Namespace, ct.ID, err)
			return
		}
		if err := deleteContainer(ctx, ctr); err != nil {
			ct.err = fmt.Errorf("in namespace %s: %w", ct.Namespace, err)
		}
	})
	return ct.err
}

// Exec runs a command in the container (as `ctr task exec` would) and
// returns its combined output; an exit status other than 0 is an error.
func (ct *Container) Exec(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ct.Namespace), callTimeout)
	defer cancel()
	ctr, err := ct.c.Client().LoadContainer(ctx, ct.ID)
	if err != nil {
		return "", fmt.Errorf("load container %s/%s: %w", ct.Namespace, ct.ID, err)
	}
	spec, err := ctr.Spec(ctx)
	if err != nil {
		return "", fmt.Errorf("spec of container %s/%s: %w", ct.Namespace, ct.ID, err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		return "", fmt.Errorf("task of container %s/%s: %w", ct.Namespace, ct.ID, err)
	}
	proc := *spec.Process
	proc.Args, proc.Terminal = args, false
	execID := fmt.Sprintf("exec-%d", execSeq.Add(1))
	var out lockedBuffer
	// FIFOs in our directory, not /run/containerd/fifo.
	p, err := task.Exec(ctx, execID, &proc, cio.NewCreator(cio.WithStreams(nil, &out, &out), cio.WithFIFODir(filepath.Join(ct.c.dir, "fifo"))))
	if err != nil {
		return "", fmt.Errorf("exec %v in %s/%s: %w", args, ct.Namespace, ct.ID, err)
	}
	defer p.Delete(context.WithoutCancel(ctx))
	exited, err := p.Wait(ctx)
	if err != nil {
		return "", err
	}
	if err := p.Start(ctx); err != nil {
		return "", fmt.Errorf("start exec %v in %s/%s: %w", args, ct.Namespace, ct.ID, err)
	}
	var st client.ExitStatus
	select {
	case st = <-exited:
	case <-ctx.Done():
		return out.String(), fmt.Errorf("exec %v in %s/%s: %w", args, ct.Namespace, ct.ID, ctx.Err())
	}
	p.IO().Wait() // all output copied
	if code, _, err := st.Result(); err != nil || code != 0 {
		return out.String(), fmt.Errorf("exec %v in %s/%s: exit status %d, %v", args, ct.Namespace, ct.ID, code, err)
	}
	return out.String(), nil
}

var execSeq atomic.Uint64

// lockedBuffer is a bytes.Buffer that stdout and stderr copiers share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// sharedRootfs makes, once, the busybox root filesystem that all of this
// containerd's containers share.
func (c *Containerd) sharedRootfs() (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rootfs != "" {
		return c.rootfs, nil
	}
	dir := filepath.Join(c.dir, "rootfs")
	if err := makeRootfs(dir); err != nil {
		return "", err
	}
	c.rootfs = dir
	return dir, nil
}
