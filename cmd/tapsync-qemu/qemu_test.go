package main

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testproc"
	"golang.org/x/sys/unix"
)

// These tests build the wrapper and run it in front of the real
// qemu-system-x86_64 with a QEMU command line shaped like Kata's (no guest:
// -S, no disks). They need root (the wrapper trusts only root's config and
// socket dir) and QEMU; otherwise they skip.

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

var built struct {
	once      sync.Once
	dir, path string
	err       error
}

// realQEMU returns the installed QEMU's resolved path, or skips.
func realQEMU(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("skipping: qemu-system-x86_64 not installed (make deps)")
	}
	p, err = filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// shortTemp is a temp dir with a short path (socket paths are limited to
// 107 bytes), removed when the test ends.
func shortTemp(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// installWrapper builds the wrapper (once per test binary) and links it to
// dir/tapsync-qemu, with conf (when not "") as its root-owned config.
func installWrapper(t testing.TB, dir, conf string) string {
	t.Helper()
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "tqbuild"); built.err != nil {
			return
		}
		built.path = filepath.Join(built.dir, "tapsync-qemu")
		out, err := exec.Command("go", "build", "-o", built.path, ".").CombinedOutput()
		if err != nil {
			built.err = errors.New("go build: " + err.Error() + "\n" + string(out))
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	exe := filepath.Join(dir, "tapsync-qemu")
	if err := os.Link(built.path, exe); err != nil {
		t.Fatal(err)
	}
	if conf != "" {
		if err := os.WriteFile(exe+".conf", []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return exe
}

// kataArgs is a QEMU command line like Kata's: the VM's name, flags, and
// two runtime monitors, one by path and one passed as fd 3.
func kataArgs(name, mainSock string) []string {
	return []string{
		"-name", name, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-no-user-config",
		"--no-reboot", "-display", "none", "-S",
		"-qmp", "unix:" + mainSock + ",server=on,wait=off",
		"-qmp", "unix:fd=3,server=on,wait=off",
	}
}

// vm is a QEMU started (through the wrapper or not) by a test.
type vm struct {
	cmd    *exec.Cmd
	stderr string // file holding its stderr
	fdSock string // where the socket passed as fd 3 is bound
}

// start runs exe with args and, as fd 3, a listening socket bound at
// dir/fd.sock (as runtime-rs passes its QMP socket). QEMU is killed when
// the test ends.
func start(t testing.TB, dir, exe string, args []string) *vm {
	t.Helper()
	v := &vm{stderr: filepath.Join(dir, "stderr"), fdSock: filepath.Join(dir, "fd.sock")}
	os.Remove(v.fdSock)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: v.fdSock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // QEMU holds its own copy
	errFile, err := os.Create(v.stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer errFile.Close()
	v.cmd = exec.Command(exe, args...)
	v.cmd.Dir = dir
	v.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C"} // no implicit PWD: the same for every start
	v.cmd.Stdout, v.cmd.Stderr = errFile, errFile
	v.cmd.ExtraFiles = []*os.File{f}
	if err := testproc.Start(v.cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.stop)
	return v
}

// stop kills the process the test started (and by then QEMU's), once.
func (v *vm) stop() {
	if v.cmd.ProcessState == nil {
		_ = v.cmd.Process.Kill()
		_ = v.cmd.Wait()
	}
}

// greet waits for a QMP greeting on the unix socket at path.
func greet(t testing.TB, v *vm, path string) {
	t.Helper()
	var last error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if last = greetOnce(path); last == nil {
			return
		}
		if v.cmd.ProcessState != nil || exited(v.cmd.Process.Pid) {
			break
		}
	}
	b, _ := os.ReadFile(v.stderr)
	t.Fatalf("no QMP greeting on %s: %v; stderr:\n%s", path, last, b)
}

func greetOnce(path string) error {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, `{"QMP":`) {
		return errors.New("not a QMP greeting: " + line)
	}
	return nil
}

// exited reports whether the child pid has exited, without reaping it.
// (/proc/<pid>/stat is no witness: while a thread other than the leader
// execs, the leader shows as a zombie.)
func exited(pid int) bool {
	var info unix.Siginfo
	err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	return err != nil || info.Signo != 0
}

// checkIsQEMU fails unless the process the test started is QEMU now, run
// with argv exactly.
func checkIsQEMU(t testing.TB, v *vm, qemu string, argv []string) {
	t.Helper()
	pid := strconv.Itoa(v.cmd.Process.Pid)
	if exe, err := os.Readlink("/proc/" + pid + "/exe"); err != nil || exe != qemu {
		t.Errorf("pid %s runs %q (%v), want %s", pid, exe, err, qemu)
	}
	b, err := os.ReadFile("/proc/" + pid + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00"); !slices.Equal(got, argv) {
		t.Errorf("pid %s argv:\n got %q\nwant %q", pid, got, argv)
	}
}

// wrapperLines are the lines the wrapper wrote to QEMU's stderr.
func wrapperLines(t testing.TB, v *vm) []string {
	t.Helper()
	b, err := os.ReadFile(v.stderr)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "tapsync-qemu") {
			lines = append(lines, l)
		}
	}
	return lines
}

