//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/typeurl/v2"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testcri"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"
)

// kata4Node is a node laid out the way kata-deploy lays out a Kata 4 node,
// driven through CRI as kubelet drives one: a private containerd 2 with
// CRI, whose runtime handlers are named as kata-deploy names them
// (kata-qemu-runtime-rs, kata-qemu) and served by runc, so that `crictl
// runp` makes a real pod sandbox (CRI makes the netns, containerd runs
// CNI, the Sandbox Store gets its record). The test then starts, in each
// pod, a QEMU shaped like what that Kata runtime starts.
type kata4Node struct {
	t        *testing.T
	cri      *testcri.CRI
	dir      string // short: vc/vm, vc/sbs, kata and shim bundle dirs for Kata's runtimes
	stateDir string
	config   string
	d        *daemonProc
}

func newKata4Node(t *testing.T) *kata4Node {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	n := &kata4Node{t: t, cri: testcri.Start(t), stateDir: t.TempDir()}
	var err error
	if n.dir, err = os.MkdirTemp("", "k4"); err != nil { // socket paths must fit in 108 bytes
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(n.dir) })
	// tapsync's default config; only addresses and dirs differ from a
	// real node's.
	n.config = writeConfig(t, fmt.Sprintf(`
state_dir = %q
metrics_address = ""
[containerd]
address = %q
wrapper_socket = "%[3]s/qmp/{id}.sock"
qmp_socket = "%[3]s/vc/vm/{id}/extra-monitor.sock"
agent_url = "kata-shim://%[3]s/vc/sbs/{id}/shim-monitor.sock"
rs_dir = "%[3]s/kata/{id}"
rs_agent_url = "kata-shim://%[3]s/kata/{id}/shim-monitor.sock"
bundle_dirs = ["%[4]s/io.containerd.runtime.v2.task/{namespace}/{id}", "%[3]s/shim/{namespace}/{id}"]
`, n.stateDir, n.cri.Address(), n.dir, n.cri.StateDir()))
	return n
}

// start runs the daemon and waits until containerd has been listed.
func (n *kata4Node) start() {
	n.t.Helper()
	n.d = startDaemon(n.t, "--config", n.config)
	n.d.waitLog("containerd connected", nil)
}

// kataPod is a pod sandbox with a VM in it, as a Kata runtime starts one.
type kataPod struct {
	id, netns string
	ip        netip.Addr
	vm        *testvm.VM
	probe     *agent.Client // the test's own channel to the guest agent
}

// fakeShim serves Kata's shim management socket at path: GET /agent-url
// answers the VM's agent address.
func fakeShim(t *testing.T, path, agentURL string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/agent-url" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprint(w, agentURL)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// vmShape says how a stand-in shim starts a pod's QEMU.
type vmShape struct {
	// debug: the runtime's debug monitor (enable_debug with
	// extra_monitor_socket "hmp" for runtime-rs, "qmp" for Go).
	debug bool
	// binary is what the shim executes as QEMU (Kata's [hypervisor.qemu]
	// path): "" for QEMU itself, or tapsync-qemu.
	binary string
	// inVC (Go runtime only) puts the VM's sockets in its /run/vc/vm/<id>
	// and has the shim name the agent's socket as a container that
	// mounts the node's /run/vc there sees it.
	inVC bool
}

// holdQMP binds qmp.sock in dir as a stand-in shim does (through the
// directory: dir may be too long a path for sun_path) and returns the
// listening socket's file, to pass to QEMU as -qmp unix:fd=3.
func holdQMP(t *testing.T, dir string) *os.File {
	t.Helper()
	dirfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dirfd)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: fmt.Sprintf("/proc/self/fd/%d/qmp.sock", dirfd), Net: "unix"})
	if err != nil {
		t.Fatalf("stand-in shim: bind qmp.sock in %s: %v", dir, err)
	}
	t.Cleanup(func() { ln.Close() })
	lf, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lf.Close() })
	return lf
}

