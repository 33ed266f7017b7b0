package reconcile

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestQueueCoalescesAndRequeuesOnce(t *testing.T) {
	q := NewQueue()
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu      sync.Mutex
		passes  = map[string]int{}
		running atomic.Int32
		overlap atomic.Bool
	)
	release := make(chan struct{})
	first := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		q.Run(ctx, 4, func(_ context.Context, key string) error {
			if running.Add(1) > 1 && key == "a" {
				overlap.Store(true)
			}
			defer running.Add(-1)
			mu.Lock()
			passes[key]++
			n := passes[key]
			mu.Unlock()
			if key == "a" && n == 1 {
				first <- struct{}{}
				<-release
			}
			return nil
		})
		close(done)
	}()
	q.Add("a")
	<-first // pass 1 of "a" is running
	for range 100 {
		q.Add("a") // all during pass 1: exactly one more pass
	}
	close(release)
	count := func() int { mu.Lock(); defer mu.Unlock(); return passes["a"] }
	eventually(t, "second pass", func() bool { return count() == 2 })
	q.Add("b")
	q.Add("b")
	eventually(t, "b", func() bool { mu.Lock(); defer mu.Unlock(); return passes["b"] >= 1 })
	cancel()
	<-done
	if got := count(); got != 2 {
		t.Errorf("passes over a = %d, want 2", got)
	}
	if overlap.Load() {
		t.Error("key a was processed by two workers at once")
	}
}

func TestQueueBacksOffAndRecovers(t *testing.T) {
	q := NewQueue()
	ctx, cancel := context.WithCancel(context.Background())
	var calls atomic.Int32
	done := make(chan struct{})
	go func() {
		q.Run(ctx, 2, func(context.Context, string) error {
			if calls.Add(1) <= 3 {
				return errors.New("not yet")
			}
			return nil
		})
		close(done)
	}()
	q.Add("sb")
	eventually(t, "recovery after 3 failures", func() bool { return calls.Load() == 4 && q.Failures("sb") == 0 })
	cancel()
	<-done
}

func TestBackoff(t *testing.T) {
	if Backoff(1) != BackoffBase || Backoff(2) != 2*BackoffBase || Backoff(100) != BackoffMax {
		t.Errorf("backoff 1,2,100 = %v %v %v", Backoff(1), Backoff(2), Backoff(100))
	}
}

func TestQueueSlowKeyDoesNotBlockOthers(t *testing.T) {
	q := NewQueue()
	ctx, cancel := context.WithCancel(context.Background())
	hung := make(chan struct{})
	var fast atomic.Int32
	done := make(chan struct{})
	go func() {
		q.Run(ctx, 2, func(ctx context.Context, key string) error {
			if key == "hung" {
				select {
				case <-hung:
				case <-ctx.Done():
				}
				return nil
			}
			fast.Add(1)
			return nil
		})
		close(done)
	}()
	q.Add("hung")
	for _, k := range []string{"a", "b", "c"} {
		q.Add(k)
	}
	eventually(t, "other sandboxes reconciled while one hangs", func() bool { return fast.Load() == 3 })
	cancel()
	<-done // Run returns once the hung pass sees ctx end
	close(hung)
}

// passLog records the passes of a queue's work function.
type passLog struct {
	mu     sync.Mutex
	starts map[string][]time.Time
	ends   map[string][]time.Time
}

func newPassLog() *passLog {
	return &passLog{starts: map[string][]time.Time{}, ends: map[string][]time.Time{}}
}

func (l *passLog) start(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.starts[key] = append(l.starts[key], time.Now())
}

func (l *passLog) end(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ends[key] = append(l.ends[key], time.Now())
}

func (l *passLog) count(key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.starts[key])
}

// runQueue runs q with workers calling fn until the test ends.
func runQueue(t *testing.T, q *Queue, workers int, fn func(ctx context.Context, key string) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		q.Run(ctx, workers, fn)
		close(done)
	}()
	t.Cleanup(func() { cancel(); <-done })
}

