package watcher

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testnet"
)

// scaleSandboxes is how many netns TestNetlinkWatcherScale watches.
const scaleSandboxes = 100

// idleWindow is how long TestNetlinkWatcherScale counts wake-ups of an
// idle watcher. It is a measuring window, not a wait for something: the
// assertion is on the count.
const idleWindow = 2 * time.Second

// newNetnsBatch creates n network namespaces in one ip process and
// deletes them in t.Cleanup; it returns their names.
func newNetnsBatch(t *testing.T, prefix string, n int) []string {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	names := make([]string, n)
	var add, del strings.Builder
	for i := range names {
		names[i] = fmt.Sprintf("%s-%s-%d", prefix, hex.EncodeToString(b), i)
		fmt.Fprintf(&add, "netns add %s\n", names[i])
		fmt.Fprintf(&del, "netns del %s\n", names[i])
	}
	dir := t.TempDir()
	addFile, delFile := filepath.Join(dir, "add"), filepath.Join(dir, "del")
	if err := os.WriteFile(addFile, []byte(add.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(delFile, []byte(del.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// -force: go on past a netns that is already gone.
		if out, err := exec.Command("ip", "-force", "-batch", delFile).CombinedOutput(); err != nil {
			t.Logf("cleanup: ip netns del ×%d: %v: %s", n, err, out)
		}
	})
	testnet.IP(t, "-batch", addFile)
	return names
}

// openFds counts this process's open fds, and those that are sockets.
func openFds(t *testing.T) (all, sockets int) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil {
			all++
			if strings.HasPrefix(l, "socket:") {
				sockets++
			}
		}
	}
	return all, sockets
}

// TestNetlinkWatcherScale watches 100 netns and measures what that holds:
// one socket and one reader goroutine whatever the number of sandboxes,
// and no wake-up at all while nothing changes (the reader sleeps in the
// netpoller; nothing polls a path). A change in any one netns still
// reaches its sandbox, and only it.
func TestNetlinkWatcherScale(t *testing.T) {
	names := newNetnsBatch(t, "tsn", scaleSandboxes)
	w, rec, ctx, _ := newNetlinkWatcher(t)

	fdsBefore, socketsBefore := openFds(t)
	goroutinesBefore := runtime.NumGoroutine()
	for i, name := range names {
		if err := w.Watch(ctx, fmt.Sprintf("sb%d", i), "/var/run/netns/"+name); err != nil {
			t.Fatal(err)
		}
	}
	fdsAfter, socketsAfter := openFds(t)
	goroutines := runtime.NumGoroutine() - goroutinesBefore

	// Once an event from the last netns is in, every datagram before it
	// (the nsid notices of the watches) has been read: the count of
	// wake-ups from here on is the idle count.
	last := len(names) - 1
	testnet.IP(t, "-n", names[last], "link", "add", "sync0", "type", "bridge")
	rec.wait(t, 0, "event for sync0", linkEvent(fmt.Sprintf("sb%d", last), "sync0"))
	woke := w.wakeups.Load()
	events := rec.len()
	time.Sleep(idleWindow)
	idle := w.wakeups.Load() - woke

	t.Logf("%d watched netns: +%d fds (+%d sockets), +%d goroutines, %d wake-ups in %s idle (%d before it)",
		len(names), fdsAfter-fdsBefore, socketsAfter-socketsBefore, goroutines, idle, idleWindow, woke)
	if d := socketsAfter - socketsBefore; d != 2 {
		t.Errorf("sockets held for %d watches: %d, want 2", len(names), d)
	}
	if d := fdsAfter - fdsBefore; d != 2 {
		t.Errorf("fds held for %d watches: %d, want 2 (the socket, and the handle that reads nsids)", len(names), d)
	}
	if goroutines > 2 {
		t.Errorf("goroutines for %d watches: %d, want at most 2 whatever the number", len(names), goroutines)
	}
	if idle != 0 {
		t.Errorf("%d wake-ups in %s with nothing changing, want 0; events meanwhile:\n%s", idle, idleWindow, formatEvents(rec.all(), events))
	}

	// Every netns is heard, each by its own sandbox only.
	from := rec.len()
	mid := len(names) / 2
	testnet.IP(t, "-n", names[mid], "link", "add", "m0", "type", "bridge")
	rec.wait(t, from, "event for m0", linkEvent(fmt.Sprintf("sb%d", mid), "m0"))
	rec.none(t, from, "event for m0 sent to another sandbox", func(e Event) bool {
		return strings.Contains(e.Why, "m0") && e.ID != fmt.Sprintf("sb%d", mid)
	})

	// A storm: three links added in every netns at once. The one socket
	// takes it without dropping anything (no resubscription), and every
	// sandbox hears its own three.
	batch := filepath.Join(t.TempDir(), "storm")
	if err := os.WriteFile(batch, []byte("link add st0 type bridge\nlink add st1 type bridge\nlink add st2 type bridge\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	from = rec.len()
	errs := make(chan error, len(names))
	for _, name := range names {
		go func() {
			out, err := exec.Command("ip", "-n", name, "-batch", batch).CombinedOutput()
			if err != nil {
				err = fmt.Errorf("ip -n %s -batch: %v: %s", name, err, out)
			}
			errs <- err
		}()
	}
	for range names {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// Each sandbox hears its last link, or a resync if messages were
	// dropped (with the kernel's default 208 KiB buffer they are).
	for i := range names {
		id := fmt.Sprintf("sb%d", i)
		rec.wait(t, from, "storm event for st2 or a resync", func(e Event) bool {
			return linkEvent(id, "st2")(e) || (e.ID == id && strings.HasPrefix(e.Why, "netlink resubscribed: "))
		})
	}
	if n := w.Resubscriptions(); n != 0 {
		t.Fatalf("Resubscriptions() after a storm of %d links = %d, want 0", 3*len(names), n)
	}
	for i := range names {
		for _, l := range []string{"st0", "st1"} {
			rec.wait(t, from, "storm event for "+l, linkEvent(fmt.Sprintf("sb%d", i), l))
		}
	}
	t.Logf("storm of %d links in %d netns at once: %d events, %d resubscriptions", 3*len(names), len(names), rec.len()-from, w.Resubscriptions())

	// Stopping them all closes the socket and ends the reader.
	w.StopAll()
	fdsEnd, _ := openFds(t)
	if fdsEnd != fdsBefore {
		t.Errorf("fds after StopAll: %d, want %d as before the first Watch", fdsEnd, fdsBefore)
	}
}