// TestWrapped runs a Kata-shaped VM through the wrapper: the PID is QEMU's,
// the runtime's two monitors and the wrapper's answer, and after QEMU is
// killed (leaving its socket behind) a new QEMU of the same sandbox takes
// the stale socket's path.
func TestWrapped(t *testing.T) {
	skipUnlessRoot(t)
	qemu := realQEMU(t)
	dir := shortTemp(t)
	sockDir := filepath.Join(dir, "qmp")
	exe := installWrapper(t, dir, "# test\nqemu = "+qemu+"\ndir = "+sockDir+"\n")
	id := "f00d" + strconv.Itoa(os.Getpid())
	args := kataArgs("sandbox-"+id+",debug-threads=on", filepath.Join(dir, "main.sock"))
	ours := filepath.Join(sockDir, id+".sock")
	for round := range 2 {
		v := start(t, dir, exe, args)
		for _, p := range []string{filepath.Join(dir, "main.sock"), v.fdSock, ours} {
			greet(t, v, p)
		}
		checkIsQEMU(t, v, qemu, append(append([]string{qemu}, args...), "-qmp", "unix:"+ours+",server=on,wait=off"))
		if l := wrapperLines(t, v); len(l) != 0 {
			t.Errorf("round %d: stderr lines %q", round, l)
		}
		if fi, err := os.Lstat(sockDir); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
			t.Fatalf("socket dir: %v %v", fi, err)
		}
		// SIGKILL: QEMU cannot unlink its socket, the next one finds it stale.
		v.stop()
		if fi, err := os.Lstat(ours); err != nil || fi.Mode().Type() != os.ModeSocket {
			t.Fatalf("round %d: after SIGKILL, %s: %v %v", round, ours, fi, err)
		}
	}
}

