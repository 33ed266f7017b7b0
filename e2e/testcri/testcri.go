// Package testcri runs a private containerd 2 with CRI for privileged
// tests and drives it with crictl, as kubelet drives a node: pods are
// made with `crictl runp --runtime <handler>` under the runtime handlers
// kata-deploy installs (kata-qemu-runtime-rs, kata-qemu), which here run
// runc, so tapsync's watchers see the records, events and network
// namespaces of a Kata node without Kata. It is test support only:
// nothing in the daemon imports it.
//
// containerd v2.4.2 and crictl v1.37.0 are built from their Go modules
// on first use and cached in /var/cache/tapsync-e2e/testcri (or
// $TAPSYNC_E2E_CACHE/testcri); the sandbox image is a local pause program
// (e2e/testcri/pause) imported from a cached tarball. runc and the CNI
// plugins come from Debian (runc, containernetworking-plugins).
//
// Everything lives in one temporary directory (config, sockets, root,
// state, shim sockets, runc state, CNI config and leases, logs), one
// cgroup parent and one "node" network namespace in which containerd,
// and so the CNI plugins, run: the pod network's bridge and the host ends
// of pod veths live there, never in the host's root namespace. All of it
// is removed when the test ends, pass or fail. Pod network namespaces are
// where CRI puts them on a node, /var/run/netns/cni-<uuid>; the cleanup
// stops every pod (CNI DEL, netns removal) and removes what a crash left.
// Two things cannot be moved: runc state of pods under the kata handlers
// (/run/containerd/runc/k8s.io/<id>) and libcni's result cache
// (/var/lib/cni/results/<network>-<id>-<ifname>); the cleanup removes
// ours, the directories stay.
package testcri

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testctr"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testproc"
)

const (
	// Namespace is the containerd namespace CRI works in.
	Namespace = "k8s.io"
	// PodNamespace is the Kubernetes namespace of the pods RunPod makes.
	PodNamespace = "testcri"

	startTimeout = 60 * time.Second
	callTimeout  = 30 * time.Second

	// kataRuncRoot is where the runc shim keeps runc state when CRI hands
	// it no runc options (the kata handlers): runc's default root plus
	// the namespace.
	kataRuncRoot = "/run/containerd/runc/" + Namespace
	// cniResultCache is libcni's default cache, which CRI does not move.
	cniResultCache = "/var/lib/cni/results"
)

// CRI is a private containerd with CRI, and crictl to drive it.
type CRI struct {
	t         testing.TB
	dir       string // everything below here
	sock      string
	node      testnet.NS // containerd's network namespace
	bins      binaries
	cniBinDir string
	netName   string       // CNI network name, unique per harness
	bridge    string       // the network's bridge, in node
	subnet    netip.Prefix // the network's range
	ctr       *testctr.Daemon

	mu   sync.Mutex
	pods map[string]Pod // made here, by id; for leftover cleanup
}

// Pod is a pod sandbox as RunPod made it.
type Pod struct {
	ID        string     // sandbox id (also the pause container's id)
	Name      string     // metadata name
	UID       string     // metadata uid
	Handler   string     // runtime handler
	NetnsPath string     // /var/run/netns/cni-<uuid>
	IP        netip.Addr // eth0's address (CRI pod status, from the CNI result)
	BundleDir string     // <state>/io.containerd.runtime.v2.task/k8s.io/<id>
	PID       int        // the pause task's pid
	// ConfigPath is the pod config runp was given (crictl create wants it).
	ConfigPath string
}