// shimConnect connects the stand-in shim to qmp.sock in dir and holds the
// connection for the VM's life: no second client can use it.
func shimConnect(t *testing.T, dir string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	shim, err := qmp.Dial(ctx, filepath.Join(dir, "qmp.sock"), qmp.Options{})
	if err != nil {
		t.Fatalf("stand-in shim: QMP on qmp.sock: %v", err)
	}
	t.Cleanup(func() { shim.Close() })
}

// startRsVM starts, in a pod whose bundle dir is bundle, a QEMU shaped
// like runtime-rs's: Kata's -name; its cwd is the bundle dir; its QMP
// monitor is qmp.sock there, bound by a stand-in shim, passed as `-qmp
// unix:fd=3` and held by the shim for the VM's life (no second QMP
// client); with debug, its HMP debug monitor debug-monitor.sock, relative
// to its cwd; and runtime-rs's management socket in <dir>/kata/<id>.
func (n *kata4Node) startRsVM(id, netns, bundle string, shape vmShape) *testvm.VM {
	t := n.t
	t.Helper()
	args := []string{"-qmp", "unix:fd=3,server=on,wait=off"}
	if shape.debug {
		args = append(args, "-monitor", "unix:path=debug-monitor.sock,server=on,wait=off")
	}
	vm := testvm.ForTest(t, testvm.Options{NetNS: netns, RootPorts: 2, Cwd: bundle, Name: "sandbox-" + id, Binary: shape.binary,
		ExtraFiles: []*os.File{holdQMP(t, bundle)}, Args: args})
	shimConnect(t, bundle)
	fakeShim(t, filepath.Join(n.dir, "kata", id, "shim-monitor.sock"), vm.Agent)
	return vm
}

