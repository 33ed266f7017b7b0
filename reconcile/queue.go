package reconcile

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Backoff bounds for a sandbox whose reconcile keeps failing: the first
// retry comes quickly (a netns bind mount landing, a QMP socket appearing),
// later ones spread out, and none is ever given up.
const (
	BackoffBase = 10 * time.Millisecond
	BackoffMax  = 2 * time.Minute
)

// Backoff is the delay before retry number failures (1-based).
func Backoff(failures int) time.Duration {
	d := BackoffBase
	for i := 1; i < failures && d < BackoffMax; i++ {
		d *= 2
	}
	return min(d, BackoffMax)
}

// AgainWait bounds how long a pass asked for during a successful pass of
// the same key waits behind the keys triggered after it (see Queue).
const AgainWait = 10 * time.Second

// Queue holds sandbox keys waiting to be reconciled. Triggers for one key
// coalesce, a key is never handed to two workers at once, a trigger during
// its pass causes exactly one more pass, and nothing polls. A key whose
// last pass failed waits out its backoff whatever triggers it (its
// scheduled retry is the pass they ask for); only Kick may cut one wait
// short.
//
// The pass a trigger during a successful pass asks for is most often the
// one that confirms what that pass did (its own links and filters make
// netlink events like anyone's): it waits behind the keys triggered
// otherwise, for at most AgainWait, so that on a busy node the passes
// that wire something new come first. A Kick during the pass (news the
// pass cannot have caused) sends it with the others. The same work is
// done; what a user waits for comes sooner.
type Queue struct {
	mu    sync.Mutex
	cond  *sync.Cond
	ready []string // keys waiting for a worker, in arrival order
	// again are keys triggered during their own successful pass, in the
	// order their pass ended, with when it did (see AgainWait).
	again      []againKey
	now        func() time.Time // time.Now; tests set it
	dirty      map[string]bool  // keys that need a pass (ready or requeued after processing)
	processing map[string]bool
	failures   map[string]int
	retry      map[string]*time.Timer // keys waiting out a backoff, by their retry timer
	// kicked keys had a backoff wait cut short by Kick; they cannot cut
	// another until a scheduled retry has run or a pass succeeded.
	kicked map[string]bool
	// urgent keys were kicked during their pass: the pass that follows is
	// no confirmation and goes with the others, not into again.
	urgent   map[string]bool
	shutdown bool
	backoff  func(failures int) time.Duration // Backoff; tests stretch it
}

// againKey is a key of Queue.again.
type againKey struct {
	key   string
	since time.Time
}

// NewQueue returns an empty queue.
func NewQueue() *Queue {
	q := &Queue{dirty: map[string]bool{}, processing: map[string]bool{}, failures: map[string]int{},
		retry: map[string]*time.Timer{}, kicked: map[string]bool{}, urgent: map[string]bool{}, backoff: Backoff, now: time.Now}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Add asks for one pass over key. A key waiting out a backoff keeps
// waiting: its scheduled retry is that pass.
func (q *Queue) Add(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.retry[key] != nil {
		return
	}
	q.addLocked(key)
}

// Kick asks for one pass over key now, for a change the key's own passes
// cannot have caused (a pass waiting as a confirmation joins the others). It cuts a backoff wait short at most once between
// two scheduled retries (otherwise it waits, like Add), so a failing key
// runs at most twice as often as its backoff schedule, however often it is
// kicked. The failure count stays: a kicked pass that fails waits longer.
func (q *Queue) Kick(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if t := q.retry[key]; t != nil {
		if q.kicked[key] {
			return
		}
		t.Stop()
		delete(q.retry, key)
		q.kicked[key] = true
	}
	if q.processing[key] {
		q.urgent[key] = true
	}
	for i, a := range q.again {
		if a.key == key { // not a confirmation: it goes with the others
			q.again = append(q.again[:i], q.again[i+1:]...)
			q.ready = append(q.ready, key)
			return
		}
	}
	q.addLocked(key)
}

// addLocked queues key; q.mu must be held.
func (q *Queue) addLocked(key string) {
	if q.shutdown || q.dirty[key] {
		return
	}
	q.dirty[key] = true
	if q.processing[key] {
		return // requeued by done
	}
	q.ready = append(q.ready, key)
	q.cond.Signal()
}

// Len is the number of keys waiting for a worker.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.ready) + len(q.again)
}

