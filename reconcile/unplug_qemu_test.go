package reconcile

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

// startQEMU starts a q35 QEMU with four root ports and no guest OS (so no
// ACPI unplug is ever acknowledged), extra appended to its command line.
// It returns the QMP socket for the code under test and a second one for
// the test's own observations.
func startQEMU(t testing.TB, extra ...string) (sock, test string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("skipping: qemu-system-x86_64 not installed")
	}
	dir, err := os.MkdirTemp("", "rcvm") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock, test = filepath.Join(dir, "qmp.sock"), filepath.Join(dir, "test.sock")
	args := []string{"-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "128",
		"-qmp", "unix:" + sock + ",server=on,wait=off", "-qmp", "unix:" + test + ",server=on,wait=off"}
	for n := 1; n <= 4; n++ {
		args = append(args, "-device", fmt.Sprintf("pcie-root-port,id=rp%d,chassis=%d,bus=pcie.0,addr=%#x", n, n, n+1))
	}
	cmd := exec.Command("qemu-system-x86_64", append(args, extra...)...)
	if err := testproc.Start(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// QEMU binds each socket (the file appears) before it listens on it:
	// wait until both take a connection, not only until both exist.
	listening := func(path string) error {
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
		}
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err1, err2 := listening(sock), listening(test)
		if err1 == nil && err2 == nil {
			return sock, test
		}
		if time.Now().After(deadline) {
			t.Fatalf("no QMP sockets: %v, %v", err1, err2)
		}
		time.Sleep(20 * time.Millisecond) // polling for the sockets, bounded by the deadline
	}
}

// converge runs passes over sandbox id until one succeeds, for at most a
// minute: just after QEMU starts, its firmware is still setting the
// machine up and a first hot-plug may be refused.
func converge(t testing.TB, ctx context.Context, r *Reconciler, id string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		err := r.Reconcile(ctx, id)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox %s not converged within a minute: %v", id, err)
		}
		time.Sleep(100 * time.Millisecond) // between retries, bounded by the deadline
	}
}

// qemuSandbox makes a throwaway sandbox netns with links veths (net0…,
// peers in another netns), a real QEMU without a guest, and a Reconciler
// on a fresh state dir; it skips unless root with /dev/net/tun.
func qemuSandbox(t testing.TB, prefix string, links int) (testnet.NS, string, *Reconciler) {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("skipping: no /dev/net/tun")
	}
	ns := testnet.NewNS(t, prefix)
	peer := testnet.NewNS(t, prefix+"peer")
	for i := range links {
		testnet.Veth(t, ns, fmt.Sprintf("net%d", i), macN(i+1), peer, fmt.Sprintf("peer%d", i))
	}
	sock, _ := startQEMU(t)
	store, err := state.Open(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	r := New(store)
	t.Cleanup(r.Close)
	return ns, sock, r
}

// The whole pass against the kernel and a real QEMU whose guest never
// answers: removing four NICs takes one unplug timeout, not four, and the
// passes that check back take none.
func TestReconcileUnplugsOnceQEMU(t *testing.T) {
	ns, sock, r := qemuSandbox(t, "tapsync-unplug", 4)
	const unplugTimeout = 2 * time.Second
	sb := Sandbox{ID: "unplug", Netns: ns.Path, QMP: sock, Queues: 1, Vhost: datapath.VhostOff, UnplugTimeout: unplugTimeout,
		Placement: qmp.Placement{Hotplug: qmp.HotplugRootPort}}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	converge(t, ctx, r, sb.ID) // four NICs plugged
	rec, err := r.store.Load(ctx, sb.ID)
	if err != nil || len(rec.Endpoints) != 4 {
		t.Fatalf("record %+v, %v; want four endpoints", rec, err)
	}

	for i := range 4 {
		testnet.IP(t, "-n", ns.Name, "link", "del", fmt.Sprintf("net%d", i))
	}
	// Structure, not speed: four waits one after another take 8 s; one
	// takes 2 s plus a few QMP round trips.
	start := time.Now()
	err = r.Reconcile(ctx, sb.ID)
	took := time.Since(start)
	t.Logf("pass removing four unanswered NICs: %s (unplug timeout %s): %v", took.Round(time.Millisecond), unplugTimeout, err)
	if CauseOf(err) != CauseWaiting {
		t.Errorf("err = %v; want the pass waiting on pending unplugs", err)
	}
	// Sequential waits take 4× the timeout; 3× leaves a loaded machine room.
	if took < unplugTimeout || took >= 3*unplugTimeout {
		t.Errorf("the pass took %s; want one unplug timeout (%s .. %s)", took, unplugTimeout, 3*unplugTimeout)
	}
	st := statusOf(r, sb.ID)
	if !slices.Equal(st.Pending, []int{0, 1, 2, 3}) {
		t.Errorf("status pending = %v; want all four", st.Pending)
	}

	// Checking back waits for nothing.
	start = time.Now()
	err = r.Reconcile(ctx, sb.ID)
	if took := time.Since(start); took >= unplugTimeout {
		t.Errorf("a pass checking back on pending unplugs took %s; it must not wait for the guest", took)
	}
	if CauseOf(err) != CauseWaiting {
		t.Errorf("check-back pass: err = %v; want waiting", err)
	}
	rec, _ = r.store.Load(ctx, sb.ID)
	for _, e := range rec.Endpoints {
		if !e.Removing || !e.UnplugRequested {
			t.Errorf("recorded %+v; want removing with its unplug requested", e)
		}
	}
}

func statusOf(r *Reconciler, id string) Status {
	for _, s := range r.Status() {
		if s.Sandbox.ID == id {
			return s
		}
	}
	return Status{}
}
