package main

import (
	"os"
	"runtime/debug"
	"strconv"
	"testing"
	"time"
)

// gcPercent reads the collector's GOGC.
func gcPercent() int {
	p := debug.SetGCPercent(-1)
	debug.SetGCPercent(p)
	return p
}

// The collector runs at startupGCPercent while the daemon starts, unless
// the operator set GOGC, and is put back afterwards.
func TestStartupGC(t *testing.T) {
	t.Setenv("GOGC", "")
	os.Unsetenv("GOGC") // t.Setenv puts it back as it was
	before := gcPercent()
	restore := startupGC()
	if p := gcPercent(); p != startupGCPercent {
		t.Errorf("GOGC while starting = %d, want %d", p, startupGCPercent)
	}
	restore()
	if p := gcPercent(); p != before {
		t.Errorf("GOGC after the start = %d, want %d as before", p, before)
	}

	t.Setenv("GOGC", "50")
	debug.SetGCPercent(50) // what the runtime read from it at start
	t.Cleanup(func() { debug.SetGCPercent(before) })
	restore = startupGC()
	if p := gcPercent(); p != 50 {
		t.Errorf("GOGC while starting with GOGC=50 set = %d, want the operator's 50", p)
	}
	restore()
	if p := gcPercent(); p != 50 {
		t.Errorf("GOGC after the start with GOGC=50 set = %d, want 50", p)
	}
}

// The daemon puts the collector back once its first full resync is done.
func TestDaemonRestoresGCWhenReady(t *testing.T) {
	t.Setenv("GOGC", "")
	os.Unsetenv("GOGC")
	before := gcPercent()
	s := serveDaemon(t, quietConfig(t), nil)
	select {
	case <-s.d.ready:
	case <-time.After(20 * time.Second):
		t.Fatalf("daemon never ready; log:\n%s", s.log)
	}
	eventually(t, "GOGC back to its value before the start", func() bool { return gcPercent() == before },
		func() string { return "GOGC " + strconv.Itoa(gcPercent()) })
}