// Failures is the number of consecutive failed passes over key.
func (q *Queue) Failures(key string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.failures[key]
}

// Forget drops key's failure count and pending retry (sandbox gone).
func (q *Queue) Forget(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.failures, key)
	delete(q.kicked, key)
	delete(q.urgent, key)
	if t := q.retry[key]; t != nil {
		t.Stop()
		delete(q.retry, key)
	}
}

// retryLocked runs when key's backoff timer t fires; q.mu must be held. A
// timer that was stopped too late to keep it from firing is no longer
// key's timer and does nothing.
func (q *Queue) retryLocked(key string, t *time.Timer) {
	if q.retry[key] != t {
		return
	}
	delete(q.retry, key)
	delete(q.kicked, key)
	q.addLocked(key)
}

func (q *Queue) get() (string, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.ready) == 0 && len(q.again) == 0 && !q.shutdown {
		q.cond.Wait()
	}
	if q.shutdown {
		return "", false
	}
	var key string
	if len(q.ready) > 0 && (len(q.again) == 0 || q.now().Sub(q.again[0].since) < AgainWait) {
		key, q.ready = q.ready[0], q.ready[1:]
	} else {
		key, q.again = q.again[0].key, q.again[1:]
	}
	delete(q.dirty, key)
	q.processing[key] = true
	return key, true
}

// done ends a pass over key. A failed pass schedules a retry after the
// key's backoff, and triggers that came during it wait for that retry
// (the first failure of a streak that only met a vanished link is retried
// at once); a successful one resets the backoff and runs once more if
// triggered meanwhile. A pass that ended connecting (ErrConnecting) is
// neither: its count stays, and it runs once more if triggered meanwhile.
func (q *Queue) done(key string, err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.processing, key)
	urgent := q.urgent[key]
	delete(q.urgent, key)
	if t := q.retry[key]; t != nil {
		t.Stop()
		delete(q.retry, key)
	}
	if errors.Is(err, ErrConnecting) {
		// Neither a failure nor a success: the dial's end asks for the
		// next pass, which the failure count still spaces if it fails.
		q.requeueLocked(key)
		return
	}
	if err != nil && !q.shutdown {
		q.failures[key]++
		if q.failures[key] == 1 && CauseOf(err) == CauseChanged {
			// A link went away under the pass: the next pass sees the
			// netns as it is now, so it runs at once — once; a second
			// such failure in a row waits its backoff like any other.
			delete(q.dirty, key)
			q.addLocked(key)
			return
		}
		delete(q.dirty, key) // the retry is the pass they asked for
		var t *time.Timer
		t = time.AfterFunc(q.backoff(q.failures[key]), func() {
			q.mu.Lock()
			defer q.mu.Unlock()
			q.retryLocked(key, t)
		})
		q.retry[key] = t
		return
	}
	delete(q.failures, key)
	delete(q.kicked, key)
	switch {
	case !q.dirty[key]:
	case urgent:
		q.requeueLocked(key)
	default:
		q.again = append(q.again, againKey{key, q.now()})
		q.cond.Signal()
	}
}

// requeueLocked hands key, done, back to the workers if it was triggered
// during its pass; q.mu must be held.
func (q *Queue) requeueLocked(key string) {
	if q.dirty[key] {
		q.ready = append(q.ready, key)
		q.cond.Signal()
	}
}

// Run starts workers goroutines that call fn for each queued key until ctx
// ends, then waits for passes in flight to return.
func (q *Queue) Run(ctx context.Context, workers int, fn func(ctx context.Context, key string) error) {
	stop := context.AfterFunc(ctx, func() {
		q.mu.Lock()
		q.shutdown = true
		for _, t := range q.retry {
			t.Stop()
		}
		q.cond.Broadcast()
		q.mu.Unlock()
	})
	defer stop()
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Go(func() {
			for {
				key, ok := q.get()
				if !ok {
					return
				}
				q.done(key, fn(ctx, key))
			}
		})
	}
	wg.Wait()
}
