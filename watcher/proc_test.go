package watcher

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testnet"
)

func TestQMPSocket(t *testing.T) {
	for _, tc := range []struct {
		name string
		args string // space separated, after argv[0]
		want string // "" for none
	}{
		{"modern", "-qmp unix:/run/a.sock,server=on,wait=off", "/run/a.sock"},
		{"old flags", "-qmp unix:/run/a.sock,server,nowait", "/run/a.sock"},
		{"double dash", "--qmp unix:/run/a.sock,server=on", "/run/a.sock"},
		{"path key", "-qmp unix:path=/run/a.sock,server=on", "/run/a.sock"},
		{"escaped comma", "-qmp unix:/run/a,,b.sock,server=on", "/run/a,b.sock"},
		{"first of two", "-qmp unix:/run/a.sock,server=on -qmp unix:/run/b.sock,server=on", "/run/a.sock"},
		{"relative", "-qmp unix:a.sock,server=on", "a.sock"},
		{"client socket skipped", "-qmp unix:/run/c.sock -qmp unix:/run/a.sock,server=on", "/run/a.sock"},
		{"server off skipped", "-qmp unix:/run/c.sock,server=off", ""},
		{"tcp skipped", "-qmp tcp:localhost:4444,server=on -qmp unix:/run/a.sock,server=on", "/run/a.sock"},
		{"chardev and mon", "-chardev socket,id=qmp0,path=/run/m.sock,server=on,wait=off -mon chardev=qmp0,mode=control", "/run/m.sock"},
		{"mon before chardev", "-mon chardev=qmp0,mode=control -chardev socket,id=qmp0,path=/run/m.sock,server=on", "/run/m.sock"},
		{"mon implied chardev", "-chardev socket,id=qmp0,path=/run/m.sock,server=on -mon qmp0,mode=control", "/run/m.sock"},
		{"hmp mon skipped", "-chardev socket,id=h,path=/run/h.sock,server=on -mon chardev=h,mode=readline", ""},
		{"mon without mode is hmp", "-chardev socket,id=h,path=/run/h.sock,server=on -mon chardev=h", ""},
		{"qmp chardev", "-chardev socket,id=q,path=/run/q.sock,server=on -qmp chardev:q", "/run/q.sock"},
		{"order by monitor", "-chardev socket,id=q,path=/run/q.sock,server=on -mon q,mode=control -qmp unix:/run/a.sock,server=on", "/run/q.sock"},
		{"hmp monitor skipped", "-monitor unix:/run/h.sock,server=on,wait=off", ""},
		{"flags before", "-nodefaults -S -qmp unix:/run/a.sock,server=on", "/run/a.sock"},
		{"trailing -qmp", "-qmp", ""},
		{"none", "-m 64 -display none", ""},
	} {
		args := append([]string{"qemu-system-x86_64"}, strings.Fields(tc.args)...)
		got, ok := qmpSocket(args)
		if ok != (tc.want != "") || got != tc.want {
			t.Errorf("%s: qmpSocket(%q) = %q, %v; want %q", tc.name, tc.args, got, ok, tc.want)
		}
	}
}

func TestParseQemuOpts(t *testing.T) {
	for _, tc := range []struct {
		in, implied string
		want        map[string]string
	}{
		{"/a,server=on,wait=off", "path", map[string]string{"path": "/a", "server": "on", "wait": "off"}},
		{"/a,server,nowait", "path", map[string]string{"path": "/a", "server": "on", "wait": "off"}},
		{"path=/a,server", "path", map[string]string{"path": "/a", "server": "on"}},
		{"socket,id=x,path=/a,,b", "backend", map[string]string{"backend": "socket", "id": "x", "path": "/a,b"}},
		{"server,path=/a", "", map[string]string{"server": "on", "path": "/a"}},
		{"", "path", map[string]string{}},
	} {
		if got := parseQemuOpts(tc.in, tc.implied); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("parseQemuOpts(%q, %q) = %v, want %v", tc.in, tc.implied, got, tc.want)
		}
	}
}

