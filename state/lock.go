package state

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// LockName is the lock file in the state directory. It is never deleted:
// a deleted lock file lets two daemons each lock a different inode.
const LockName = "tapsync.lock"

// ErrLocked is returned by Lock when another process holds the lock.
var ErrLocked = errors.New("state dir is locked by another tapsync")

// DirLock is an exclusive hold on a state directory. The kernel drops it
// when the holder exits, however it exits, so a killed daemon leaves no
// stale lock behind.
type DirLock struct{ f *os.File }

// Lock takes the state directory for this process, before it touches the
// control socket or any record: two daemons on one directory would each
// unlink the other's socket and rewrite the other's records. The holder's
// pid is written into the lock file so that a refused daemon can name it;
// the file always holds one whole pid, never an empty or partial one.
func (s *Store) Lock() (*DirLock, error) {
	p := filepath.Join(s.dir, LockName)
	pid := []byte(strconv.Itoa(os.Getpid()) + "\n")
	f, err := openLockFile(p, pid)
	if err != nil {
		return nil, fmt.Errorf("lock state dir %s: %w", s.dir, err)
	}
	// Equivalent to: flock --exclusive --nonblock tapsync.lock
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s held by %s", ErrLocked, p, holder(f))
		}
		return nil, fmt.Errorf("lock state dir %s: %w", s.dir, err)
	}
	// Over the old pid, then cut to length: a reader finds the old pid,
	// the new one, or the new one's line before the old one's tail, and
	// reads the first line. Truncating first would show an empty file.
	if _, err = f.WriteAt(pid, 0); err == nil {
		err = f.Truncate(int64(len(pid)))
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("write pid into %s: %w", p, err)
	}
	return &DirLock{f: f}, nil
}

// openLockFile opens the lock file at p, making it with content when it
// does not exist: written under a temporary name and linked into place,
// so that it never exists empty. The flock is taken on what it opens.
func openLockFile(p string, content []byte) (*os.File, error) {
	for {
		f, err := os.OpenFile(p, os.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if !errors.Is(err, os.ErrNotExist) {
			return f, err
		}
		tmp, err := os.CreateTemp(filepath.Dir(p), "."+LockName+"-*")
		if err != nil {
			return nil, err
		}
		_, err = tmp.Write(content)
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			// Equivalent to: ln .tapsync.lock-XXX tapsync.lock (another
			// daemon's link in between is as good as ours)
			if err = os.Link(tmp.Name(), p); errors.Is(err, os.ErrExist) {
				err = nil
			}
		}
		os.Remove(tmp.Name())
		if err != nil {
			return nil, err
		}
	}
}

// holderWait bounds how long a refused daemon waits for the holder's pid:
// a holder writes it just after taking the lock, over its predecessor's.
const holderWait = 200 * time.Millisecond

// holder names the process in a lock file, as well as it can be known: a
// pid that names no running process is a predecessor's, which the holder
// has not written over yet.
func holder(f *os.File) string {
	deadline := time.Now().Add(holderWait)
	for {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		line, _, _ := strings.Cut(string(b[:n]), "\n")
		// Equivalent to: kill -0 PID (EPERM: it runs, as another user)
		if pid, err := strconv.Atoi(line); err == nil && pid > 0 && !errors.Is(unix.Kill(pid, 0), unix.ESRCH) {
			return "pid " + strconv.Itoa(pid)
		}
		if time.Now().After(deadline) {
			return "a process that has not written its pid yet"
		}
		time.Sleep(5 * time.Millisecond) // polling for the pid, bounded by holderWait
	}
}

// Close releases the lock. The file stays (see LockName).
func (l *DirLock) Close() error { return l.f.Close() }
