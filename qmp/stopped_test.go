package qmp

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A stopped QEMU accepts connections (the kernel does) and never greets:
// the error says so, with its pid, rather than guessing at another client.
func TestQEMUStoppedNoGreeting(t *testing.T) {
	t.Parallel()
	vm := startVM(t, "q35", 0)
	// Both monitors take a connection before QEMU is stopped.
	monitors := []struct {
		name string
		dial func(context.Context, string, Options) (*Client, error)
		path string
	}{{"Dial", Dial, vm.qmp}, {"DialHMP", DialHMP, vm.hmp}}
	for _, m := range monitors {
		c, err := m.dial(context.Background(), m.path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	pid := vm.cmd.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	eventually(t, 10*time.Second, func() error {
		_, state, err := procState("/proc", pid)
		if err == nil && state != 'T' {
			err = fmt.Errorf("QEMU in state %c", state)
		}
		return err
	})
	want := fmt.Sprintf("pid %d (qemu-system-x86) is stopped", pid)
	for _, m := range monitors {
		_, err := m.dial(context.Background(), m.path, Options{Timeout: 300 * time.Millisecond})
		if !errors.Is(err, ErrNoGreeting) || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "another client") {
			t.Errorf("%s of a stopped QEMU = %v, want ErrNoGreeting saying %q", m.name, err, want)
		}
	}
}

func TestProcState(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		stat, comm string
		state      byte
	}{
		{"42 (qemu-system-x86) T 1 42 42 0 -1", "qemu-system-x86", 'T'},
		{"42 (a) b (c)) D 1 2", "a) b (c)", 'D'},
	} {
		writeStat(t, dir, tc.stat)
		comm, state, err := procState(dir, 42)
		if err != nil || comm != tc.comm || state != tc.state {
			t.Errorf("procState(%q) = %q, %c, %v; want %q, %c", tc.stat, comm, state, err, tc.comm, tc.state)
		}
	}
	writeStat(t, dir, "42 nonsense")
	if _, _, err := procState(dir, 42); err == nil {
		t.Error("procState of a malformed stat: no error")
	}
}

// writeStat writes stat as <dir>/42/stat.
func writeStat(t *testing.T, dir, stat string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "42"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "42", "stat"), []byte(stat), 0o644); err != nil {
		t.Fatal(err)
	}
}
