package watcher

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// recorder is a Sink that keeps every event.
type recorder struct {
	mu     sync.Mutex
	events []Event
}

func (r *recorder) sink(e Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *recorder) all() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.events...)
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

// wait polls until an event at index from or later matches, and returns
// it with its index. On timeout it fails t with the events seen.
func (r *recorder) wait(t *testing.T, from int, what string, match func(Event) bool) (Event, int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		evs := r.all()
		for i := from; i < len(evs); i++ {
			if match(evs[i]) {
				return evs[i], i
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; events since #%d:\n%s", what, from, formatEvents(evs, from))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// none fails t when an event at index from or later matches.
func (r *recorder) none(t *testing.T, from int, what string, match func(Event) bool) {
	t.Helper()
	evs := r.all()
	for i := from; i < len(evs); i++ {
		if match(evs[i]) {
			t.Errorf("unexpected %s: event #%d %+v; events since #%d:\n%s", what, i, evs[i], from, formatEvents(evs, from))
			return
		}
	}
}

func formatEvents(evs []Event, from int) string {
	var b strings.Builder
	for i := from; i < len(evs); i++ {
		e := evs[i]
		fmt.Fprintf(&b, "  #%d %s source=%s path=%q id=%q sandbox=%+v why=%q\n", i, e.Kind, e.Source, e.Path, e.ID, e.Sandbox, e.Why)
	}
	if b.Len() == 0 {
		return "  (none)\n"
	}
	return b.String()
}

// logBuf keeps log lines (JSON) for assertions.
type logBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// waitLine polls until a log line contains every one of parts.
func (l *logBuf) waitLine(t *testing.T, what string, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, line := range strings.Split(l.String(), "\n") {
			ok := line != ""
			for _, p := range parts {
				ok = ok && strings.Contains(line, p)
			}
			if ok {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for log line (%s) containing %q; log:\n%s", what, parts, l.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testCtx returns a context carrying a debug logger that writes to t and to
// the returned buffer. Whatever logs through it must end before t does.
func testCtx(t *testing.T) (context.Context, *logBuf) {
	lb := &logBuf{}
	log := zerolog.New(zerolog.MultiLevelWriter(zerolog.NewTestWriter(t), lb)).Level(zerolog.DebugLevel)
	return log.WithContext(context.Background()), lb
}
