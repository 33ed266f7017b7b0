package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// perfDir, when set (-perf DIR), makes each scale phase run under
// `perf record -a -g` (every CPU, call graphs), one file per phase:
// DIR/<phase>.data. It is how "where the time goes" is found rather than
// guessed; `perf report -i DIR/start.data --sort comm` shows who was busy,
// `--comm tapsync` the daemon's own profile (Go keeps frame pointers).
var perfDir string

// perfFreq is perf's sampling rate (-perf-freq); a restart of ~0.5 s
// needs a few kHz for a profile worth reading.
var perfFreq = 499

// profilePhase starts perf for one phase and returns what stops it. When
// -perf is not given, or perf is missing, it does nothing.
func profilePhase(phase string) (stop func()) {
	if perfDir == "" {
		return func() {}
	}
	out := filepath.Join(perfDir, phase+".data")
	cmd := exec.Command("perf", "record", "-a", "-g", "-F", fmt.Sprint(perfFreq), "-o", out)
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "bench: perf for %s: %v (phase not profiled)\n", phase, err)
		return func() {}
	}
	time.Sleep(300 * time.Millisecond) // perf opens its buffers before the phase starts
	return func() {
		_ = cmd.Process.Signal(syscall.SIGINT) // perf writes its file on SIGINT
		_ = cmd.Wait()
		fmt.Fprintf(os.Stderr, "bench: %s profiled in %s\n", phase, out)
	}
}
