package testctr

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/tapsync/tapsync/e2e/testnet"
)

func TestRootfs(t *testing.T) {
	if _, err := os.Stat(BusyboxPath); err != nil {
		t.Skipf("no %s (install busybox-static)", BusyboxPath)
	}
	dir := Rootfs(t)
	for _, a := range []string{"busybox", "sh", "sleep"} {
		if _, err := os.Stat(dir + "/bin/" + a); err != nil {
			t.Error(err)
		}
	}
}

// TestContainerInNetns runs a container in a throwaway netns, checks it
// runs there, survives a containerd crash, and is deleted.
func TestContainerInNetns(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	netns := testnet.NewNS(t, "testctr")
	c := Start(t)
	const ns = "testctr"
	id := "ctr-" + netns.Name
	ct := RunSandbox(t, c, ns, id, netns.Path, RuntimeRunc, map[string]string{"io.kubernetes.cri.container-type": "sandbox"})

	wantStatus(t, c, ns, id, client.Running)
	if got, want := nsInode(t, fmt.Sprintf("/proc/%d/ns/net", ct.Pid)), nsInode(t, netns.Path); got != want {
		t.Errorf("container's init is in netns %s, want %s (%s)", got, want, netns.Path)
	}
	// From inside: readlink /proc/self/ns/net in the container.
	if got, want := execOutput(t, ct, "readlink", "/proc/self/ns/net"), nsInode(t, netns.Path); got != want {
		t.Errorf("inside the container /proc/self/ns/net = %q, want %q", got, want)
	}

	c.Restart()
	wantStatus(t, c, ns, id, client.Running)

	if err := ct.Delete(); err != nil {
		t.Fatal(err)
	}
	if err := ct.Delete(); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	ctx := namespaces.WithNamespace(context.Background(), ns)
	if _, err := c.Client().LoadContainer(ctx, id); !errdefs.IsNotFound(err) {
		t.Errorf("container %s after Delete: err = %v, want not found", id, err)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", ct.Pid)); !os.IsNotExist(err) {
		t.Errorf("pid %d still exists after Delete (err %v)", ct.Pid, err)
	}
}

// TestOtherRuntime runs a container under the second runtime name.
func TestOtherRuntime(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	c := Start(t)
	ctx := namespaces.WithNamespace(context.Background(), "testctr")
	id := fmt.Sprintf("other-%d", os.Getpid())
	RunSandbox(t, c, "testctr", id, "", RuntimeOther, nil)
	wantStatus(t, c, "testctr", id, client.Running)
	ctr, err := c.Client().LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	info, err := ctr.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Runtime.Name != RuntimeOther {
		t.Errorf("runtime = %q, want %q", info.Runtime.Name, RuntimeOther)
	}
}

func wantStatus(t *testing.T, c *Containerd, ns, id string, want client.ProcessStatus) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), ns)
	ctr, err := c.Client().LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := task.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != want {
		t.Fatalf("task %s/%s status %s, want %s", ns, id, st.Status, want)
	}
}

// nsInode returns "net:[inode]" of a namespace file, as readlink shows it.
func nsInode(t *testing.T, path string) string {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("net:[%d]", st.Ino)
}

// execOutput runs a command in the container and returns its trimmed
// output.
func execOutput(t *testing.T, ct *Container, args ...string) string {
	t.Helper()
	out, err := ct.Exec(args...)
	if err != nil {
		t.Fatalf("exec %v in %s/%s: %v (output %q)", args, ct.Namespace, ct.ID, err, out)
	}
	return strings.TrimSpace(out)
}