// Start starts a private containerd with CRI, building containerd,
// crictl and the pause image first if the cache lacks them (minutes,
// once per machine). It stops every pod, containerd and the shims in
// t.Cleanup, pass or fail, and removes everything it made. It skips t
// unless root.
func Start(t testing.TB) *CRI {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testcri: skipped, needs root to run containerd, runc and CNI; run as root, e.g. sudo go test")
	}
	for _, bin := range []string{"runc", "nsenter"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("testcri: %s not found: install Debian's runc and util-linux (make deps): %v", bin, err)
		}
	}
	cniBinDir, err := findCNIBinDir()
	if err != nil {
		t.Fatalf("testcri: %v", err)
	}
	bins, err := prepare(t.Context(), t.Logf)
	if err != nil {
		t.Fatalf("testcri: %v", err)
	}
	// Registered before our cleanup, so removed after containerd stopped.
	node := testnet.NewNS(t, "testcri")
	// A short directory: sockets inside must fit in sun_path (108 bytes)
	// and the shim socket dir in 42, which t.TempDir() would not.
	tmp := os.TempDir()
	if len(tmp) > 20 {
		tmp = "/tmp"
	}
	dir, err := os.MkdirTemp(tmp, "testcri-")
	if err != nil {
		t.Fatalf("testcri: %v", err)
	}
	bridge := testcni.UniqueName("tcri")
	sock := filepath.Join(dir, "containerd.sock")
	c := &CRI{
		t:         t,
		dir:       dir,
		sock:      sock,
		node:      node,
		bins:      bins,
		cniBinDir: cniBinDir,
		netName:   "testcri-" + bridge,
		bridge:    bridge,
		subnet:    testcni.Subnet4(),
		ctr:       testctr.NewDaemon(t, "testcri", sock, filepath.Join(dir, logFile)),
		pods:      map[string]Pod{},
	}
	t.Cleanup(c.cleanup)
	if err := c.writeConfig(); err != nil {
		t.Fatalf("testcri: %v", err)
	}
	if err := c.start(); err != nil {
		t.Fatalf("testcri: %v", err)
	}
	if err := c.importPause(); err != nil {
		t.Fatalf("testcri: %v", err)
	}
	if err := c.waitReady(); err != nil {
		t.Fatalf("testcri: %v", err)
	}
	return c
}

// Address is the containerd socket, which also serves CRI.
func (c *CRI) Address() string { return c.sock }

// Namespace is the containerd namespace CRI's pods live in, "k8s.io".
func (c *CRI) Namespace() string { return Namespace }

// StateDir is containerd's state directory: a pod's task bundle is
// <StateDir>/io.containerd.runtime.v2.task/k8s.io/<id>.
func (c *CRI) StateDir() string { return c.path(stateDir) }

// Dir is the directory holding everything of this harness.
func (c *CRI) Dir() string { return c.dir }

// NodeNetns is the network namespace containerd and the CNI plugins run
// in; the pod bridge and the host ends of pod veths are there.
func (c *CRI) NodeNetns() testnet.NS { return c.node }

// Client is a containerd client of this containerd, in no namespace (use
// namespaces.WithNamespace(ctx, Namespace)). The harness owns it: do not
// close it.
func (c *CRI) Client() *client.Client { return c.ctr.Client() }

