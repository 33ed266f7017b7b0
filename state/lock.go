package state

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

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
// pid is written into the lock file so that a refused daemon can name it.
func (s *Store) Lock() (*DirLock, error) {
	p := filepath.Join(s.dir, LockName)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
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
	pid := strconv.Itoa(os.Getpid()) + "\n"
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(pid), 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("write pid into %s: %w", p, err)
	}
	return &DirLock{f: f}, nil
}

// holder names the process in a lock file, as well as it can be known:
// the holder writes its pid just after taking the lock.
func holder(f *os.File) string {
	b := make([]byte, 32)
	n, _ := f.ReadAt(b, 0)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	if err != nil || pid <= 0 {
		return "a process that has not written its pid yet"
	}
	return "pid " + strconv.Itoa(pid)
}

// Close releases the lock. The file stays (see LockName).
func (l *DirLock) Close() error { return l.f.Close() }
