package testproc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The removers below are for a test's cleanup: each does what it can,
// reports through logf what it found and what failed, and never fails the
// test itself. What is already gone counts as removed.

// KillNaming kills (SIGKILL) every process but this one that has arg
// among its arguments: the shims of a containerd name its socket so, and
// outlive it.
func KillNaming(arg string, logf func(format string, args ...any)) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte("\x00"+arg+"\x00")) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(p, "/proc/%d/cmdline", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		logf("killing leftover %q (pid %d)", strings.ReplaceAll(string(b), "\x00", " "), pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// RuncDeleteAll force-deletes every container of runc state dir root.
func RuncDeleteAll(root string, logf func(format string, args ...any)) {
	out, err := exec.Command("runc", "--root", root, "list", "-q").Output()
	if err != nil {
		return
	}
	for _, id := range strings.Fields(string(out)) {
		RuncDelete(root, id, logf)
	}
}

// RuncDelete force-deletes container id of runc state dir root, killing
// its processes.
//
// Equivalent to: runc --root <root> delete --force <id>
func RuncDelete(root, id string, logf func(format string, args ...any)) {
	logf("leftover container %s in %s", id, root)
	if out, err := exec.Command("runc", "--root", root, "delete", "--force", id).CombinedOutput(); err != nil {
		logf("runc delete --force %s: %v: %s", id, err, out)
	}
}

// UnmountBelow lazily unmounts everything mounted below dir, deepest
// first.
func UnmountBelow(dir string, logf func(format string, args ...any)) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			points = append(points, fields[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, p := range points {
		Unmount(p, logf)
	}
}

// Unmount lazily unmounts path; a path not mounted, or gone, is done.
//
// Equivalent to: umount -l <path>
func Unmount(path string, logf func(format string, args ...any)) {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		logf("unmount %s: %v", path, err)
	}
}

// RemoveCgroup removes cgroup name (its path below a hierarchy's root,
// e.g. "/testctr-123") and the cgroups below it from every hierarchy,
// deepest first: rmdir only succeeds on empty cgroups, so the processes
// in them must be gone.
func RemoveCgroup(name string, logf func(format string, args ...any)) {
	roots, _ := filepath.Glob("/sys/fs/cgroup" + name)
	more, _ := filepath.Glob("/sys/fs/cgroup/*" + name)
	for _, root := range append(roots, more...) {
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil {
				logf("remove cgroup %s: %v", dirs[i], err)
			}
		}
	}
}