// A failing key waits out its backoff whatever triggers it: here a
// trigger during every pass (the event its own failed mutation causes)
// and a stream of triggers between passes. Each pass starts no earlier
// than its backoff after the failed one before it: a timer never fires
// early, so the check holds on any machine. Without the rule the triggers
// start passes back to back.
func TestQueueFailingKeyKeepsItsBackoff(t *testing.T) {
	q := NewQueue()
	l := newPassLog()
	runQueue(t, q, 2, func(_ context.Context, key string) error {
		l.start(key)
		defer l.end(key)
		q.Add(key) // our own event, seen while the pass runs
		return errors.New("hot-add failed")
	})
	stop := make(chan struct{})
	hammered := make(chan struct{})
	go func() {
		defer close(hammered)
		for {
			select {
			case <-stop:
				return
			default:
				q.Add("sb")
				time.Sleep(50 * time.Microsecond)
			}
		}
	}()
	const passes = 7 // 10+20+40+80+160+320 ms of backoff
	eventually(t, "7 failed passes", func() bool { return l.count("sb") >= passes })
	close(stop)
	<-hammered
	l.mu.Lock()
	defer l.mu.Unlock()
	for n := 1; n < passes; n++ {
		gap := l.starts["sb"][n].Sub(l.ends["sb"][n-1])
		if gap < Backoff(n) {
			t.Errorf("pass %d started %v after failed pass %d ended, want at least its backoff %v", n+1, gap, n, Backoff(n))
		}
	}
}

// stretched returns a queue whose backoff is an hour, so that a retry
// never comes by itself during a test.
func stretched() *Queue {
	q := NewQueue()
	q.backoff = func(int) time.Duration { return time.Hour }
	return q
}

// probe proves that nothing is queued for key: with one worker and a
// first-in-first-out queue, a pass over key queued before the probe would
// have run before the probe's own pass.
func probe(t *testing.T, q *Queue, l *passLog, key string, want int) {
	t.Helper()
	before := l.count("probe")
	q.Add("probe")
	eventually(t, "the probe's pass", func() bool { return l.count("probe") > before })
	if got := l.count(key); got != want {
		t.Errorf("passes over %s = %d, want %d", key, got, want)
	}
}

// Triggers during a failing pass and during its backoff wait do not run
// it early: the retry is the pass they asked for.
func TestQueueAddWaitsForBackoff(t *testing.T) {
	q := stretched()
	l := newPassLog()
	runQueue(t, q, 1, func(_ context.Context, key string) error {
		l.start(key)
		if key == "probe" {
			return nil
		}
		q.Add(key) // during the pass
		return errors.New("failing")
	})
	q.Add("sb")
	eventually(t, "the first pass", func() bool { return q.Failures("sb") >= 1 })
	for range 100 {
		q.Add("sb")
	}
	probe(t, q, l, "sb", 1)
}

// Kick cuts one backoff wait short, and no more until a scheduled retry
// has run; the failure count is kept. A success resets everything.
func TestQueueKickCutsOneWait(t *testing.T) {
	q := stretched()
	l := newPassLog()
	var fail atomic.Bool
	fail.Store(true)
	runQueue(t, q, 1, func(_ context.Context, key string) error {
		l.start(key)
		if key == "probe" || !fail.Load() {
			return nil
		}
		return errors.New("failing")
	})
	q.Add("sb")
	eventually(t, "the first failure", func() bool { return q.Failures("sb") == 1 })
	q.Kick("sb")
	eventually(t, "the kicked pass", func() bool { return q.Failures("sb") == 2 })
	q.Kick("sb")
	q.Kick("sb")
	probe(t, q, l, "sb", 2) // the second wait is not cut short

	// The scheduled retry comes (its timer fired): the next wait may be
	// cut once more.
	q.mu.Lock()
	q.retryLocked("sb", q.retry["sb"])
	q.mu.Unlock()
	eventually(t, "the scheduled retry", func() bool { return q.Failures("sb") == 3 })
	q.Kick("sb")
	eventually(t, "the kicked pass after the retry", func() bool { return q.Failures("sb") == 4 })

	// Recovery: a kick is honoured only while waiting, and a success
	// clears the count.
	fail.Store(false)
	q.mu.Lock()
	q.retryLocked("sb", q.retry["sb"])
	q.mu.Unlock()
	eventually(t, "recovery", func() bool { return q.Failures("sb") == 0 && l.count("sb") == 5 })
	q.Kick("sb")
	eventually(t, "a kicked pass of a healthy key", func() bool { return l.count("sb") == 6 })
}

// A stopped timer that fired anyway (Stop lost the race) must not run a
// pass: only the key's current timer counts.
func TestQueueStaleRetryIgnored(t *testing.T) {
	q := stretched()
	l := newPassLog()
	runQueue(t, q, 1, func(_ context.Context, key string) error {
		l.start(key)
		if key == "probe" {
			return nil
		}
		return errors.New("failing")
	})
	q.Add("sb")
	eventually(t, "the first failure", func() bool { return q.Failures("sb") == 1 })
	q.mu.Lock()
	q.retryLocked("sb", time.NewTimer(time.Hour)) // not sb's timer
	q.mu.Unlock()
	probe(t, q, l, "sb", 1)
}

