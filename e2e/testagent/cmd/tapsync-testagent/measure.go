package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tapsync/tapsync/e2e/testagent"
	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// The measuring methods of the control service: Clock (the guest's
// CLOCK_REALTIME, for the host to find the skew) and Timeline (what the
// agent saw, timed by the guest: the kernel's messages about a
// hot-plugged PCI device and its driver, link events, the agent's own
// calls). e2e/testvm is the host side; e2e/bench's B5 reads them.

// timeline is the one the agent server and the kernel watch record on.
var timeline = testagent.NewTimeline()

var measureMethods = map[string]func([]byte) (any, error){
	control.MethodClock:    handle(clock),
	control.MethodTimeline: handle(timelineSince),
}

func clock(control.ClockRequest) (control.ClockReply, error) {
	return control.ClockReply{Realtime: time.Now()}, nil
}

func timelineSince(req control.TimelineRequest) (control.TimelineReply, error) {
	// A fresh calibration each time the host collects: the mapping of
	// the kernel's stamps stays current for the next messages.
	kernelClock.mark()
	return timeline.Since(req.After), nil
}

// kmsgPath is the kernel's log as records (Documentation/ABI/testing/dev-kmsg).
const kmsgPath = "/dev/kmsg"

// clockMarker starts the message the agent writes into the kernel's log
// to calibrate the kernel's timestamps against CLOCK_REALTIME.
const clockMarker = "tapsync-testagent: clock mark "

// kernelClock maps the kernel log's timestamps to CLOCK_REALTIME.
//
// A record's timestamp is the printk clock (local_clock(): µs since
// boot, from sched_clock), which need not be CLOCK_MONOTONIC. So the
// agent writes a marker record of its own, reading CLOCK_REALTIME just
// before and after the write, and the marker's printk stamp gives the
// offset, to half the write's duration. Until the first marker is read,
// CLOCK_MONOTONIC stands in (read together with CLOCK_REALTIME); each
// calibration's event says how far the two disagree.
var kernelClock kmsgClock

type kmsgClock struct {
	mu      sync.Mutex
	offset  time.Duration // realtime − printk time
	marks   map[uint64][2]time.Time
	nextSeq atomic.Uint64
}

// mark writes a marker record; the reader finishes the calibration when
// it reads it back. A new open each time: the kernel rate-limits writes
// per open file.
func (c *kmsgClock) mark() {
	f, err := os.OpenFile(kmsgPath, os.O_WRONLY, 0)
	if err != nil {
		return
	}
	defer f.Close()
	n := c.nextSeq.Add(1)
	msg := []byte(fmt.Sprintf("<7>%s%d\n", clockMarker, n)) // debug level: kept off the console
	before := time.Now()
	_, err = f.Write(msg)
	after := time.Now()
	if err != nil {
		return
	}
	c.mu.Lock()
	if c.marks == nil {
		c.marks = map[uint64][2]time.Time{}
	}
	c.marks[n] = [2]time.Time{before, after}
	c.mu.Unlock()
}

// calibrate takes marker n, read back with printk stamp ts.
func (c *kmsgClock) calibrate(n uint64, ts time.Duration) {
	c.mu.Lock()
	w, ok := c.marks[n]
	delete(c.marks, n)
	if ok {
		mid := w[0].Add(w[1].Sub(w[0]) / 2)
		c.offset = time.Duration(mid.UnixNano()) - ts
	}
	off := c.offset
	c.mu.Unlock()
	if ok {
		timeline.Record(control.EventKernelClock, "", fmt.Sprintf("offset %d uncertainty %d monotonic offset %d",
			off, w[1].Sub(w[0])/2, monotonicOffset()))
	}
}

// realtime maps printk stamp ts to CLOCK_REALTIME.
func (c *kmsgClock) realtime(ts time.Duration) time.Time {
	c.mu.Lock()
	off := c.offset
	c.mu.Unlock()
	if off == 0 {
		off = monotonicOffset()
	}
	return time.Unix(0, int64(ts+off))
}

// monotonicOffset is CLOCK_REALTIME − CLOCK_MONOTONIC, read together.
func monotonicOffset() time.Duration {
	var mono, real unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono)
	_ = unix.ClockGettime(unix.CLOCK_REALTIME, &real)
	return time.Duration(real.Nano() - mono.Nano())
}

// watchKernel records on the timeline every kernel message from now on,
// with its own timestamp: after boot the guest kernel speaks of little
// but hot-plugs (the PCI core finding and placing a device, its driver
// binding). It runs for the agent's life; a kernel log it cannot read
// leaves the timeline without kernel events.
func watchKernel() {
	f, err := os.Open(kmsgPath)
	if err != nil {
		logf("kernel log: %v", err)
		return
	}
	defer f.Close()
	// From the end: the boot's messages are not ours to report.
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		logf("kernel log: seek to end: %v", err)
		return
	}
	kernelClock.mark()
	buf := make([]byte, 16<<10)
	for {
		// One record per read (the device's contract).
		n, err := f.Read(buf)
		if errors.Is(err, syscall.EPIPE) {
			continue // records were overwritten before we read them
		}
		if err != nil {
			logf("kernel log: %v", err)
			return
		}
		kernelRecord(string(buf[:n]))
	}
}

// kernelRecord takes one record, "prio,seq,ts_µs,flags;message\n
// KEY=value…".
func kernelRecord(rec string) {
	head, rest, ok := strings.Cut(rec, ";")
	if !ok {
		return
	}
	msg, _, _ := strings.Cut(rest, "\n")
	f := strings.Split(head, ",")
	if len(f) < 3 {
		return
	}
	us, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		return
	}
	ts := time.Duration(us) * time.Microsecond
	if n, ok := strings.CutPrefix(msg, clockMarker); ok {
		if seq, err := strconv.ParseUint(n, 10, 64); err == nil {
			kernelClock.calibrate(seq, ts)
		}
		return
	}
	timeline.RecordAt(kernelClock.realtime(ts), control.EventKernel, "", msg)
}
