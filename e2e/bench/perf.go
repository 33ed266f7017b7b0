package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
// -perf is not given, or perf is missing, it does nothing. perf starts
// with its events off (-D -1) and is told to turn them on over its control
// pipe; the phase starts once perf acknowledges. With every QEMU's maps to
// read first, perf -a takes a second or more to get there, so a fixed
// wait lost the first part of a short phase (a restart).
func profilePhase(phase string) (stop func()) {
	if perfDir == "" {
		return func() {}
	}
	out := filepath.Join(perfDir, phase+".data")
	ctlR, ctlW, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: perf for %s: %v (phase not profiled)\n", phase, err)
		return func() {}
	}
	ackR, ackW, err := os.Pipe()
	if err != nil {
		ctlR.Close()
		ctlW.Close()
		fmt.Fprintf(os.Stderr, "bench: perf for %s: %v (phase not profiled)\n", phase, err)
		return func() {}
	}
	// fds 3 and 4 in perf: ExtraFiles[0] and [1].
	cmd := exec.Command("perf", "record", "-a", "-g", "-F", fmt.Sprint(perfFreq), "-D", "-1", "--control", "fd:3,4", "-o", out)
	cmd.Stdout, cmd.Stderr = nil, nil
	cmd.ExtraFiles = []*os.File{ctlR, ackW}
	err = cmd.Start()
	ctlR.Close()
	ackW.Close()
	if err != nil {
		ctlW.Close()
		ackR.Close()
		fmt.Fprintf(os.Stderr, "bench: perf for %s: %v (phase not profiled)\n", phase, err)
		return func() {}
	}
	acked := make(chan error, 1)
	go func() {
		if _, err := ctlW.WriteString("enable\n"); err != nil {
			acked <- err
			return
		}
		buf := make([]byte, 16)
		n, err := ackR.Read(buf)
		if err == nil && !strings.HasPrefix(string(buf[:n]), "ack\n") { // perf 6.1 sends "ack\n\x00"
			err = fmt.Errorf("perf answered %q", buf[:n])
		}
		acked <- err
	}()
	select {
	case err := <-acked:
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: perf for %s: enabling its events: %v\n", phase, err)
		}
	case <-time.After(30 * time.Second):
		fmt.Fprintf(os.Stderr, "bench: perf for %s: no ack within 30 s; the phase's start may be missing\n", phase)
	}
	return func() {
		_ = cmd.Process.Signal(syscall.SIGINT) // perf writes its file on SIGINT
		_ = cmd.Wait()
		ctlW.Close()
		ackR.Close()
		fmt.Fprintf(os.Stderr, "bench: %s profiled in %s\n", phase, out)
	}
}
