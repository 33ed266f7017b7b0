package main

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
)

// checkSocket makes sure QEMU can serve a monitor at sock, in dir, without
// harm: dir is created if missing (0700) and must then be root's own
// directory (not a symlink, no group or other bits), under ancestors that
// only root can change; sock must be absent or a stale socket. QEMU 7.2
// unlinks whatever non-directory is at a server socket's path before it
// binds (a file, a symlink, a live server's socket) and fails to start on
// a directory, so anything else there means no monitor of ours.
func checkSocket(dir, sock string) error {
	if err := checkAncestors(filepath.Dir(dir)); err != nil {
		return err
	}
	// Equivalent to: mkdir -p -m 0700 DIR
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return errors.New("socket dir " + dir + ": " + errText(err))
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return errors.New("socket dir " + dir + ": " + errText(err))
	}
	if err := rootOnly(fi, 0o077); err != nil {
		return errors.New("socket dir " + dir + ": " + err.Error())
	}
	fi, err = os.Lstat(sock)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return probeBind(sock)
	case err != nil:
		return errors.New("socket path " + sock + ": " + errText(err))
	case fi.Mode().Type() != os.ModeSocket:
		return errors.New("socket path " + sock + ": exists and is not a socket (" + kind(fi.Mode()) + "); QEMU would remove it")
	}
	return probeStale(sock)
}

// checkAncestors fails unless every existing directory from p up to / is
// owned by root and not writable by group or others (unless sticky, like
// /tmp): otherwise someone else could swap dir for a symlink after the
// check. Missing ones are fine: MkdirAll makes them 0700.
func checkAncestors(p string) error {
	for {
		fi, err := os.Stat(p)
		if err == nil {
			if !fi.IsDir() {
				return errors.New("socket dir ancestor " + p + ": not a directory")
			}
			mask := os.FileMode(0o022)
			if fi.Mode()&os.ModeSticky != 0 {
				mask = 0
			}
			if err := rootOnly(fi, mask); err != nil {
				return errors.New("socket dir ancestor " + p + ": " + err.Error())
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			return errors.New("socket dir ancestor " + p + ": " + errText(err))
		}
		if p == "/" || p == "." {
			return nil
		}
		p = filepath.Dir(p)
	}
}

// rootOnly fails unless fi (from lstat) is a directory owned by root with
// none of the bad permission bits.
func rootOnly(fi os.FileInfo, bad os.FileMode) error {
	st, _ := fi.Sys().(*syscall.Stat_t)
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return errors.New("is a symlink")
	case !fi.IsDir():
		return errors.New("not a directory (" + kind(fi.Mode()) + ")")
	case st == nil || st.Uid != 0:
		return errors.New("owned by uid " + uidText(st) + ", not root")
	case fi.Mode().Perm()&bad != 0:
		return errors.New("mode " + modeText(fi.Mode()) + ", want no group or other bits")
	}
	return nil
}

// probeBind binds and removes a socket at sock: what QEMU will do next
// must work now (a full file system, a read-only mount fail here instead).
func probeBind(sock string) error {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return errors.New("socket path " + sock + ": probe: " + err.Error())
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: sock}); err != nil {
		return errors.New("socket path " + sock + ": probe bind: " + err.Error())
	}
	if err := syscall.Unlink(sock); err != nil {
		return errors.New("socket path " + sock + ": probe unlink: " + err.Error())
	}
	return nil
}

// probeStale fails unless the socket at sock is stale (nobody listens):
// QEMU would unlink a live one and take its path from its server.
func probeStale(sock string) error {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
	if err != nil {
		return errors.New("socket path " + sock + ": probe: " + err.Error())
	}
	defer syscall.Close(fd)
	// Nonblocking: a listener with a full backlog answers EAGAIN at once.
	err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: sock})
	if err == syscall.ECONNREFUSED {
		return nil // stale: QEMU unlinks it and binds anew
	}
	if err == nil || err == syscall.EAGAIN || err == syscall.EINPROGRESS {
		return errors.New("socket path " + sock + ": a live socket (another process serves it)")
	}
	return errors.New("socket path " + sock + ": probe connect: " + err.Error())
}

func kind(m os.FileMode) string {
	switch m.Type() {
	case 0:
		return "regular file"
	case os.ModeDir:
		return "directory"
	case os.ModeSymlink:
		return "symlink"
	case os.ModeSocket:
		return "socket"
	case os.ModeNamedPipe:
		return "fifo"
	case os.ModeDevice, os.ModeDevice | os.ModeCharDevice:
		return "device"
	}
	return "irregular file"
}
