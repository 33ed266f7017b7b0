package testagent

import (
	"sync"
	"time"

	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// timelineCap bounds the events a Timeline keeps: a benchmark round adds
// a few dozen, and the host asks for them after every round.
const timelineCap = 4096

// Timeline is a bounded log of what the agent saw, with the guest's
// clock, for the test-only Timeline control method: the measurement of
// where a hot-plug's time goes in the guest. Safe for concurrent use; a
// nil *Timeline records nothing.
type Timeline struct {
	mu     sync.Mutex
	next   uint64          // the sequence number of the next event
	events []control.Event // the last timelineCap, oldest first
}

// NewTimeline returns an empty timeline.
func NewTimeline() *Timeline { return &Timeline{next: 1} }

// Record adds an event that happens now.
func (t *Timeline) Record(kind, mac, detail string) { t.RecordAt(time.Now(), kind, mac, detail) }

// RecordAt adds an event that happened at at (the guest's CLOCK_REALTIME).
func (t *Timeline) RecordAt(at time.Time, kind, mac, detail string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.events) == timelineCap {
		t.events = append(t.events[:0], t.events[1:]...)
	}
	t.events = append(t.events, control.Event{Seq: t.next, T: at, Kind: kind, MAC: mac, Detail: detail})
	t.next++
}

// Since returns the events after sequence number after, oldest first.
func (t *Timeline) Since(after uint64) control.TimelineReply {
	var r control.TimelineReply
	if t == nil {
		return r
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, e := range t.events {
		if e.Seq > after {
			r.Events = append(r.Events, t.events[i:]...)
			if first := e.Seq; first > after+1 {
				r.Dropped = first - after - 1
			}
			break
		}
	}
	return r
}
