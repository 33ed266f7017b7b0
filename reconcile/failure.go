package reconcile

import (
	"errors"
	"io/fs"
	"net"
	"regexp"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
	"github.com/vishvananda/netlink"
)

// Causes of a failed pass: a small fixed set, so that they can label a
// metric. A pass that is only waiting (an unplug the guest has not
// acknowledged, a plug held until the NIC it replaces is gone, a teardown
// waiting for QEMU) is not broken and says so.
const (
	CauseQMP     = "qmp"     // QEMU's monitor: missing, busy, refusing, or answering oddly
	CauseNetns   = "netns"   // the sandbox netns and what tapsync does in it: links, taps, tc
	CauseState   = "state"   // the state dir: a record cannot be read or written (a full disk)
	CauseAgent   = "agent"   // the guest agent (the host side is done)
	CauseWaiting = "waiting" // not a failure: waiting for the guest or QEMU
	CauseChanged = "changed" // not a failure: a link went away during the pass, which runs again
	CauseOther   = "other"
)

// Causes lists every cause CauseOf returns.
var Causes = []string{CauseQMP, CauseNetns, CauseState, CauseAgent, CauseWaiting, CauseChanged, CauseOther}

// causeError says which side a pass failed on, where the error cannot.
type causeError struct {
	cause string
	err   error
}

func (e *causeError) Error() string { return e.err.Error() }
func (e *causeError) Unwrap() error { return e.err }

// WithCause marks err as failing on the side cause names (one of Causes);
// CauseOf prefers evidence in the error itself for QMP.
func WithCause(cause string, err error) error {
	if err == nil {
		return nil
	}
	return &causeError{cause: cause, err: err}
}

// CauseOf classifies a pass's error into one of Causes, cheaply: waiting
// and agent marks first (a guest failure is reported only when the host
// side worked), then the state dir failing (state.ErrStore), then
// anything QMP in the chain (its sentinels, a QEMU error reply, a failed
// dial of a unix socket: the usual face of a missing Kata extra monitor),
// then the mark the pass put on it.
func CauseOf(err error) string {
	if err == nil {
		return ""
	}
	var ce *causeError
	marked := errors.As(err, &ce)
	switch {
	case marked && (ce.cause == CauseWaiting || ce.cause == CauseAgent):
		return ce.cause
	case errors.Is(err, ErrTeardownWaiting) || errors.Is(err, qmp.ErrRemovalPending):
		return CauseWaiting
	case errors.Is(err, state.ErrStore):
		return CauseState
	case isQMP(err):
		return CauseQMP
	case marked:
		return ce.cause
	}
	return CauseOther
}

// linkVanished says whether err is only links that went away while a
// pass worked on them (datapath.ErrLinkGone, netlink.LinkNotFoundError). Of errors joined
// together, every one must be such: one real failure beside a vanished
// link is a failure.
func linkVanished(err error) bool {
	for err != nil {
		if err == datapath.ErrLinkGone {
			return true
		}
		switch e := err.(type) {
		case netlink.LinkNotFoundError:
			return true
		case interface{ Unwrap() []error }:
			errs := e.Unwrap()
			for _, x := range errs {
				if !linkVanished(x) {
					return false
				}
			}
			return len(errs) > 0
		}
		err = errors.Unwrap(err)
	}
	return false
}

func isQMP(err error) bool {
	var qe *qmp.Error
	var oe *net.OpError
	return errors.Is(err, qmp.ErrClosed) || errors.Is(err, qmp.ErrNoGreeting) || errors.Is(err, qmp.ErrNoFreeSlot) ||
		errors.Is(err, qmp.ErrNetdevOrphaned) || errors.As(err, &qe) || (errors.As(err, &oe) && oe.Net == "unix")
}

// digits are what varies between two reports of one failure: fds, pids,
// indexes, ports, durations, the numbers in a temp socket path.
var digits = regexp.MustCompile(`[0-9]+`)

// normalise is an error's text with its numbers blanked, so that errors
// that differ only in them count as the same failure.
func normalise(msg string) string { return digits.ReplaceAllString(msg, "#") }

// relog reports whether failure number n of a streak of one error is
// logged again: at failures 8, 16 and 32, then every 30th failure.
func relog(n int) bool {
	switch {
	case n == 8 || n == 16 || n == 32:
		return true
	case n > 32:
		return (n-32)%30 == 0
	}
	return false
}

