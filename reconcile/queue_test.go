package reconcile

import (
	"context"
	"errors"
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
