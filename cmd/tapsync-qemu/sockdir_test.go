package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestCheckSocket runs checkSocket against the file system; each case
// applies twice (a check changes nothing a second check would see).
func TestCheckSocket(t *testing.T) {
	skipUnlessRoot(t)
	mkdir := func(mode os.FileMode, uid int) func(*testing.T, string, string) {
		return func(t *testing.T, dir, _ string) {
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dir, mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(dir, uid, uid); err != nil {
				t.Fatal(err)
			}
		}
	}
	atSock := func(make func(t *testing.T, sock string)) func(*testing.T, string, string) {
		return func(t *testing.T, dir, sock string) {
			mkdir(0o700, 0)(t, dir, sock)
			make(t, sock)
		}
	}
	for _, tc := range []struct {
		name     string
		noParent bool // dir's parent is missing too
		setup    func(t *testing.T, dir, sock string)
		err      string // "" for success; else a substring of the error
	}{
		{name: "dir missing", setup: func(*testing.T, string, string) {}},
		{name: "dir and parent missing", noParent: true, setup: func(*testing.T, string, string) {}},
		{name: "dir 0700", setup: mkdir(0o700, 0)},
		{name: "dir 0500", setup: mkdir(0o500, 0)},
		{name: "dir 0777", setup: mkdir(0o777, 0), err: "mode 0777, want no group or other bits"},
		{name: "dir 0710", setup: mkdir(0o710, 0), err: "mode 0710, want no group or other bits"},
		{name: "dir of another uid", setup: mkdir(0o700, 65534), err: "owned by uid 65534, not root"},
		{name: "dir is a symlink", setup: func(t *testing.T, dir, sock string) {
			mkdir(0o700, 0)(t, dir+".real", sock)
			if err := os.Symlink(dir+".real", dir); err != nil {
				t.Fatal(err)
			}
		}, err: "is a symlink"},
		{name: "dir is a file", setup: func(t *testing.T, dir, _ string) {
			if err := os.WriteFile(dir, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}, err: "not a directory"},
		{name: "parent writable by others", setup: func(t *testing.T, dir, _ string) {
			if err := os.Chmod(filepath.Dir(dir), 0o777); err != nil {
				t.Fatal(err)
			}
		}, err: "socket dir ancestor "},
		{name: "parent sticky", setup: func(t *testing.T, dir, _ string) {
			if err := os.Chmod(filepath.Dir(dir), 0o777|os.ModeSticky); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "stale socket", setup: atSock(func(t *testing.T, sock string) {
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close()
		})},
		{name: "live socket", setup: atSock(func(t *testing.T, sock string) {
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}), err: "a live socket (another process serves it)"},
		{name: "regular file", setup: atSock(func(t *testing.T, sock string) {
			if err := os.WriteFile(sock, []byte("keep"), 0o600); err != nil {
				t.Fatal(err)
			}
		}), err: "exists and is not a socket (regular file); QEMU would remove it"},
		{name: "directory", setup: atSock(func(t *testing.T, sock string) {
			if err := os.Mkdir(sock, 0o700); err != nil {
				t.Fatal(err)
			}
		}), err: "exists and is not a socket (directory)"},
		{name: "symlink", setup: atSock(func(t *testing.T, sock string) {
			if err := os.Symlink("/etc/passwd", sock); err != nil {
				t.Fatal(err)
			}
		}), err: "exists and is not a socket (symlink)"},
		{name: "fifo", setup: atSock(func(t *testing.T, sock string) {
			if err := syscall.Mkfifo(sock, 0o600); err != nil {
				t.Fatal(err)
			}
		}), err: "exists and is not a socket (fifo)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := filepath.Join(t.TempDir(), "p")
			if err := os.Mkdir(parent, 0o700); err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(parent, "qmp")
			if tc.noParent {
				os.Remove(parent)
			}
			sock := filepath.Join(dir, "abc.sock")
			tc.setup(t, dir, sock)
			before, _ := os.Lstat(sock)
			for range 2 {
				err := checkSocket(dir, sock)
				if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
					t.Fatalf("checkSocket: %v; want %q", err, tc.err)
				}
			}
			if tc.err == "" && before == nil {
				fi, err := os.Lstat(dir)
				if err != nil || !fi.IsDir() || fi.Mode().Perm()&0o077 != 0 {
					t.Fatalf("dir %v, %v", fi, err)
				}
				if _, err := os.Lstat(sock); !os.IsNotExist(err) {
					t.Fatalf("the probe left %s: %v", sock, err)
				}
			}
			if after, _ := os.Lstat(sock); before != nil && (after == nil || !os.SameFile(before, after)) {
				t.Fatalf("%s was replaced or removed", sock)
			}
		})
	}
}

// TestCheckSocketFull: a file system without a free inode fails the bind
// probe, so QEMU does not fail to bind our socket.
func TestCheckSocketFull(t *testing.T) {
	skipUnlessRoot(t)
	dir := filepath.Join(t.TempDir(), "qmp")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Equivalent to: mount -t tmpfs -o size=64k,nr_inodes=8,mode=0700 tapsync-qemu-test DIR
	if err := syscall.Mount("tapsync-qemu-test", dir, "tmpfs", 0, "size=64k,nr_inodes=8,mode=0700"); err != nil {
		t.Skipf("skipping: cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	for i := 0; ; i++ {
		f, err := os.Create(filepath.Join(dir, "fill"+string(rune('a'+i))))
		if err != nil {
			if i > 20 {
				t.Fatalf("cannot fill the tmpfs: %v", err)
			}
			break
		}
		f.Close()
	}
	err := checkSocket(dir, filepath.Join(dir, "abc.sock"))
	if err == nil || !strings.Contains(err.Error(), "probe bind: no space left on device") {
		t.Fatalf("checkSocket on a full tmpfs: %v", err)
	}
}