// streak is one sandbox's run of consecutive failed passes.
type streak struct {
	failures int
	since    time.Time // first failure
	logged   string    // normalised form of the error last logged
	failed   bool      // some pass of the streak failed rather than waited
	waited   bool      // some pass of the streak waited (rather than only saw a link go)
}

// FailureLog logs failed passes so that they show without flooding: each
// distinct error of a sandbox once (errors that differ only in numbers are
// one error), the same error again at growing intervals (see relog) with
// the failure count and the next attempt, and the recovery. Its counts
// follow a Queue's when it is told every outcome of every pass. Safe for
// concurrent use.
type FailureLog struct {
	mu      sync.Mutex
	streaks map[string]*streak
}

// Report is what FailureLog.Note decided about one outcome.
type Report struct {
	Cause    string    // CauseOf the error; "" for a success
	Failures int       // consecutive failed passes, this one included
	Since    time.Time // first failure of the streak
	Next     time.Time // when the queue retries (at the latest)
	LogIt    bool      // log this failure (new error, or a relog)
	// Recovered is the length of the streak a success ended (0: none).
	Recovered  int
	RecoveredW bool // the streak ended had only waited
	RecoveredC bool // the streak ended had only seen links go away during passes
}

// Note records the outcome of one pass over sandbox id at now and says
// what to log (Report.Log logs it).
func (f *FailureLog) Note(id string, err error, now time.Time) Report {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.streaks == nil {
		f.streaks = map[string]*streak{}
	}
	s := f.streaks[id]
	if err == nil {
		delete(f.streaks, id)
		if s == nil {
			return Report{}
		}
		return Report{Recovered: s.failures, RecoveredW: !s.failed, RecoveredC: !s.failed && !s.waited, Since: s.since}
	}
	if s == nil {
		s = &streak{since: now}
		f.streaks[id] = s
	}
	s.failures++
	r := Report{Cause: CauseOf(err), Failures: s.failures, Since: s.since, Next: now.Add(Backoff(s.failures))}
	s.failed = s.failed || (r.Cause != CauseWaiting && r.Cause != CauseChanged)
	s.waited = s.waited || r.Cause == CauseWaiting
	if key := normalise(err.Error()); key != s.logged {
		s.logged, r.LogIt = key, true
	} else {
		r.LogIt = relog(s.failures)
	}
	return r
}

// Failing is the number of sandboxes whose last pass failed or waited.
func (f *FailureLog) Failing() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.streaks)
}

// Log writes what r decided about err to log, whose events should carry
// the sandbox field.
func (r Report) Log(log *zerolog.Logger, id string, err error) {
	switch {
	case r.Recovered > 0 && r.RecoveredC:
		log.Debug().Int("passes", r.Recovered).Msgf("sandbox %s reconciled after links went away during %d passes", id, r.Recovered)
	case r.Recovered > 0 && r.RecoveredW:
		log.Info().Int("passes", r.Recovered).Dur("waited", time.Since(r.Since).Round(time.Millisecond)).
			Msgf("sandbox %s reconciled after waiting %d passes", id, r.Recovered)
	case r.Recovered > 0:
		log.Info().Int("failures", r.Recovered).Dur("failing_for", time.Since(r.Since).Round(time.Millisecond)).
			Msgf("sandbox %s reconciled after %d failures", id, r.Recovered)
	case err == nil || !r.LogIt:
	case r.Cause == CauseChanged:
		log.Debug().Err(err).Int("retries", r.Failures).Time("next_attempt", r.Next).Str("cause", r.Cause).
			Msg("a link went away during the pass; passed again")
	case r.Cause == CauseWaiting:
		log.Info().Err(err).Int("retries", r.Failures).Time("next_attempt", r.Next).Str("cause", r.Cause).
			Msg("pass not finished: waiting, retried with backoff")
	default:
		ev := log.Warn()
		if r.Cause == CauseQMP && errors.Is(err, fs.ErrNotExist) {
			// The most common case on a Kata node.
			ev = ev.Str("hint", `no QMP socket: Kata serves its extra monitor only with enable_debug = true and extra_monitor_socket = "qmp" in [hypervisor.qemu]`)
		}
		if r.Failures > 1 {
			ev = ev.Dur("failing_for", time.Since(r.Since).Round(time.Millisecond))
		}
		ev.Err(err).Int("retries", r.Failures).Time("next_attempt", r.Next).Str("cause", r.Cause).
			Msg("pass failed; retried with backoff")
	}
}
