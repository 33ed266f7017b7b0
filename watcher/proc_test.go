package watcher

import (
	"bytes"
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

// fakeProc writes /proc/<pid> entries for DiscoverQEMU: cmdline, ns/net (a
// symlink to netns) and cwd.
func fakeProc(t *testing.T, root, pid, netns, cwd string, argv ...string) {
	t.Helper()
	dir := filepath.Join(root, pid)
	if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cmdline"), []byte(strings.Join(argv, "\x00")+"\x00"), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(netns, filepath.Join(dir, "ns", "net")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(cwd, filepath.Join(dir, "cwd")); err != nil {
		t.Fatal(err)
	}
}

func TestDiscoverQEMUFakeProc(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tsp")
	ns2 := testnet.NewNS(t, "tsp")
	netnsDir := t.TempDir()
	bindNetns(t, ns.Path, filepath.Join(netnsDir, "pod1"))
	bindNetns(t, ns2.Path, filepath.Join(netnsDir, "pod2"))
	if err := os.WriteFile(filepath.Join(netnsDir, "placeholder"), nil, 0); err != nil {
		t.Fatal(err)
	}
	proc := t.TempDir()
	const qemu = "/usr/bin/qemu-system-x86_64"
	// pod1: pid 99 has no QMP socket, 100 has one (relative, via chardev),
	// 150 too but a higher pid.
	fakeProc(t, proc, "99", ns.Path, "/", qemu, "-m", "64")
	fakeProc(t, proc, "100", ns.Path, "/srv/vm", qemu,
		"-chardev", "socket,id=mon0,path=rel.sock,server=on,wait=off", "-mon", "chardev=mon0,mode=control")
	fakeProc(t, proc, "150", ns.Path, "/", qemu, "-qmp", "unix:/run/other.sock,server=on,wait=off")
	// pod2: qemu-kvm by its name.
	fakeProc(t, proc, "200", ns2.Path, "/", "qemu-kvm", "-qmp", "unix:/run/kvm.sock,server,nowait")
	// A QEMU in the host netns, which is not in netnsDir.
	fakeProc(t, proc, "300", "/proc/self/ns/net", "/", qemu, "-qmp", "unix:/run/host.sock,server=on")
	// Not QEMU.
	fakeProc(t, proc, "400", ns.Path, "/", "/bin/sh", "-c", "qemu-system-x86_64 -qmp unix:/run/sh.sock,server=on")
	// A process that vanished, a kernel thread, and junk.
	if err := os.MkdirAll(filepath.Join(proc, "500"), 0o755); err != nil {
		t.Fatal(err)
	}
	fakeProc(t, proc, "600", ns.Path, "/")
	if err := os.MkdirAll(filepath.Join(proc, "self"), 0o755); err != nil {
		t.Fatal(err)
	}

	got, err := DiscoverQEMU(proc, netnsDir+"/")
	if err != nil {
		t.Fatal(err)
	}
	want := []Sandbox{
		{ID: "proc-pod1", Netns: filepath.Join(netnsDir, "pod1"), QMP: "/srv/vm/rel.sock"},
		{ID: "proc-pod2", Netns: filepath.Join(netnsDir, "pod2"), QMP: "/run/kvm.sock"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("DiscoverQEMU = %+v\nwant %+v", got, want)
	}

	if _, err := DiscoverQEMU(proc, filepath.Join(netnsDir, "missing")); err == nil {
		t.Error("DiscoverQEMU with a missing netns dir: no error")
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

func TestDiscoverQEMU(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("skipping: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
	}
	ns := testnet.NewNS(t, "tsq")
	tmp := t.TempDir()
	a, b, c := filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "c.sock")
	// nsenter execs QEMU in place: the pid is QEMU's.
	in := startQEMU(t, append([]string{"nsenter", "--net=" + ns.Path, "--"}, qemuArgs(a, b)...)...)
	// The same QEMU outside any netns of the netns dir.
	startQEMU(t, qemuArgs(c)...)

	want := Sandbox{ID: "proc-" + ns.Name, Netns: ns.Path, QMP: a}
	const netnsDir = "/var/run/netns"
	deadline := time.Now().Add(20 * time.Second)
	var got []Sandbox
	for {
		var err error
		got, err = DiscoverQEMU("/proc", netnsDir)
		if err != nil {
			t.Fatal(err)
		}
		_, cErr := os.Stat(c) // the outside QEMU is up once its socket exists
		if slices.Contains(got, want) && cErr == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("DiscoverQEMU(/proc, %s) never found %+v (QEMU pid %d), with the outside QEMU up (stat %s: %v); last: %+v",
				netnsDir, want, in.Process.Pid, c, cErr, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, s := range got {
		if s.QMP == b || s.QMP == c {
			t.Errorf("DiscoverQEMU reported %+v: want only the first socket of the QEMU in %s, and nothing for the one outside", s, ns.Name)
		}
	}
	t.Logf("found %+v", want)
}