// TestWrappedFailOpen: whenever the wrapper's own socket cannot be had
// safely, QEMU starts with its arguments unchanged and one stderr line.
func TestWrappedFailOpen(t *testing.T) {
	skipUnlessRoot(t)
	qemu := realQEMU(t)
	id := "f00d" + strconv.Itoa(os.Getpid())
	for _, tc := range []struct {
		name  string
		vmNm  string                                  // -name; default sandbox-<id>
		conf  string                                  // default: qemu and dir
		setup func(t *testing.T, dir, sockDir string) // before QEMU starts
		line  string                                  // after the prefix; {dir} is the socket dir, {conf} the config
		keep  string                                  // a file at the socket path that must survive
	}{
		{name: "dir owned by another uid", setup: func(t *testing.T, _, sockDir string) {
			mustDo(t, os.Mkdir(sockDir, 0o700), os.Chown(sockDir, 65534, 65534))
		}, line: "socket dir {dir}: owned by uid 65534, not root"},
		{name: "dir is a symlink", setup: func(t *testing.T, _, sockDir string) {
			mustDo(t, os.Mkdir(sockDir+".real", 0o700), os.Symlink(sockDir+".real", sockDir))
		}, line: "socket dir {dir}: is a symlink"},
		{name: "dir mode 0777", setup: func(t *testing.T, _, sockDir string) {
			mustDo(t, os.Mkdir(sockDir, 0o700), os.Chmod(sockDir, 0o777))
		}, line: "socket dir {dir}: mode 0777, want no group or other bits"},
		{name: "bad id", vmNm: "sandbox-a,,b", line: `sandbox id "a,b": want 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit`},
		{name: "a file at the socket path", setup: func(t *testing.T, _, sockDir string) {
			mustDo(t, os.Mkdir(sockDir, 0o700), os.WriteFile(filepath.Join(sockDir, id+".sock"), []byte("keep"), 0o600))
		}, line: "socket path {dir}/" + id + ".sock: exists and is not a socket (regular file); QEMU would remove it", keep: "keep"},
		{name: "a live socket at the socket path", setup: func(t *testing.T, _, sockDir string) {
			mustDo(t, os.Mkdir(sockDir, 0o700))
			l, err := net.Listen("unix", filepath.Join(sockDir, id+".sock"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}, line: "socket path {dir}/" + id + ".sock: a live socket (another process serves it)"},
		{name: "config writable by others", setup: func(t *testing.T, dir, _ string) {
			mustDo(t, os.Chmod(filepath.Join(dir, "tapsync-qemu.conf"), 0o666))
		}, line: "config {conf} ignored: writable by group or others (mode 0666)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortTemp(t)
			sockDir := filepath.Join(dir, "qmp")
			exe := installWrapper(t, dir, "qemu = "+qemu+"\ndir = "+sockDir+"\n")
			if tc.setup != nil {
				tc.setup(t, dir, sockDir)
			}
			name := tc.vmNm
			if name == "" {
				name = "sandbox-" + id
			}
			ours := filepath.Join(sockDir, id+".sock")
			before, _ := os.Lstat(ours)
			args := kataArgs(name, filepath.Join(dir, "main.sock"))
			v := start(t, dir, exe, args)
			greet(t, v, filepath.Join(dir, "main.sock"))
			greet(t, v, v.fdSock)
			checkIsQEMU(t, v, qemu, append([]string{qemu}, args...))
			if after, _ := os.Lstat(ours); (before == nil) != (after == nil) || before != nil && !os.SameFile(before, after) {
				t.Errorf("%s changed: %v → %v", ours, before, after)
			}
			want := warnPrefix + strings.NewReplacer("{dir}", sockDir, "{conf}", exe+".conf").Replace(tc.line)
			if got := wrapperLines(t, v); len(got) != 1 || got[0] != want {
				t.Errorf("stderr lines:\n got %q\nwant %q", got, want)
			}
			if tc.keep != "" {
				if b, err := os.ReadFile(ours); err != nil || string(b) != tc.keep {
					t.Errorf("the file at the socket path: %q, %v", b, err)
				}
			}
		})
	}
}

func mustDo(t *testing.T, errs ...error) {
	t.Helper()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}

// TestWrapperPassThrough: queries reach QEMU untouched and print what QEMU
// prints.
func TestWrapperPassThrough(t *testing.T) {
	skipUnlessRoot(t)
	qemu := realQEMU(t)
	dir := shortTemp(t)
	exe := installWrapper(t, dir, "qemu = "+qemu+"\ndir = "+filepath.Join(dir, "qmp")+"\n")
	for _, args := range [][]string{
		{"--version"}, {"-version"}, {"-h"}, {"-machine", "help"}, {"-name", "sandbox-abc", "-device", "help"},
		{"-name", "sandbox-abc", "-cpu", "help"},
	} {
		want, err := exec.Command(qemu, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %q: %v", qemu, args, err)
		}
		got, err := exec.Command(exe, args...).CombinedOutput()
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("wrapper %q: %v\n%s\nwant:\n%s", args, err, got, want)
		}
	}
	if _, err := os.Lstat(filepath.Join(dir, "qmp")); !os.IsNotExist(err) {
		t.Errorf("a query made the socket dir: %v", err)
	}
}

