package state_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tapsync/tapsync/state"
	"golang.org/x/sys/unix"
)

// readPID reads the lock file as a refused daemon does: the pid on its
// first line, or what it found instead.
func readPID(path string) (int, string, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err.Error(), false
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(line)
	return pid, strconv.Quote(string(b)), err == nil && pid > 0
}

// A reader racing daemons that take and release the lock never finds the
// lock file without a whole pid: not while the file is first made, not
// while a new holder writes over an old one's.
func TestLockFileNeverWithoutPID(t *testing.T) {
	t.Run("made", func(t *testing.T) {
		for i := range 300 {
			dir := filepath.Join(t.TempDir(), strconv.Itoa(i))
			s, err := state.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, state.LockName)
			done := make(chan *state.DirLock, 1)
			go func() {
				l, err := s.Lock()
				if err != nil {
					t.Error(err)
				}
				done <- l
			}()
			deadline := time.Now().Add(10 * time.Second)
			for {
				if _, err := os.Stat(p); err == nil {
					break
				} else if time.Now().After(deadline) {
					t.Fatalf("no lock file after 10 s: %v", err)
				}
			}
			if _, seen, ok := readPID(p); !ok {
				t.Fatalf("lock file just made holds %s, not a pid", seen)
			}
			if l := <-done; l != nil {
				l.Close()
			}
		}
	})
	t.Run("rewritten", func(t *testing.T) {
		s, err := state.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(s.Dir(), state.LockName)
		l, err := s.Lock()
		if err != nil {
			t.Fatal(err)
		}
		l.Close()
		var stop atomic.Bool
		var wg sync.WaitGroup
		wg.Go(func() {
			for !stop.Load() {
				l, err := s.Lock()
				if err != nil {
					t.Error(err)
					return
				}
				l.Close()
			}
		})
		defer wg.Wait()
		defer stop.Store(true)
		for range 20000 {
			if _, seen, ok := readPID(p); !ok {
				t.Fatalf("lock file being rewritten holds %s, not a pid", seen)
			}
		}
	})
}

// A daemon refused while the lock file still names the holder's dead
// predecessor does not name that pid.
func TestLockRefusalNeverNamesTheDead(t *testing.T) {
	s, err := state.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	pid := dead.Process.Pid
	p := filepath.Join(s.Dir(), state.LockName)
	if err := os.WriteFile(p, []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The new holder has taken the lock and not yet written its pid.
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	_, err = s.Lock()
	if !errors.Is(err, state.ErrLocked) {
		t.Fatalf("Lock = %v, want ErrLocked", err)
	}
	if strings.Contains(err.Error(), "pid "+strconv.Itoa(pid)) {
		t.Errorf("refusal names pid %d, which has exited: %v", pid, err)
	}
}