// A pass that met a vanished link is retried at once, once: the second
// such failure in a row waits its backoff like any failure.
func TestQueueChangedRetriedOnce(t *testing.T) {
	q := stretched()
	l := newPassLog()
	runQueue(t, q, 1, func(_ context.Context, key string) error {
		l.start(key)
		if key == "probe" {
			return nil
		}
		return WithCause(CauseChanged, errors.New("endpoint 0: Link not found"))
	})
	q.Add("sb")
	eventually(t, "the retry at once", func() bool { return q.Failures("sb") >= 2 })
	probe(t, q, l, "sb", 2)
}

// A pass that ends connecting (ErrConnecting) is neither a failure nor a
// success: the failure count stays, no retry is scheduled (Add is not
// absorbed by one), and a trigger during it runs one more pass.
func TestQueueConnectingIsNoFailure(t *testing.T) {
	q := NewQueue()
	q.processing["a"] = true
	q.failures["a"] = 2
	q.done("a", ErrConnecting)
	if q.failures["a"] != 2 || q.retry["a"] != nil || len(q.ready) != 0 {
		t.Fatalf("after a connecting pass: failures %d, retry %v, ready %v; want 2, none, none", q.failures["a"], q.retry["a"], q.ready)
	}
	q.Add("a") // the dial's end
	if len(q.ready) != 1 {
		t.Fatalf("ready = %v after Add; want a", q.ready)
	}
	key, _ := q.get()
	q.Add("a") // during the pass
	q.done(key, ErrConnecting)
	if len(q.ready) != 1 || q.failures["a"] != 2 {
		t.Errorf("ready = %v, failures %d after a trigger during a connecting pass; want a once more, 2", q.ready, q.failures["a"])
	}
}

// TestQueueConfirmationWaitsBehindNewWork: a pass asked for during a
// successful pass of its key waits behind keys triggered otherwise, at
// most AgainWait; a Kick, then or during the pass, makes it one of them.
func TestQueueConfirmationWaitsBehindNewWork(t *testing.T) {
	q := NewQueue()
	var mu sync.Mutex
	now := time.Unix(1000, 0)
	q.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	// serve runs n passes, calling between after the first, and returns
	// their keys in order. A key missing from the queue fails the test
	// (get would wait for it for good).
	serve := func(n int, between func()) string {
		t.Helper()
		var order []string
		for i := range n {
			if q.Len() == 0 {
				t.Fatalf("after passes %v, none of the %d asked for is queued", order, n-i)
			}
			k, _ := q.get()
			order = append(order, k)
			q.done(k, nil)
			if i == 0 && between != nil {
				between()
			}
		}
		return strings.Join(order, " ")
	}
	for _, tc := range []struct {
		name    string
		setup   func()
		between func()
	}{
		{"a confirmation that waited AgainWait goes before later keys",
			func() {
				q.Add("a")
				q.get()
				q.Add("a")
				q.Add("b")
				q.Add("c")
				q.done("a", nil)
			},
			func() { mu.Lock(); now = now.Add(AgainWait); mu.Unlock() }},
		{"a confirmation kicked goes in arrival order",
			func() {
				q.Add("a")
				q.get()
				q.Add("a")
				q.Add("b")
				q.done("a", nil)
				q.Kick("a")
				q.Add("c")
			}, nil},
		{"a key kicked during its pass is no confirmation",
			func() {
				q.Add("a")
				q.get()
				q.Add("b")
				q.Kick("a")
				q.done("a", nil)
				q.Add("c")
			}, nil},
	} {
		tc.setup()
		if got := serve(3, tc.between); got != "b a c" {
			t.Errorf("%s: order %q, want \"b a c\"", tc.name, got)
		}
		if q.Len() != 0 {
			t.Errorf("%s: Len = %d at the end, want 0", tc.name, q.Len())
		}
	}
	// Not kicked nor waited out: behind the later keys.
	q.Add("a")
	q.get()
	q.Add("a")
	q.Add("b")
	q.done("a", nil)
	q.Add("c")
	if got := serve(3, nil); got != "b c a" {
		t.Errorf("a confirmation: order %q, want \"b c a\"", got)
	}
}
