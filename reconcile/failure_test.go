package reconcile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

func TestCauseOf(t *testing.T) {
	// A real failed dial of a missing socket, as a missing Kata extra
	// monitor fails.
	_, dialErr := qmp.Dial(context.Background(), filepath.Join(t.TempDir(), "extra-monitor.sock"), qmp.Options{Timeout: time.Second})
	if dialErr == nil {
		t.Fatal("dial of a missing socket succeeded")
	}
	_, netErr := net.Dial("unix", filepath.Join(t.TempDir(), "none.sock"))
	// A real failed write of a record: its state dir is gone.
	dir := filepath.Join(t.TempDir(), "state")
	store, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	saveErr := store.Save(state.Record{Sandbox: "a"})
	if saveErr == nil {
		t.Fatal("a record saved into a removed state dir")
	}
	for _, c := range []struct {
		name string
		err  error
		want string
	}{
		{"success", nil, ""},
		{"missing monitor", fmt.Errorf("sandbox a: %w", dialErr), CauseQMP},
		{"missing monitor in open", WithCause(CauseNetns, fmt.Errorf("sandbox a: %w", dialErr)), CauseQMP},
		{"unix dial", netErr, CauseQMP},
		{"connection died", fmt.Errorf("endpoint 0: hot-add: %w", fmt.Errorf("qmp /x: %w: read: junk", qmp.ErrClosed)), CauseQMP},
		{"QEMU error reply", WithCause(CauseNetns, &qmp.Error{Cmd: "device_add", Class: "GenericError", Desc: "Bus 'pci.1' not found"}), CauseQMP},
		{"busy monitor", fmt.Errorf("x: %w", qmp.ErrNoGreeting), CauseQMP},
		{"full bridge", fmt.Errorf("x: %w", qmp.ErrNoFreeSlot), CauseQMP},
		{"host side", WithCause(CauseNetns, errors.New("add redirect eth0→tsn0: file exists")), CauseNetns},
		{"guest", WithCause(CauseAgent, errors.New("guest agent at vsock://3:1024: connection refused")), CauseAgent},
		{"pending unplug", WithCause(CauseWaiting, fmt.Errorf("unplug pending: %w", qmp.ErrRemovalPending)), CauseWaiting},
		{"teardown", fmt.Errorf("sandbox a: %w: guest holds NICs", ErrTeardownWaiting), CauseWaiting},
		{"removal pending from QEMU", fmt.Errorf("x: %w", qmp.ErrRemovalPending), CauseWaiting},
		{"link went away", WithCause(CauseChanged, fmt.Errorf("sandbox a: endpoint 0: redirect: %w", errors.New("Link not found"))), CauseChanged},
		{"state dir", WithCause(CauseNetns, fmt.Errorf("sandbox a: endpoint 0: record: %w", saveErr)), CauseState},
		{"state dir beside a QEMU error", errors.Join(&qmp.Error{Cmd: "device_add", Class: "GenericError"}, saveErr), CauseState},
		{"unknown", errors.New("disk full"), CauseOther},
	} {
		if got := CauseOf(c.err); got != c.want {
			t.Errorf("%s: CauseOf(%v) = %q, want %q", c.name, c.err, got, c.want)
		}
	}
}

// The same failure, its numbers changing from pass to pass (an fd, a
// temp path), is logged on the first failure and then at the relog
// points only; a different failure is logged at once; the recovery is
// logged with the streak's length.
func TestFailureLogOncePerErrorThenAtIntervals(t *testing.T) {
	var f FailureLog
	now := time.Unix(1700000000, 0)
	var logged []int
	for n := 1; n <= 100; n++ {
		err := fmt.Errorf("sandbox a: qmp getfd fdname=tsn0-q%d on /run/vc/vm/a/extra-monitor.sock: %w", n%7, qmp.ErrClosed)
		r := f.Note("a", err, now)
		if r.Failures != n {
			t.Fatalf("failure %d counted as %d", n, r.Failures)
		}
		if want := now.Add(Backoff(n)); !r.Next.Equal(want) {
			t.Errorf("failure %d: next attempt %v, want %v", n, r.Next, want)
		}
		if r.Cause != CauseQMP {
			t.Errorf("failure %d: cause %q", n, r.Cause)
		}
		if r.LogIt {
			logged = append(logged, n)
		}
		now = now.Add(Backoff(n))
	}
	if want := []int{1, 8, 16, 32, 62, 92}; fmt.Sprint(logged) != fmt.Sprint(want) {
		t.Errorf("logged at failures %v, want %v", logged, want)
	}
	if r := f.Note("a", errors.New("sandbox a: netns /var/run/netns/x: no such file"), now); !r.LogIt || r.Failures != 101 {
		t.Errorf("a new error: %+v, want logged as failure 101", r)
	}
	if r := f.Note("b", errors.New("other sandbox"), now); !r.LogIt || r.Failures != 1 {
		t.Errorf("another sandbox's error: %+v, want logged as its failure 1", r)
	}
	if r := f.Note("a", nil, now); r.Recovered != 101 || r.RecoveredW {
		t.Errorf("recovery: %+v, want Recovered 101", r)
	}
	if r := f.Note("a", nil, now); r.Recovered != 0 {
		t.Errorf("a second success reports a recovery: %+v", r)
	}
	if f.Failing() != 1 {
		t.Errorf("failing = %d, want 1 (b)", f.Failing())
	}
}

func TestFailureLogLines(t *testing.T) {
	var buf bytes.Buffer
	log := zerolog.New(&buf)
	var f FailureLog
	_, dialErr := qmp.Dial(context.Background(), filepath.Join(t.TempDir(), "extra-monitor.sock"), qmp.Options{Timeout: time.Second})
	err := fmt.Errorf("sandbox pod1: %w", dialErr)
	for range 3 {
		f.Note("pod1", err, time.Now()).Log(&log, "pod1", err)
	}
	f.Note("pod1", nil, time.Now()).Log(&log, "pod1", nil)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("log lines:\n%s\nwant one failure and one recovery", buf.String())
	}
	for _, want := range []string{`"level":"warn"`, `"retries":1`, `"next_attempt"`, `"cause":"qmp"`, "extra-monitor.sock", `extra_monitor_socket`} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("failure line lacks %s: %s", want, lines[0])
		}
	}
	if !strings.Contains(lines[1], "sandbox pod1 reconciled after 3 failures") {
		t.Errorf("recovery line: %s", lines[1])
	}
}

// A link that went away during a pass is not a failure: no warning, and
// the pass after it recovers as from waiting.
func TestFailureLogLinkVanished(t *testing.T) {
	var buf bytes.Buffer
	log := zerolog.New(&buf).Level(zerolog.InfoLevel)
	var f FailureLog
	err := WithCause(CauseChanged, errors.New("sandbox pod1: endpoint 0: redirect eth0 ⇄ tsn0: Link not found"))
	r := f.Note("pod1", err, time.Now())
	r.Log(&log, "pod1", err)
	if r.Cause != CauseChanged || buf.Len() != 0 {
		t.Errorf("cause %q, logged at info or above: %q", r.Cause, buf.String())
	}
	r = f.Note("pod1", nil, time.Now())
	r.Log(&log, "pod1", nil)
	if r.Recovered != 1 || !r.RecoveredW || !r.RecoveredC || buf.Len() != 0 {
		t.Errorf("recovery %+v (logged %q), want one pass that only saw a link go, not logged at info", r, buf.String())
	}
}