// TestWrapperCannotExec: a missing QEMU and a QEMU that is the wrapper
// itself end with 127 and one line, as a shell ends a command it cannot
// run.
func TestWrapperCannotExec(t *testing.T) {
	skipUnlessRoot(t)
	realQEMU(t)
	dir := shortTemp(t)
	for _, tc := range []struct {
		name, qemu, line string
	}{
		{"missing", "/nonexistent/qemu", "tapsync-qemu: cannot exec /nonexistent/qemu: no such file or directory"},
		{"itself", "{exe}", "tapsync-qemu: refusing to exec {exe}: it is this wrapper (same inode); set qemu in {exe}.conf"},
		{"a symlink to itself", "{dir}/qemu-system-x86_64", "tapsync-qemu: refusing to exec {dir}/qemu-system-x86_64: it is this wrapper (same inode); set qemu in {exe}.conf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sub := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			mustDo(t, os.Mkdir(sub, 0o700))
			exe := filepath.Join(sub, "tapsync-qemu")
			r := strings.NewReplacer("{exe}", exe, "{dir}", sub)
			installWrapper(t, sub, "qemu = "+r.Replace(tc.qemu)+"\n")
			mustDo(t, os.Symlink(exe, filepath.Join(sub, "qemu-system-x86_64")))
			cmd := exec.Command(exe, "-name", "sandbox-abc", "-S")
			out, err := cmd.CombinedOutput()
			if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 127 || string(out) != r.Replace(tc.line)+"\n" {
				t.Errorf("%v, %q; want exit 127 and %q", err, out, r.Replace(tc.line))
			}
		})
	}
}

// TestWrapperKeepsProcess: what QEMU inherits (environment, working
// directory, limits, ignored signals, capabilities, fds 0-3) is the same
// through the wrapper as without it. (The blocked-signal mask is not
// compared: QEMU's main thread changes it while it starts threads.)
func TestWrapperKeepsProcess(t *testing.T) {
	skipUnlessRoot(t)
	qemu := realQEMU(t)
	seen := map[bool]map[string]string{}
	for _, wrapped := range []bool{false, true} {
		dir := shortTemp(t)
		exe := qemu
		if wrapped {
			exe = installWrapper(t, dir, "qemu = "+qemu+"\ndir = "+filepath.Join(dir, "qmp")+"\n")
		}
		args := kataArgs("sandbox-keep", filepath.Join(dir, "main.sock"))
		v := start(t, dir, exe, args)
		greet(t, v, filepath.Join(dir, "main.sock"))
		proc := "/proc/" + strconv.Itoa(v.cmd.Process.Pid) + "/"
		s := map[string]string{}
		b, _ := os.ReadFile(proc + "environ")
		s["environ"] = string(b)
		b, _ = os.ReadFile(proc + "limits")
		s["limits"] = string(b)
		cwd, _ := os.Readlink(proc + "cwd")
		s["cwd"] = strings.TrimPrefix(cwd, dir)
		b, _ = os.ReadFile(proc + "status")
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, _ := strings.Cut(l, ":"); k == "SigIgn" || k == "NoNewPrivs" || k == "CapEff" {
				s[k] = strings.TrimSpace(v)
			}
		}
		// The fds QEMU was given (0-3) are the same; nothing of the
		// wrapper's stays open. (QEMU's own fds vary while it starts.)
		var given []string
		for fd := range 4 {
			target, _ := os.Readlink(proc + "fd/" + strconv.Itoa(fd))
			kind, _, _ := strings.Cut(strings.TrimPrefix(target, dir), ":")
			given = append(given, kind)
		}
		s["fds 0-3"] = strings.Join(given, " ")
		fds, _ := os.ReadDir(proc + "fd")
		for _, fd := range fds {
			if target, _ := os.Readlink(proc + "fd/" + fd.Name()); wrapped && strings.HasPrefix(target, exe) {
				t.Errorf("QEMU holds the wrapper's %s as fd %s", target, fd.Name())
			}
		}
		seen[wrapped] = s
		v.stop()
	}
	for k, direct := range seen[false] {
		if w := seen[true][k]; w != direct {
			t.Errorf("%s: direct %q, wrapped %q", k, direct, w)
		}
	}
}

// BenchmarkStartDirect and BenchmarkStartWrapped time a Kata-shaped start:
// exec until the runtime's QMP monitor greets.
func BenchmarkStartDirect(b *testing.B)  { benchStart(b, false) }
func BenchmarkStartWrapped(b *testing.B) { benchStart(b, true) }

func benchStart(b *testing.B, wrapped bool) {
	skipUnlessRoot(b)
	qemu := realQEMU(b)
	dir := shortTemp(b)
	exe := qemu
	if wrapped {
		exe = installWrapper(b, dir, "qemu = "+qemu+"\ndir = "+filepath.Join(dir, "qmp")+"\n")
	}
	main := filepath.Join(dir, "main.sock")
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		v := start(b, dir, exe, kataArgs("sandbox-bench"+strconv.Itoa(i), main))
		greet(b, v, main)
		b.StopTimer()
		v.stop()
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/op")
}