// startGoVM starts, in pod id, a QEMU shaped like the Go runtime's: Kata's
// -name and -pidfile; its QMP monitor /run/vc/vm/<id>/qmp.sock bound and
// held by the shim, passed as an fd; with debug, a QMP extra monitor at
// /run/vc/vm/<id>/extra-monitor.sock; and the shim's management socket
// at /run/vc/sbs/<id>.
func (n *kata4Node) startGoVM(id, netns string, shape vmShape) *testvm.VM {
	t := n.t
	t.Helper()
	vmDir := filepath.Join(n.dir, "vc", "vm", id)
	if err := os.MkdirAll(vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	args := []string{"-qmp", "unix:fd=3,server=on,wait=off", "-pidfile", filepath.Join(vmDir, "pid")}
	if shape.debug {
		args = append(args, "-qmp", "unix:"+filepath.Join(vmDir, "extra-monitor.sock")+",server=on,wait=off")
	}
	opts := testvm.Options{NetNS: netns, RootPorts: 2, Name: "sandbox-" + id, Binary: shape.binary,
		ExtraFiles: []*os.File{holdQMP(t, vmDir)}, Args: args}
	if shape.inVC {
		opts.Dir = vmDir
	}
	vm := testvm.ForTest(t, opts)
	shimConnect(t, vmDir)
	agentURL := vm.Agent
	if shape.inVC {
		agentURL = "unix://" + filepath.Join("/run/vc/vm", id, filepath.Base(strings.TrimPrefix(vm.Agent, "unix://")))
	}
	fakeShim(t, filepath.Join(n.dir, "vc", "sbs", id, "shim-monitor.sock"), agentURL)
	return vm
}

func (n *kata4Node) runPod(name, handler string, shape vmShape) *kataPod {
	n.t.Helper()
	pod := n.cri.RunPod(name, handler)
	p := &kataPod{id: pod.ID, netns: pod.NetnsPath, ip: pod.IP}
	if strings.Contains(handler, "runtime-rs") {
		p.vm = n.startRsVM(pod.ID, pod.NetnsPath, pod.BundleDir, shape)
	} else {
		p.vm = n.startGoVM(pod.ID, pod.NetnsPath, shape)
	}
	p.probe = dialTestAgent(n.t, p.vm)
	return p
}

func dialTestAgent(t *testing.T, vm *testvm.VM) *agent.Client {
	t.Helper()
	u, err := agent.ParseURL(vm.TestAgent)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, u, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// sandbox is id's entry in `tapsync status`, nil if absent.
func (n *kata4Node) sandbox(id string) map[string]any { return sandboxStatus(n.t, n.stateDir, id) }

// wired waits until sandbox id is listed, its last pass succeeded, and it
// has a configured endpoint for each of links; it returns that status.
func (n *kata4Node) wired(id string, links ...string) map[string]any {
	n.t.Helper()
	var st map[string]any
	eventually(n.t, fmt.Sprintf("sandbox %s wired (%v), guest configured", id, links), func() string {
		if st = n.sandbox(id); st == nil {
			return "not in status"
		}
		if e, _ := st["last_error"].(string); e != "" {
			return "last error: " + e
		}
		var have []string
		for _, e := range st["endpoints"].([]any) {
			e := e.(map[string]any)
			if e["guest"] != "configured" {
				return fmt.Sprintf("endpoint %v: guest %v", e["link"], e["guest"])
			}
			have = append(have, e["link"].(string))
		}
		for _, l := range links {
			if !slices.Contains(have, l) {
				return fmt.Sprintf("endpoints %v lack %s", have, l)
			}
		}
		return ""
	})
	return st
}

// guestHas waits until the guest has an interface with address a.
func guestHas(t *testing.T, probe *agent.Client, a netip.Addr) agent.Interface {
	t.Helper()
	var found agent.Interface
	eventually(t, "guest interface with "+a.String(), func() string {
		ifs, err := probe.ListInterfaces(t.Context())
		if err != nil {
			return err.Error()
		}
		for _, i := range ifs {
			for _, p := range i.Addrs {
				if p.Addr() == a {
					found = i
					return ""
				}
			}
		}
		return fmt.Sprintf("guest interfaces %+v", ifs)
	})
	return found
}

// guestNICs lists the NICs of ours in the VM, through the test's own QMP
// socket.
func guestNICs(t *testing.T, vm *testvm.VM) []qmp.NICInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, vm.TestQMP, qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nics, err := c.ListNICs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return slices.DeleteFunc(nics, func(n qmp.NICInfo) bool { return !n.Owned })
}

// TestKata4NodeThroughCRI: tapsync with its default config finds the pods
// of both Kata 4 runtimes that CRI made, wires each one's eth0 (through
// runtime-rs's HMP debug monitor and the Go runtime's QMP extra monitor),
// has the agent give the guest the address CNI gave, wires a second
// network added to a running pod, and unplugs and cleans up when CRI
// stops and removes the pods.
func TestKata4NodeThroughCRI(t *testing.T) {
	n := newKata4Node(t)
	rs := n.runPod("rs", "kata-qemu-runtime-rs", vmShape{debug: true})
	gp := n.runPod("go", "kata-qemu", vmShape{debug: true})

	// Before the daemon runs, check reports what it finds on the node.
	out, err := exec.Command(tapsyncBinary(t), "check", "--config", n.config).CombinedOutput()
	t.Logf("tapsync check (%v):\n%s", err, out)
	for _, want := range []string{
		"sandbox " + rs.id + ": kata-runtime-rs (io.containerd.kata-qemu-runtime-rs.v2)",
		"ok    sandbox " + rs.id + ": HMP monitor " + filepath.Join(n.cri.StateDir(), "io.containerd.runtime.v2.task", "k8s.io", rs.id, "debug-monitor.sock") + " answers",
		"ok    sandbox " + rs.id + ": guest agent at " + rs.vm.Agent + " answers",
		"sandbox " + gp.id + ": kata-go (io.containerd.kata-qemu.v2)",
		"ok    sandbox " + gp.id + ": QMP monitor " + filepath.Join(n.dir, "vc", "vm", gp.id, "extra-monitor.sock") + " answers",
		"ok    sandbox " + gp.id + ": guest agent at " + gp.vm.Agent + " answers",
	} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("tapsync check lacks %q", want)
		}
	}
	n.start()

	for _, c := range []struct {
		pod              *kataPod
		flavour, monitor string
		runtime          string
	}{
		{rs, "kata-runtime-rs", "hmp", "io.containerd.kata-qemu-runtime-rs.v2"},
		{gp, "kata-go", "qmp", "io.containerd.kata-qemu.v2"},
	} {
		st := n.wired(c.pod.id, "eth0")
		if st["flavour"] != c.flavour || st["monitor"] != c.monitor || st["runtime"] != c.runtime {
			t.Errorf("pod %s: flavour %v, monitor %v, runtime %v; want %s, %s, %s", c.pod.id, st["flavour"], st["monitor"], st["runtime"], c.flavour, c.monitor, c.runtime)
		}
		guestHas(t, c.pod.probe, c.pod.ip)
		pingable(t, n.cri.NodeNetns(), c.pod.ip.AsSlice())
	}
	// Each pod is found twice (its pause container and its Sandbox Store
	// record) and is one sandbox.
	if st := status(t, n.stateDir); len(st) != 2 {
		t.Errorf("status lists %d sandboxes, want the 2 pods: %v", len(st), st)
	}
	// With the daemon running, check finds each monitor held by it.
	out, _ = exec.Command(tapsyncBinary(t), "check", "--config", n.config).CombinedOutput()
	for _, want := range []string{"sandbox " + rs.id + ": HMP monitor", "sandbox " + gp.id + ": QMP monitor", "held, probably by the running tapsync daemon"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("tapsync check with the daemon running lacks %q:\n%s", want, out)
		}
	}

	// A second network added to the running runtime-rs pod, as Multus'
	// dynamic networks controller does.
	cni := testcni.New(t)
	subnet := netip.MustParsePrefix("10.231.7.0/24")
	net1 := testcni.Bridge("second", "tsk4br1", subnet, testcni.WithRoutes(netip.MustParsePrefix("10.231.0.0/16")))
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	res, err := cni.Add(ctx, net1, rs.id, rs.netns, "net1")
	if err != nil {
		t.Fatalf("CNI ADD of a second network: %v", err)
	}
	t.Cleanup(func() { _ = cni.Del(context.Background(), net1, rs.id, rs.netns, "net1") })
	a, _ := netip.AddrFromSlice(res.IPs[0].Address.IP)
	n.wired(rs.id, "eth0", "net1")
	guestHas(t, rs.probe, a.Unmap())
	if err := cni.Ping(ctx, a.Unmap()); err != nil {
		t.Errorf("ping the second network's address in the guest: %v", err)
	}

	// CRI stops the Go pod while its VM still runs: tapsync unplugs its
	// NIC, and forgets it.
	if err := cni.Del(ctx, net1, rs.id, rs.netns, "net1"); err != nil {
		t.Fatal(err)
	}
	if err := n.cri.StopPod(gp.id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "stopped pod "+gp.id+" gone from status and its NIC unplugged", func() string {
		if st := n.sandbox(gp.id); st != nil {
			return fmt.Sprintf("still listed: %v", st)
		}
		if nics := guestNICs(t, gp.vm); len(nics) != 0 {
			return fmt.Sprintf("NICs of ours left in the VM: %+v", nics)
		}
		return ""
	})
	if err := n.cri.RemovePod(gp.id); err != nil {
		t.Fatal(err)
	}
	// The runtime-rs pod's VM stops first, as Kata's does, then CRI
	// stops and removes the pod: nothing of it stays.
	rs.vm.Stop()
	if err := n.cri.StopPod(rs.id); err != nil {
		t.Fatal(err)
	}
	if err := n.cri.RemovePod(rs.id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "no sandbox left in status", func() string {
		if st := status(t, n.stateDir); len(st) != 0 {
			return fmt.Sprintf("%v", st)
		}
		return ""
	})
	eventually(t, "no record left", func() string {
		ents, _ := os.ReadDir(n.stateDir)
		var recs []string
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".json") {
				recs = append(recs, e.Name())
			}
		}
		if len(recs) != 0 {
			return fmt.Sprintf("records %v", recs)
		}
		return ""
	})
	n.d.stop(syscall.SIGTERM)
}

