//go:build e2e

package e2e

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testcri"
	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// builtImage is the image `make image` builds from this tree, with the
// DaemonSet written again to name its tag.
type builtImage struct {
	tar       string
	daemonSet *appsv1.DaemonSet
}

func buildImage(t *testing.T) builtImage {
	t.Helper()
	out := t.TempDir()
	cmd := exec.Command("go", "run", "./deploy/image", "-out", out, "-daemonset", "deploy/daemonset.yaml")
	cmd.Dir = ".."
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the image: %v\n%s", err, b)
	}
	b, err := os.ReadFile(filepath.Join(out, "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatalf("the DaemonSet make image wrote: %v", err)
	}
	return builtImage{tar: filepath.Join(out, "tapsync-image.tar"), daemonSet: &ds}
}

// kubelet turns the DaemonSet's pod template into CRI configs as kubelet
// would, with the node's paths moved into the test's dirs (hostPaths) and
// the config map given as a directory.
type kubelet struct {
	t         *testing.T
	cri       *testcri.CRI
	hostPaths map[string]string // the manifest's host path → the test's
	// inside moves a container path (the state dir must be one path on
	// the node and in the container: tapsync-qemu on the node binds the
	// sockets tapsync dials in the container).
	inside    map[string]string
	configDir string
	pod       testcri.Pod
	spec      corev1.PodSpec
}

func (k *kubelet) mounts(c corev1.Container) []map[string]any {
	k.t.Helper()
	vols := map[string]corev1.Volume{}
	for _, v := range k.spec.Volumes {
		vols[v.Name] = v
	}
	var out []map[string]any
	for _, m := range c.VolumeMounts {
		v := vols[m.Name]
		var host string
		switch {
		case v.HostPath != nil:
			var ok bool
			if host, ok = k.hostPaths[v.HostPath.Path]; !ok {
				k.t.Fatalf("the manifest mounts host path %s, which the test does not map", v.HostPath.Path)
			}
			if t := v.HostPath.Type; t != nil && (*t == corev1.HostPathDirectoryOrCreate) {
				os.MkdirAll(host, 0o755)
			}
		case v.ConfigMap != nil:
			host = k.configDir
		default:
			k.t.Fatalf("volume %s: a kind the test does not map", v.Name)
		}
		path := m.MountPath
		if p, ok := k.inside[path]; ok {
			path = p
		}
		prop := 0 // PROPAGATION_PRIVATE
		if m.MountPropagation != nil {
			switch *m.MountPropagation {
			case corev1.MountPropagationHostToContainer:
				prop = 1
			case corev1.MountPropagationBidirectional:
				prop = 2
			}
		}
		out = append(out, map[string]any{"container_path": path, "host_path": host, "readonly": m.ReadOnly, "propagation": prop})
	}
	return out
}

// run creates and starts container c of the pod (attempt n), as kubelet
// does, and returns its id.
func (k *kubelet) run(c corev1.Container, attempt int) string {
	k.t.Helper()
	sc := map[string]any{
		// hostNetwork, hostPID
		"namespace_options": map[string]any{"network": 2, "pid": 2},
	}
	if s := c.SecurityContext; s != nil {
		if s.Privileged != nil {
			sc["privileged"] = *s.Privileged
		}
		if s.RunAsUser != nil {
			sc["run_as_user"] = map[string]any{"value": *s.RunAsUser}
		}
		if caps := s.Capabilities; caps != nil {
			var add, drop []string
			for _, c := range caps.Add {
				add = append(add, string(c))
			}
			for _, c := range caps.Drop {
				drop = append(drop, string(c))
			}
			sc["capabilities"] = map[string]any{"add_capabilities": add, "drop_capabilities": drop}
		}
	}
	var env []map[string]string
	for _, e := range c.Env {
		env = append(env, map[string]string{"key": e.Name, "value": e.Value})
	}
	cfg := map[string]any{
		"metadata": map[string]any{"name": c.Name, "attempt": attempt},
		"image":    map[string]any{"image": c.Image},
		"command":  c.Command, "args": c.Args, "envs": env,
		"mounts":   k.mounts(c),
		"log_path": fmt.Sprintf("%s-%d.log", c.Name, attempt),
		"linux":    map[string]any{"security_context": sc},
	}
	id, err := k.cri.RunContainer(k.pod, cfg)
	if id != "" {
		k.t.Cleanup(func() {
			if k.t.Failed() {
				out, err := k.cri.Crictl("logs", id)
				if lp := logPathOf(k.cri, id); lp != "" {
					b, _ := os.ReadFile(lp)
					out += string(b)
				}
				insp, _ := k.cri.Crictl("inspect", id)
				var pi struct {
					Info struct {
						Pid int `json:"pid"`
					} `json:"info"`
				}
				json.Unmarshal([]byte(insp), &pi)
				if pid := pi.Info.Pid; pid > 0 {
					ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
					fd2, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/2", pid))
					tcp, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
					st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
					k.t.Logf("pid %d netns %s stderr %s\ntcp:\n%s\nstatus:\n%.600s", pid, ns, fd2, tcp, st)
				}
				if len(insp) > 400 {
					insp = insp[:400]
				}
				k.t.Logf("container %s (attempt %d) log (%v):\n%s\n%s", c.Name, attempt, err, out, insp)
			}
		})
	}
	if err != nil {
		k.t.Fatalf("container %s: %v", c.Name, err)
	}
	return id
}