// Crictl runs crictl against this containerd and returns its stdout; the
// error carries stderr. It runs in the node netns, where CRI's streaming
// server (exec, attach, port-forward) listens.
func (c *CRI) Crictl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*callTimeout)
	defer cancel()
	full := append([]string{"--net=" + c.node.Path, "--", c.bins.crictl,
		"--config", c.path(crictlFile), "--runtime-endpoint", "unix://" + c.sock, "--image-endpoint", "unix://" + c.sock}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("crictl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// RunPod makes a pod named name under runtime handler (HandlerRuntimeRs,
// HandlerKataQemu, HandlerRunc), as kubelet does: crictl runp --runtime
// handler with a pod config of that name, a fresh uid and namespace
// PodNamespace. It fails the test if the pod does not come up; call it
// from the test's goroutine.
func (c *CRI) RunPod(name, handler string) Pod {
	c.t.Helper()
	return c.runPod(name, handler, false)
}

func (c *CRI) runPod(name, handler string, host bool) Pod {
	c.t.Helper()
	uid := randomHex(8)
	cfg, err := c.podConfig(name, uid, host)
	if err != nil {
		c.t.Fatalf("testcri: pod %s: %v", name, err)
	}
	cfgPath := c.path(podsDir, name+"-"+uid+".json")
	if err := os.WriteFile(cfgPath, cfg, 0o600); err != nil {
		c.t.Fatalf("testcri: %v", err)
	}
	out, err := c.Crictl("runp", "--runtime", handler, cfgPath)
	if err != nil {
		c.t.Fatalf("testcri: run pod %s (%s): %v", name, handler, err)
	}
	id := strings.TrimSpace(out)
	p := Pod{ID: id, Name: name, UID: uid, Handler: handler, ConfigPath: cfgPath}
	c.remember(p)
	if p, err = c.inspectPod(p); err != nil {
		c.t.Fatalf("testcri: pod %s (%s): %v", name, id, err)
	}
	c.remember(p)
	return p
}

// RunHostPod makes a pod named name in the node's network and pid
// namespaces (hostNetwork, hostPID), under the runc handler, as kubelet
// does for a DaemonSet's pod.
func (c *CRI) RunHostPod(name string) Pod {
	c.t.Helper()
	return c.runPod(name, HandlerRunc, true)
}

// RunContainer creates and starts a container in pod p from cfg (CRI's
// ContainerConfig as crictl reads it: metadata, image, command, args,
// mounts, linux.security_context, …), as kubelet does, and returns its
// id.
//
// Equivalent to: crictl create POD container.json pod.json && crictl start ID
func (c *CRI) RunContainer(p Pod, cfg map[string]any) (string, error) {
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", err
	}
	path := c.path(podsDir, fmt.Sprintf("%s-%s-ctr-%s.json", p.Name, p.UID, randomHex(4)))
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", err
	}
	out, err := c.Crictl("create", p.ID, path, p.ConfigPath)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(out)
	if _, err := c.Crictl("start", id); err != nil {
		return id, err
	}
	return id, nil
}

// StopPod stops pod id (crictl stopp): its pause task is killed, CNI DEL
// runs and its netns is removed; its record stays until RemovePod. A pod
// that is gone counts as stopped.
func (c *CRI) StopPod(id string) error {
	if _, err := c.Crictl("stopp", id); err != nil && !isNotFound(err) {
		return err
	}
	return nil
}

// RemovePod removes pod id (crictl rmp), stopping it first if needed. A
// pod that is gone counts as removed.
func (c *CRI) RemovePod(id string) error {
	if _, err := c.Crictl("rmp", "--force", id); err != nil && !isNotFound(err) {
		return err
	}
	c.mu.Lock()
	delete(c.pods, id)
	c.mu.Unlock()
	return nil
}

func isNotFound(err error) bool {
	return strings.Contains(err.Error(), "NotFound") || strings.Contains(err.Error(), "not found")
}

func (c *CRI) remember(p Pod) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pods[p.ID] = p
}