// TestKata4SandboxStoreOnly: a pod of the shim sandboxer has no pause
// container and no task, only a Sandbox Store record. No shim here
// implements the sandbox API, so the record is made through containerd's
// v2 client, as the shim sandboxer would leave it; tapsync finds it when
// it lists containerd (here on SIGHUP, which relists), wires it through
// runtime-rs's HMP monitor in the shim sandboxer's bundle dir, and lets
// go of it when the record is deleted. A record for a pod of a
// confidential handler is shown as left alone, and one whose metadata is
// malformed is refused with a line naming it, neither disturbing the rest.
func TestKata4SandboxStoreOnly(t *testing.T) {
	n := newKata4Node(t)
	n.start()
	cli := n.cri.Client()
	ctx := namespaces.WithNamespace(t.Context(), "k8s.io")

	newID := func() string {
		b := make([]byte, 32)
		rand.Read(b)
		return hex.EncodeToString(b)
	}
	record := func(id, runtime, netns string, meta []byte) {
		t.Helper()
		if meta == nil {
			meta, _ = json.Marshal(map[string]any{"Version": "v1", "Metadata": map[string]any{"ID": id, "NetNSPath": netns, "RuntimeHandler": strings.TrimSuffix(strings.TrimPrefix(runtime, "io.containerd."), ".v2")}})
		}
		_, err := cli.SandboxStore().Create(ctx, sandbox.Sandbox{ID: id, Runtime: sandbox.RuntimeOpts{Name: runtime}, Sandboxer: "shim",
			Labels:     map[string]string{"io.cri-containerd.kind": "sandbox"},
			Extensions: map[string]typeurl.Any{"metadata": &anypb.Any{TypeUrl: "github.com/containerd/containerd/v2/internal/cri/store/sandbox/Metadata", Value: meta}}})
		if err != nil {
			t.Fatalf("create Sandbox Store record %s: %v", id, err)
		}
		t.Cleanup(func() { _ = cli.SandboxStore().Delete(context.WithoutCancel(ctx), id) })
	}

	id := newID()
	pod, host := testnet.NewNS(t, "k4pod"), testnet.NewNS(t, "k4host")
	mac := testvm.TestMAC(1)
	testnet.Veth(t, pod, "eth0", mac, host, "peth0")
	testnet.IP(t, "-n", host.Name, "addr", "add", fmt.Sprintf("%s/%d", testvm.PeerIP(mac), testvm.PrefixLen), "dev", "peth0")
	testnet.IP(t, "-n", pod.Name, "addr", "add", fmt.Sprintf("%s/%d", testvm.GuestIP(mac), testvm.PrefixLen), "dev", "eth0")
	bundle := filepath.Join(n.dir, "shim", "k8s.io", id)
	if err := os.MkdirAll(bundle, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(n.dir, "kata", id), 0o700); err != nil {
		t.Fatal(err)
	}
	vm := n.startRsVM(id, pod.Path, bundle, vmShape{debug: true})
	probe := dialTestAgent(t, vm)

	secret := newID()
	record(id, "io.containerd.kata-qemu-runtime-rs.v2", pod.Path, nil)
	record(secret, "io.containerd.kata-qemu-snp.v2", testnet.NewNS(t, "k4snp").Path, nil)
	bad := newID()
	record(bad, "io.containerd.kata-qemu-runtime-rs.v2", "", []byte(`{"Version":"v1","Metadata":`))

	mark := n.d.mark()
	n.d.cmd.Process.Signal(syscall.SIGHUP)
	n.d.waitLogAfter(mark, "skipped: not a sandbox we can wire", map[string]any{"sandbox": bad})
	st := n.wired(id, "eth0")
	if st["monitor"] != "hmp" || st["flavour"] != "kata-runtime-rs" {
		t.Errorf("store-only pod: monitor %v, flavour %v; want hmp, kata-runtime-rs", st["monitor"], st["flavour"])
	}
	a, _ := netip.AddrFromSlice(testvm.GuestIP(mac).To4())
	guestHas(t, probe, a)
	pingable(t, host, testvm.GuestIP(mac))
	if st := n.sandbox(secret); st == nil || !strings.Contains(fmt.Sprint(st["left_alone"]), "confidential") {
		t.Errorf("confidential pod in status: %v, want left alone as confidential", st)
	}
	if st := n.sandbox(bad); st != nil {
		t.Errorf("pod with malformed metadata in status: %v", st)
	}

	// The record goes (the pod was removed): tapsync lets go of the pod.
	if err := cli.SandboxStore().Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	vm.Stop()
	n.d.cmd.Process.Signal(syscall.SIGHUP)
	eventually(t, "store-only pod gone from status", func() string {
		if st := n.sandbox(id); st != nil {
			return fmt.Sprintf("still listed: %v", st)
		}
		return ""
	})
}