// state is a container's state and exit code (crictl inspect).
func (k *kubelet) state(id string) (string, int) {
	k.t.Helper()
	out, err := k.cri.Crictl("inspect", "-o", "json", id)
	if err != nil {
		k.t.Fatal(err)
	}
	var insp struct {
		Status struct {
			State    string `json:"state"`
			ExitCode int    `json:"exitCode"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &insp); err != nil {
		k.t.Fatal(err)
	}
	return insp.Status.State, insp.Status.ExitCode
}

// logPathOf is where CRI writes container id's output.
func logPathOf(cri *testcri.CRI, id string) string {
	out, err := cri.Crictl("inspect", "-o", "json", id)
	if err != nil {
		return ""
	}
	var insp struct {
		Status struct {
			LogPath string `json:"logPath"`
		} `json:"status"`
	}
	json.Unmarshal([]byte(out), &insp)
	return insp.Status.LogPath
}

// probe GETs path on the node's 127.0.0.1:port, from the node's network
// namespace (the pod's, with hostNetwork), as kubelet's probe does.
func probe(t *testing.T, node string, port int, path string) (int, string) {
	t.Helper()
	code, body := 0, ""
	err := inNetns(node, func() error {
		// Dialled here, on the thread inNetns moved into the node's
		// netns: an http.Transport would dial on another goroutine.
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 3*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		req, _ := http.NewRequest("GET", "http://127.0.0.1"+path, nil)
		if err := req.Write(conn); err != nil {
			return err
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		code, body = resp.StatusCode, string(b)
		return nil
	})
	if err != nil {
		return 0, err.Error()
	}
	return code, body
}

// sharedMount bind-mounts dir onto itself as a shared mount, until the
// test ends.
func sharedMount(t *testing.T, dir string) {
	t.Helper()
	// Equivalent to: mount --bind DIR DIR && mount --make-shared DIR
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatalf("make %s shared: %v", dir, err)
	}
}

// TestDaemonSetAsKubeletRunsIt: the image make image builds, imported into
// containerd, run the way kubelet runs the DaemonSet's pod (host network
// and pid, the init container, then tapsync with the manifest's
// capabilities, mounts and propagation): the init container installs
// tapsync-qemu and the Kata drop-in; a Kata pod started after tapsync (its
// netns bound after the mounts were made) is wired through the wrapper's
// monitor; the container stopped (SIGTERM) exits cleanly within its grace
// period leaving the pod wired, and a new one changes nothing.
func TestDaemonSetAsKubeletRunsIt(t *testing.T) {
	n := newKata4Node(t)
	img := buildImage(t)
	if _, err := n.cri.ImportImage(img.tar); err != nil {
		t.Fatal(err)
	}
	spec := img.daemonSet.Spec.Template.Spec

	// The node's paths, moved into the test's dirs. The state dir is one
	// path on the node and in the container.
	b := make([]byte, 4)
	rand.Read(b)
	state := "/run/tapsync-e2e-" + hex.EncodeToString(b)
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	qemu, _ := exec.LookPath("qemu-system-x86_64")
	kataConfig := filepath.Join(n.dir, "kata-config")
	if err := os.MkdirAll(filepath.Join(kataConfig, "runtimes/qemu"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(kataConfig, "runtimes/qemu/configuration-qemu.toml"), fmt.Appendf(nil, "[hypervisor.qemu]\npath = %q\n", qemu), 0o644)
	const port = 19464
	k := &kubelet{t: t, cri: n.cri, spec: spec, configDir: filepath.Join(n.dir, "etc"),
		hostPaths: map[string]string{
			"/var/run/netns": "/var/run/netns", "/dev/net/tun": "/dev/net/tun",
			"/run/vc": filepath.Join(n.dir, "vc"), "/run/kata": filepath.Join(n.dir, "kata"),
			"/run/containerd": n.cri.Dir(), "/run/tapsync": state,
			"/opt/kata/share/defaults/kata-containers": kataConfig, "/opt/tapsync/bin": filepath.Join(n.dir, "bin"),
		},
		inside: map[string]string{"/run/tapsync": state},
	}
	os.MkdirAll(k.configDir, 0o755)
	// A node's / is a shared mount (systemd makes it so), which
	// HostToContainer propagation needs; this machine's is private: the
	// dirs standing for the node's are made shared mounts of themselves.
	for _, d := range []string{n.dir, n.cri.Dir(), state} {
		sharedMount(t, d)
	}
	rel, _ := filepath.Rel(n.cri.Dir(), n.cri.StateDir())
	config := fmt.Sprintf(`state_dir = %q
metrics_address = "127.0.0.1:%d"
[containerd]
address = "/run/containerd/containerd.sock"
bundle_dirs = ["/run/containerd/%s/io.containerd.runtime.v2.task/{namespace}/{id}"]
wrapper_socket = "%s/qmp/{id}.sock"
`, state, port, rel, state)
	if err := os.WriteFile(filepath.Join(k.configDir, "config.toml"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}

	k.pod = n.cri.RunHostPod("tapsync")
	// The init container installs the wrapper and the drop-in, once.
	init := k.run(spec.InitContainers[0], 0)
	eventually(t, "install-kata exited", func() string {
		if st, code := k.state(init); st != "CONTAINER_EXITED" || code != 0 {
			return fmt.Sprintf("state %s, exit code %d", st, code)
		}
		return ""
	})
	wrapper := filepath.Join(n.dir, "bin", "tapsync-qemu")
	drop, err := os.ReadFile(filepath.Join(kataConfig, "runtimes/qemu/config.d/60-tapsync.toml"))
	if err != nil || !strings.Contains(string(drop), `path = "/opt/tapsync/bin/tapsync-qemu"`) {
		t.Fatalf("the drop-in install-kata wrote: %v\n%s", err, drop)
	}
	if _, err := os.Stat(wrapper); err != nil {
		t.Fatalf("the wrapper install-kata installed: %v", err)
	}

	main := k.run(spec.Containers[0], 0)
	eventually(t, "tapsync ready (/readyz)", func() string {
		if code, body := probe(t, n.cri.NodeNetns().Path, port, "/readyz"); code != http.StatusOK {
			return fmt.Sprintf("%d %s", code, body)
		}
		return ""
	})
	if code, body := probe(t, n.cri.NodeNetns().Path, port, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d %s", code, body)
	}

	// A Kata pod made after tapsync started, its VM started as Kata would
	// after install-kata: through the wrapper the drop-in names (the
	// node's /opt/tapsync/bin is the test's bin dir).
	p := n.runPod("late", "kata-qemu", vmShape{binary: wrapper, inVC: true})
	n.stateDir = state
	st := n.wired(p.id, "eth0")
	if st["qmp"] != filepath.Join(state, "qmp", p.id+".sock") {
		t.Errorf("monitor %v, want the wrapper's", st["qmp"])
	}
	guestHas(t, p.probe, p.ip)
	pingable(t, n.cri.NodeNetns(), p.ip.AsSlice())

	// kubelet stops the container (SIGTERM, grace period): it exits 0 in
	// time, and the pod stays wired.
	grace := int64(30)
	if g := spec.TerminationGracePeriodSeconds; g != nil {
		grace = *g
	}
	// A daemon still running at the end of the grace period is SIGKILLed:
	// exit code 137, not 0.
	if _, err := n.cri.Crictl("stop", "--timeout", fmt.Sprint(grace), main); err != nil {
		t.Fatal(err)
	}
	if st, code := k.state(main); st != "CONTAINER_EXITED" || code != 0 {
		t.Errorf("after SIGTERM: state %s, exit code %d; want a clean exit within the %ds grace period", st, code, grace)
	}
	pingable(t, n.cri.NodeNetns(), p.ip.AsSlice())
	// kubelet starts it again (a new attempt): nothing to do.
	since := time.Now()
	again := k.run(spec.Containers[0], 1)
	t.Cleanup(func() { n.cri.Crictl("stop", "--timeout", "10", again) })
	eventually(t, "tapsync ready again (/readyz)", func() string {
		if code, body := probe(t, n.cri.NodeNetns().Path, port, "/readyz"); code != http.StatusOK {
			return fmt.Sprintf("%d %s", code, body)
		}
		return ""
	})
	st = waitReconciled(t, state, since)
	if st["last_mutations"].(float64) != 0 || st["last_error"] != nil {
		t.Errorf("first pass after the restart: %v, want no mutation", st)
	}
}