// inspectPod fills in what crictl inspectp says of p.
func (c *CRI) inspectPod(p Pod) (Pod, error) {
	out, err := c.Crictl("inspectp", "-o", "json", p.ID)
	if err != nil {
		return p, err
	}
	var insp struct {
		Status struct {
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
		Info struct {
			PID         int `json:"pid"`
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct {
						Type string `json:"type"`
						Path string `json:"path"`
					} `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(out), &insp); err != nil {
		return p, fmt.Errorf("parse crictl inspectp: %w", err)
	}
	for _, ns := range insp.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			p.NetnsPath = ns.Path
		}
	}
	if insp.Status.Network.IP != "" {
		if p.IP, err = netip.ParseAddr(insp.Status.Network.IP); err != nil {
			return p, fmt.Errorf("pod ip %q: %w", insp.Status.Network.IP, err)
		}
	}
	p.PID = insp.Info.PID
	p.BundleDir = filepath.Join(c.StateDir(), "io.containerd.runtime.v2.task", Namespace, p.ID)
	return p, nil
}

// start runs containerd in the node netns and waits until it answers.
func (c *CRI) start() error {
	began := time.Now()
	// nsenter enters the node's network namespace only (not its mount
	// namespace, as `ip netns exec` would: CRI's netns bind mounts must
	// be visible to the host) and execs containerd in the same process.
	// Equivalent to: nsenter --net=/var/run/netns/<node> containerd --config <dir>/config.toml
	cmd := exec.Command("nsenter", "--net="+c.node.Path, "--", c.bins.containerd, "--config", c.path(configFile))
	// The CNI plugins containerd runs find iptables and friends on PATH.
	cmd.Env = append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	if err := c.ctr.Start(cmd, startTimeout, 20*time.Millisecond); err != nil {
		return err
	}
	c.t.Logf("testcri: containerd %s ready in %v (pid %d, netns %s)", c.sock, time.Since(began).Round(time.Millisecond), c.ctr.Pid(), c.node.Name)
	return nil
}

// importPause imports the pause image into the k8s.io namespace.
func (c *CRI) importPause() error {
	names, err := c.ImportImage(c.bins.pauseTar)
	if err != nil {
		return err
	}
	if !slices.Contains(names, PauseImage) {
		return fmt.Errorf("import %s gave images %v, not %s", c.bins.pauseTar, names, PauseImage)
	}
	return nil
}

// ImportImage imports an image tarball (docker-archive or OCI) into the
// k8s.io namespace and unpacks it for the overlayfs snapshotter, as a
// pull would, and returns the names it gave.
//
// Equivalent to: ctr -n k8s.io images import IMAGE.tar
func (c *CRI) ImportImage(tar string) ([]string, error) {
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), Namespace), callTimeout)
	defer cancel()
	f, err := os.Open(tar)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cli := c.Client()
	imgs, err := cli.Import(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", tar, err)
	}
	var names []string
	for _, img := range imgs {
		names = append(names, img.Name)
		if err := client.NewImage(cli, img).Unpack(ctx, "overlayfs"); err != nil {
			return nil, fmt.Errorf("unpack %s: %w", img.Name, err)
		}
	}
	return names, nil
}

// waitReady polls `crictl info` until CRI reports its runtime and its
// network (the CNI config) ready and sees the pause image.
func (c *CRI) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	last := "no answer"
	for time.Now().Before(deadline) {
		out, err := c.Crictl("info")
		if err != nil {
			last = err.Error()
		} else if why := notReady(out); why != "" {
			last = why
		} else if _, err := c.Crictl("inspecti", PauseImage); err != nil {
			last = err.Error()
		} else {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("CRI not ready after %v: %s; log:\n%s", startTimeout, last, c.ctr.LogTail(30))
}

// notReady says why `crictl info` output is not ready, or "".
func notReady(info string) string {
	var st struct {
		Status struct {
			Conditions []struct {
				Type    string `json:"type"`
				Status  bool   `json:"status"`
				Reason  string `json:"reason"`
				Message string `json:"message"`
			} `json:"conditions"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(info), &st); err != nil {
		return fmt.Sprintf("parse crictl info: %v", err)
	}
	ready := map[string]bool{}
	var why []string
	for _, cond := range st.Status.Conditions {
		ready[cond.Type] = cond.Status
		if !cond.Status {
			why = append(why, fmt.Sprintf("%s: %s %s", cond.Type, cond.Reason, cond.Message))
		}
	}
	if !ready["RuntimeReady"] || !ready["NetworkReady"] {
		return fmt.Sprintf("not ready: %s", strings.Join(why, "; "))
	}
	return ""
}

// cleanup removes everything, in the order that leaves nothing behind:
// pods through CRI (CNI DEL, netns removal), containerd, then whatever
// survived (runc containers, shims, pod netns, mounts, cgroups, CNI
// cache entries), then the directory. The node netns goes after, in its
// own cleanup.
func (c *CRI) cleanup() {
	if c.ctr.Running() {
		if err := c.removeAllPods(); err != nil {
			c.cleanupLogf("%v", err)
		}
	}
	c.ctr.Close()
	c.mu.Lock()
	pods := make([]Pod, 0, len(c.pods))
	for _, p := range c.pods {
		pods = append(pods, p)
	}
	c.mu.Unlock()
	c.killLeftovers(pods)
	c.removeLeftoverNetns(pods)
	testproc.UnmountBelow(c.dir, c.cleanupLogf)
	testproc.RemoveCgroup(c.cgroupParent(), c.cleanupLogf)
	c.removeCNICache(pods)
	if err := os.RemoveAll(c.dir); err != nil {
		c.cleanupLogf("%v", err)
	}
}

// cleanupLogf logs what the cleanup found or failed to remove.
func (c *CRI) cleanupLogf(format string, args ...any) {
	c.t.Helper()
	c.t.Logf("testcri: cleanup: "+format, args...)
}

// removeAllPods stops and removes every pod this containerd has,
// noting each pod's netns first for removeLeftoverNetns.
func (c *CRI) removeAllPods() error {
	out, err := c.Crictl("pods", "-q")
	if err != nil {
		return fmt.Errorf("list pods: %w", err)
	}
	var errs []error
	for _, id := range strings.Fields(out) {
		c.mu.Lock()
		p, ok := c.pods[id]
		c.mu.Unlock()
		if !ok {
			p = Pod{ID: id}
		}
		if p, err := c.inspectPod(p); err == nil {
			c.remember(p)
		}
		errs = append(errs, c.StopPod(id))
		if _, err := c.Crictl("rmp", "--force", id); err != nil && !isNotFound(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killLeftovers kills what outlived containerd: runc containers in our
// runc root, our pods' containers in the kata handlers' runc root (by
// id: that root is shared), and shims whose command line names our
// socket, hence started by our containerd.
func (c *CRI) killLeftovers(pods []Pod) {
	roots, _ := filepath.Glob(filepath.Join(c.path(runcRootDir), "*"))
	for _, root := range roots {
		testproc.RuncDeleteAll(root, c.cleanupLogf)
	}
	for _, p := range pods {
		if _, err := os.Stat(filepath.Join(kataRuncRoot, p.ID)); err == nil {
			testproc.RuncDelete(kataRuncRoot, p.ID, c.cleanupLogf)
		}
	}
	testproc.KillNaming(c.sock, c.cleanupLogf)
}

// removeLeftoverNetns unmounts and removes the netns of our pods that CRI
// did not remove (containerd died first).
func (c *CRI) removeLeftoverNetns(pods []Pod) {
	for _, p := range pods {
		if p.NetnsPath == "" {
			continue
		}
		if _, err := os.Lstat(p.NetnsPath); err != nil {
			continue
		}
		c.cleanupLogf("removing leftover netns %s of pod %s", p.NetnsPath, p.ID)
		// Equivalent to: umount -l P; rm P
		testproc.Unmount(p.NetnsPath, c.cleanupLogf)
		if err := os.Remove(p.NetnsPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			c.cleanupLogf("%v", err)
		}
	}
}

// removeCNICache removes libcni's cached results of our pods, which only
// a CNI DEL removes: <network>-<pod id>-<ifname>, for our network and for
// CRI's built-in loopback network (cni-loopback).
func (c *CRI) removeCNICache(pods []Pod) {
	cached, _ := filepath.Glob(filepath.Join(cniResultCache, c.netName+"-*"))
	for _, p := range pods {
		more, _ := filepath.Glob(filepath.Join(cniResultCache, "*-"+p.ID+"-*"))
		cached = append(cached, more...)
	}
	slices.Sort(cached)
	for _, f := range slices.Compact(cached) {
		c.cleanupLogf("removing leftover CNI cache entry %s", f)
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			c.cleanupLogf("%v", err)
		}
	}
}

// cgroupParent is the cgroup (below each hierarchy's root) that holds
// this harness's pods.
func (c *CRI) cgroupParent() string {
	return "/" + filepath.Base(c.dir)
}

func (c *CRI) path(elem ...string) string {
	return filepath.Join(append([]string{c.dir}, elem...)...)
}

// cniBinDirs are searched for the CNI plugins: Debian's
// containernetworking-plugins, then upstream's usual place.
var cniBinDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}

func findCNIBinDir() (string, error) {
	for _, d := range cniBinDirs {
		if fi, err := os.Stat(filepath.Join(d, "bridge")); err == nil && fi.Mode().IsRegular() {
			return d, nil
		}
	}
	return "", fmt.Errorf("no CNI bridge plugin in %s: install Debian's containernetworking-plugins (make deps)", strings.Join(cniBinDirs, ", "))
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