// wrapperBinary builds cmd/tapsync-qemu into a new directory with a conf
// naming the real QEMU and sockDir, as tapsync install-kata installs it.
func wrapperBinary(t *testing.T, sockDir string) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "tapsync-qemu")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/tapsync/tapsync/cmd/tapsync-qemu").CombinedOutput(); err != nil {
		t.Fatalf("go build tapsync-qemu: %v\n%s", err, out)
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin+".conf", fmt.Appendf(nil, "qemu = %s\ndir = %s\n", qemu, sockDir), 0o644); err != nil {
		t.Fatal(err)
	}
	return bin
}

// TestKata4WithoutDebugMode: Kata's runtimes start QEMU through
// tapsync-qemu (what tapsync install-kata's drop-in does), with no debug
// monitor at all; tapsync, with its default config, wires a runtime-rs
// pod and a Go pod through the wrapper's QMP socket. A wrapper that
// cannot make its socket still starts the VM, and status says why that
// pod has no monitor.
func TestKata4WithoutDebugMode(t *testing.T) {
	n := newKata4Node(t)
	wrapper := wrapperBinary(t, filepath.Join(n.dir, "qmp"))
	bad := filepath.Join(n.dir, "badqmp")
	if err := os.Mkdir(bad, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(bad, 0o777) // past the umask: a directory anyone can write
	badWrapper := wrapperBinary(t, bad)

	rs := n.runPod("rs", "kata-qemu-runtime-rs", vmShape{binary: wrapper})
	gp := n.runPod("go", "kata-qemu", vmShape{binary: wrapper})
	unwrapped := n.runPod("unwrapped", "kata-qemu", vmShape{binary: badWrapper})
	n.start()

	qemu, _ := exec.LookPath("qemu-system-x86_64")
	for _, p := range []*kataPod{rs, gp} {
		st := n.wired(p.id, "eth0")
		if sock := filepath.Join(n.dir, "qmp", p.id+".sock"); st["qmp"] != sock || st["monitor"] != "qmp" || st["monitor_note"] != nil {
			t.Errorf("pod %s: monitor %v %v (note %v), want qmp %s", p.id, st["monitor"], st["qmp"], st["monitor_note"], sock)
		}
		guestHas(t, p.probe, p.ip)
		pingable(t, n.cri.NodeNetns(), p.ip.AsSlice())
		// The runtime's pid is QEMU's: the wrapper exec'd it.
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", p.vm.Pid)); err != nil || exe != qemu {
			t.Errorf("pod %s: the process the shim started is %q (%v), want QEMU %s", p.id, exe, err, qemu)
		}
	}

	// The VM whose wrapper could not make its socket runs, unwired, and
	// says why in QEMU's stderr (Kata's log) and in status.
	if !unwrapped.vm.Alive() {
		t.Fatal("the VM whose wrapper had no usable socket dir did not start")
	}
	if log, _ := os.ReadFile(unwrapped.vm.Log); !bytes.Contains(log, []byte("tapsync-qemu: no tapsync monitor for this VM")) {
		t.Errorf("QEMU's stderr does not say why there is no tapsync monitor:\n%s", log)
	}
	eventually(t, "status of the unwrapped pod says why it has no monitor", func() string {
		st := n.sandbox(unwrapped.id)
		if st == nil {
			return "not in status"
		}
		note, _ := st["monitor_note"].(string)
		e, _ := st["last_error"].(string)
		if !strings.Contains(note, "neither tapsync-qemu's monitor") || !strings.Contains(e, filepath.Join(n.dir, "qmp", unwrapped.id+".sock")) {
			return fmt.Sprintf("monitor note %q, last error %q", note, e)
		}
		return ""
	})
	n.d.stop(syscall.SIGTERM)
}
