// Command tapsync-qemu is a QEMU wrapper for Kata Containers' [hypervisor.qemu]
// path: it execs the real QEMU with the same arguments plus one QMP monitor
// of tapsync's own, -qmp unix:<dir>/<id>.sock,server=on,wait=off, for a VM
// named -name sandbox-<id>. It never stops a VM from starting over its own
// monitor: when that monitor cannot be had safely, QEMU runs with its
// arguments unchanged and one line on stderr says why.
package main

import (
	"errors"
	"os"
	"runtime"
	"syscall"
)

// The main goroutine stays on the main thread, so the exec comes from the
// thread group leader: exec from another thread shows the PID as a zombie
// for a moment, to anyone watching QEMU's PID.
func init() { runtime.LockOSThread() }

func main() {
	exe, err := os.Executable()
	var s settings
	if err != nil {
		s = defaultSettings()
		s.confErr = errors.New("cannot find the wrapper's own path for its config: " + err.Error())
		exe = os.Args[0]
	} else {
		s = loadSettings(confPath(exe))
	}
	if same(exe, s.qemu) {
		die("refusing to exec " + s.qemu + ": it is this wrapper (same inode); set qemu in " + confPath(exe))
	}
	args, line := planArgs(os.Args[1:], s, checkSocket)
	if line != "" {
		os.Stderr.WriteString(line + "\n")
	}
	argv := append([]string{s.qemu}, args...)
	// The PID stays the one the runtime started: it is QEMU's from here.
	err = syscall.Exec(s.qemu, argv, os.Environ())
	die("cannot exec " + s.qemu + ": " + err.Error())
}

// same reports whether a and b are one file (device and inode).
func same(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// die writes one line and exits 127, as a shell does for a command it
// cannot run.
func die(why string) {
	os.Stderr.WriteString("tapsync-qemu: " + why + "\n")
	os.Exit(127)
}