// fakeProc writes /proc/<pid> entries for discovery: cmdline, status
// (Uid: uid x4), and symlinks ns/net → netns, exe → exe and cwd → cwd.
func fakeProc(t *testing.T, root, pid string, uid int, exe, netns, cwd string, argv ...string) {
	t.Helper()
	dir := filepath.Join(root, pid)
	if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cmdline"), []byte(strings.Join(argv, "\x00")+"\x00"), 0o444); err != nil {
		t.Fatal(err)
	}
	status := fmt.Sprintf("Name:\tqemu\nUid:\t%d\t%d\t%d\t%d\nGid:\t0\t0\t0\t0\n", uid, uid, uid, uid)
	if err := os.WriteFile(filepath.Join(dir, "status"), []byte(status), 0o444); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{"ns/net": netns, "exe": exe, "cwd": cwd} {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
}

// copyFile copies src to dst with mode and returns dst.
func copyFile(t *testing.T, src, dst string, mode os.FileMode) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dst, mode); err != nil { // past the umask
		t.Fatal(err)
	}
	return dst
}

// listenUnix serves a unix socket at path from this process until the
// test ends.
func listenUnix(t *testing.T, path string) {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
}

// TestDiscoverQEMUFakeProc runs discovery over a fake /proc: which
// processes are taken for QEMU, and why the others are refused.
func TestDiscoverQEMUFakeProc(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tsp")
	ns2 := testnet.NewNS(t, "tsp")
	netnsDir := t.TempDir()
	bindNetns(t, ns.Path, filepath.Join(netnsDir, "pod1"))
	bindNetns(t, ns2.Path, filepath.Join(netnsDir, "pod2"))
	// The host's own netns bound in the dir is never a sandbox's.
	bindNetns(t, "/proc/self/ns/net", filepath.Join(netnsDir, "host"))
	if err := os.WriteFile(filepath.Join(netnsDir, "placeholder"), nil, 0); err != nil {
		t.Fatal(err)
	}

	// The binaries: a trusted "QEMU" (any root-owned file will do: only
	// its identity counts), one owned by nobody, one writable by all,
	// and one nobody configured.
	bins := t.TempDir()
	qemu := copyFile(t, "/bin/true", filepath.Join(bins, "qemu-system-x86_64"), 0o755)
	nobodys := copyFile(t, "/bin/true", filepath.Join(bins, "qemu-nobody"), 0o755)
	if err := os.Chown(nobodys, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	writable := copyFile(t, "/bin/true", filepath.Join(bins, "qemu-writable"), 0o777)
	stranger := copyFile(t, "/bin/true", filepath.Join(bins, "other"), 0o755)

	// Sockets: in the QMP dir, outside it, behind a symlink leading out
	// of it, and a regular file where a socket should be.
	qmpDir := t.TempDir()
	outside := t.TempDir()
	for _, p := range []string{"vm1/qmp.sock", "vm2/qmp.sock", "vm3/qmp.sock", "vm/rel.sock"} {
		if err := os.MkdirAll(filepath.Join(qmpDir, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		listenUnix(t, filepath.Join(qmpDir, p))
	}
	listenUnix(t, filepath.Join(outside, "pod.sock"))
	if err := os.Symlink(outside, filepath.Join(qmpDir, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(qmpDir, "file.sock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	qmpArg := func(p string) []string { return []string{"-qmp", "unix:" + p + ",server=on,wait=off"} }
	sock := func(p string) string { return filepath.Join(qmpDir, p) }

	proc := t.TempDir()
	argv := func(args ...string) []string { return append([]string{"/usr/bin/qemu-system-x86_64"}, args...) }
	// pod1: every refusal, then pid 100, the good one (relative socket,
	// via chardev), and 150, good too but a higher pid.
	fakeProc(t, proc, "10", 0, stranger, ns.Path, "/", argv(qmpArg(sock("vm1/qmp.sock"))...)...)
	fakeProc(t, proc, "11", 0, nobodys, ns.Path, "/", argv(qmpArg(sock("vm1/qmp.sock"))...)...)
	fakeProc(t, proc, "12", 0, writable, ns.Path, "/", argv(qmpArg(sock("vm1/qmp.sock"))...)...)
	fakeProc(t, proc, "13", 1000, qemu, ns.Path, "/", argv(qmpArg(sock("vm1/qmp.sock"))...)...)
	fakeProc(t, proc, "14", 0, qemu, ns.Path, "/", argv(qmpArg(filepath.Join(outside, "pod.sock"))...)...)
	fakeProc(t, proc, "15", 0, qemu, ns.Path, "/", argv(qmpArg(sock("escape/pod.sock"))...)...)
	fakeProc(t, proc, "16", 0, qemu, ns.Path, "/", argv(qmpArg(qmpDir+"/vm1/../../x.sock")...)...)
	fakeProc(t, proc, "17", 0, qemu, ns.Path, "/", argv(qmpArg(sock("file.sock"))...)...)
	fakeProc(t, proc, "18", 0, qemu, ns.Path, "/", argv(qmpArg(sock("missing.sock"))...)...)
	fakeProc(t, proc, "99", 0, qemu, ns.Path, "/", argv("-m", "64")...) // no QMP socket
	fakeProc(t, proc, "100", 0, qemu, ns.Path, sock("vm"), argv(
		"-chardev", "socket,id=mon0,path=rel.sock,server=on,wait=off", "-mon", "chardev=mon0,mode=control")...)
	fakeProc(t, proc, "150", 0, qemu, ns.Path, "/", argv(qmpArg(sock("vm1/qmp.sock"))...)...)
	// pod2: qemu-kvm by its name, running as a configured QEMU user.
	fakeProc(t, proc, "200", 1000, qemu, ns2.Path, "/", "qemu-kvm", "-qmp", "unix:"+sock("vm2/qmp.sock")+",server,nowait")
	// A QEMU in the host netns, which is bound in netnsDir.
	fakeProc(t, proc, "300", 0, qemu, "/proc/self/ns/net", "/", argv(qmpArg(sock("vm3/qmp.sock"))...)...)
	// Not QEMU by its argv.
	fakeProc(t, proc, "400", 0, qemu, ns.Path, "/", "/bin/sh", "-c", "qemu-system-x86_64 -qmp unix:/run/sh.sock,server=on")
	// A process that vanished, a kernel thread, and junk.
	if err := os.MkdirAll(filepath.Join(proc, "500"), 0o755); err != nil {
		t.Fatal(err)
	}
	fakeProc(t, proc, "600", 0, qemu, ns.Path, "/")
	if err := os.MkdirAll(filepath.Join(proc, "self"), 0o755); err != nil {
		t.Fatal(err)
	}

	cfg := ProcConfig{Binaries: []string{qemu, nobodys, writable, filepath.Join(bins, "missing")}, QMPDir: qmpDir + "/", UIDs: []uint32{1000}}
	got, rejected, err := cfg.discover(proc, netnsDir+"/")
	if err != nil {
		t.Fatal(err)
	}
	// pid 13 runs as uid 1000 too, which is allowed: it fails on nothing
	// else, so it must be refused below only once UIDs is empty.
	want := []Sandbox{
		{ID: "proc-pod1", Netns: filepath.Join(netnsDir, "pod1"), QMP: sock("vm1/qmp.sock"), PID: 13},
		{ID: "proc-pod2", Netns: filepath.Join(netnsDir, "pod2"), QMP: sock("vm2/qmp.sock"), PID: 200},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("discover = %+v\nwant %+v", got, want)
	}
	wantWhy := map[int]string{
		10: "not a configured QEMU binary",
		11: "owned by uid 65534, not root",
		12: "writable by others",
		14: "not under",
		15: "through a symlink",
		16: "not under",
		17: "not a socket",
		18: "no such file",
	}
	checkRejected(t, rejected, wantWhy)

	// Root only: pid 13 and 200 are refused for their user, and the good
	// pid 100 of pod1 is found.
	cfg.UIDs = nil
	got, rejected, err = cfg.discover(proc, netnsDir)
	if err != nil {
		t.Fatal(err)
	}
	want = []Sandbox{{ID: "proc-pod1", Netns: filepath.Join(netnsDir, "pod1"), QMP: sock("vm/rel.sock"), PID: 100}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("discover, root only = %+v\nwant %+v", got, want)
	}
	wantWhy[13] = "runs as uid 1000"
	wantWhy[200] = "runs as uid 1000"
	checkRejected(t, rejected, wantWhy)

	// The defaults trust none of these binaries.
	got, err = ProcConfig{QMPDir: qmpDir}.Discover(proc, netnsDir)
	if err != nil || len(got) != 0 {
		t.Errorf("Discover with the default binaries = %+v, %v; want nothing", got, err)
	}

	if _, err := cfg.Discover(proc, filepath.Join(netnsDir, "missing")); err == nil {
		t.Error("Discover with a missing netns dir: no error")
	}
}

// checkRejected compares the refusals with want (pid → part of the reason).
func checkRejected(t *testing.T, rejected []procRejection, want map[int]string) {
	t.Helper()
	got := map[int]string{}
	for _, r := range rejected {
		got[r.pid] = r.why
	}
	for pid, why := range want {
		if !strings.Contains(got[pid], why) {
			t.Errorf("pid %d: refused for %q, want a reason containing %q", pid, got[pid], why)
		}
	}
	for pid, why := range got {
		if _, ok := want[pid]; !ok {
			t.Errorf("pid %d refused (%s), want it not looked at or accepted", pid, why)
		}
	}
}

func TestCheckUIDs(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		status  string
		allowed []uint32
		err     string // "" for ok
	}{
		{"Uid:\t0\t0\t0\t0\n", nil, ""},
		{"Name:\tq\nUid:\t0\t0\t0\t0\nGid:\t5\t5\t5\t5\n", nil, ""},
		{"Uid:\t0\t1000\t0\t0\n", nil, "uid 1000"},
		{"Uid:\t1000\t0\t0\t0\n", []uint32{1000}, ""},
		{"Uid:\t1000\t1001\t0\t0\n", []uint32{1000}, "uid 1001"},
		{"Uid:\t0\tx\n", nil, "bad Uid line"},
		{"Uid:\n", nil, "no Uid line"},
		{"Name:\tq\n", nil, "no Uid line"},
		{"", nil, "no Uid line"},
	} {
		p := filepath.Join(dir, "status")
		if err := os.WriteFile(p, []byte(tc.status), 0o644); err != nil {
			t.Fatal(err)
		}
		err := checkUIDs(p, tc.allowed)
		if (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("checkUIDs(%q, %v) = %v, want %q", tc.status, tc.allowed, err, tc.err)
		}
	}
	if err := checkUIDs(filepath.Join(dir, "missing"), nil); err == nil {
		t.Error("checkUIDs of a missing status file: no error")
	}
}

func TestUnderDir(t *testing.T) {
	for _, tc := range []struct {
		dir, path string
		ok        bool
	}{
		{"/run/vc/vm", "/run/vc/vm/abc/qmp.sock", true},
		{"/run/vc/vm/", "/run/vc/vm/x.sock", true},
		{"/run/vc/vm", "/run/vc/vm/a/../b/qmp.sock", true},
		{"/", "/x", true},
		{"/run/vc/vm", "/run/vc/vm", false},
		{"/run/vc/vm", "/run/vc/vm/", false},
		{"/run/vc/vm", "/run/vc/vm/..", false},
		{"/run/vc/vm", "/run/vc/vm/../x.sock", false},
		{"/run/vc/vm", "/run/vc/vm2/x.sock", false},
		{"/run/vc/vm", "/run/vc/vmx", false},
		{"/run/vc/vm", "vm/x.sock", false},
		{"run/vc/vm", "run/vc/vm/x.sock", false},
		{"/run/vc/vm", "", false},
		{"", "/x", false},
		{"/run/vc/vm", "/run/vc/vm/a\x00b", false},
	} {
		if err := UnderDir(tc.dir, tc.path); (err == nil) != tc.ok {
			t.Errorf("UnderDir(%q, %q) = %v, want ok=%v", tc.dir, tc.path, err, tc.ok)
		}
	}
}

// startQEMU starts a diskless QEMU (it idles in its firmware) and kills it
// when the test ends.
func startQEMU(t *testing.T, argv ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", strings.Join(argv, " "), err)
	}
	pid := cmd.Process.Pid
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill() // by pid: the process we started
		<-exited
		if t.Failed() {
			t.Logf("QEMU pid %d output:\n%s", pid, out.String())
		}
	})
	return cmd
}

func qemuArgs(socks ...string) []string {
	args := []string{"qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64"}
	for _, s := range socks {
		args = append(args, "-qmp", "unix:"+s+",server=on,wait=off")
	}
	return args
}

// TestDiscoverQEMU runs discovery over the real /proc: a real QEMU in a
// netns is found, with its pid, and the peer check proves it serves its
// socket; processes that only look like QEMU are refused.
func TestDiscoverQEMU(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("skipping: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
	}
	ctx, logs := testCtx(t)
	ns := testnet.NewNS(t, "tsq")
	nsFake := testnet.NewNS(t, "tsq")
	nsNobody := testnet.NewNS(t, "tsq")
	qmpDir := t.TempDir()
	a, b, c := filepath.Join(qmpDir, "a.sock"), filepath.Join(qmpDir, "b.sock"), filepath.Join(qmpDir, "c.sock")
	// nsenter execs QEMU in place: the pid is QEMU's.
	in := startQEMU(t, append([]string{"nsenter", "--net=" + ns.Path, "--"}, qemuArgs(a, b)...)...)
	// The same QEMU outside any netns of the netns dir.
	startQEMU(t, qemuArgs(c)...)

	// A pod's fake: a shell renamed qemu-system-x86_64, with QEMU's argv
	// naming a socket it (here: the test) serves in the QMP dir.
	bins := t.TempDir()
	fake := copyFile(t, "/bin/dash", filepath.Join(bins, "qemu-system-x86_64"), 0o755)
	fakeSock := filepath.Join(qmpDir, "fake.sock")
	listenUnix(t, fakeSock)
	fakeArgs := []string{"-c", "read x", "-qmp", "unix:" + fakeSock + ",server=on,wait=off"}
	fakeCmd := startIdle(t, append([]string{"nsenter", "--net=" + nsFake.Path, "--", fake}, fakeArgs...)...)
	// The same shell configured as QEMU, but owned by nobody.
	nobodys := copyFile(t, "/bin/dash", filepath.Join(bins, "qemu-kvm"), 0o755)
	if err := os.Chown(nobodys, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	nobodyCmd := startIdle(t, append([]string{"nsenter", "--net=" + nsNobody.Path, "--", nobodys}, fakeArgs...)...)

	cfg := ProcConfig{Binaries: append([]string{nobodys}, DefaultQEMUBinaries...), QMPDir: qmpDir}
	d := NewProcDiscovery(cfg, "/proc", "/var/run/netns")
	want := Sandbox{ID: "proc-" + ns.Name, Netns: ns.Path, QMP: a, PID: in.Process.Pid}
	deadline := time.Now().Add(20 * time.Second)
	var got []Sandbox
	for {
		var err error
		got, err = d.Scan(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_, cErr := os.Stat(c) // the outside QEMU is up once its socket exists
		if slices.Contains(got, want) && cErr == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Scan never found %+v (QEMU pid %d), with the outside QEMU up (stat %s: %v); last: %+v",
				want, in.Process.Pid, c, cErr, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, s := range got {
		if s.QMP == b || s.QMP == c || s.Netns == nsFake.Path || s.Netns == nsNobody.Path {
			t.Errorf("Scan reported %+v: want only the first socket of the QEMU in %s", s, ns.Name)
		}
	}
	t.Logf("found %+v", want)

	// The fakes are refused, each logged once.
	logs.waitLine(t, "fake refused", "rejected by /proc discovery", fmt.Sprintf(`"pid":%d`, fakeCmd.Process.Pid), "not a configured QEMU binary")
	logs.waitLine(t, "nobody's binary refused", "rejected by /proc discovery", fmt.Sprintf(`"pid":%d`, nobodyCmd.Process.Pid), "owned by uid 65534")
	if _, err := d.Scan(ctx); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(logs.String(), fmt.Sprintf(`"pid":%d`, fakeCmd.Process.Pid)); n != 1 {
		t.Errorf("the fake was logged %d times over several scans, want once", n)
	}

	// The peer check: QEMU serves a; the test, not QEMU, serves fake.sock.
	if err := VerifyQMPPeer(a, in.Process.Pid); err != nil {
		t.Errorf("VerifyQMPPeer(%s, QEMU pid %d) = %v, want nil", a, in.Process.Pid, err)
	}
	err := VerifyQMPPeer(fakeSock, in.Process.Pid)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("served by pid %d", os.Getpid())) {
		t.Errorf("VerifyQMPPeer(%s, QEMU pid %d) = %v, want an error naming the listener, pid %d", fakeSock, in.Process.Pid, err, os.Getpid())
	}
	if err := VerifyQMPPeer(c, in.Process.Pid); err == nil {
		t.Errorf("VerifyQMPPeer(%s, QEMU pid %d): the other QEMU's socket passed", c, in.Process.Pid)
	}
	if err := VerifyQMPPeer(filepath.Join(qmpDir, "missing.sock"), in.Process.Pid); err == nil {
		t.Error("VerifyQMPPeer of a missing socket: no error")
	}
}

// startIdle starts a process that waits on its stdin (a pipe held open)
// and kills it when the test ends.
func startIdle(t *testing.T, argv ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", strings.Join(argv, " "), err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() // by pid: the process we started
		stdin.Close()
		cmd.Wait()
	})
	return cmd
}
