package testcri

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/tapsync/tapsync/e2e/testcni"
)

// Runtime handlers, named as kata-deploy names them, and the runtime
// types (containerd shim names) CRI gives their pods. All three really
// run runc, through the containerd-shim-runc-v2 the harness built.
const (
	HandlerRuntimeRs = "kata-qemu-runtime-rs"
	HandlerKataQemu  = "kata-qemu"
	HandlerRunc      = "runc"

	RuntimeTypeRuntimeRs = "io.containerd.kata-qemu-runtime-rs.v2"
	RuntimeTypeKataQemu  = "io.containerd.kata-qemu.v2"
	RuntimeTypeRunc      = "io.containerd.runc.v2"

	// Sandboxer is the sandbox controller of every handler: CRI's
	// in-process one, which runs a pause container per pod.
	Sandboxer = "podsandbox"
)

// Handlers maps each runtime handler to its runtime type.
var Handlers = map[string]string{
	HandlerRuntimeRs: RuntimeTypeRuntimeRs,
	HandlerKataQemu:  RuntimeTypeKataQemu,
	HandlerRunc:      RuntimeTypeRunc,
}

// Paths below the harness directory.
const (
	configFile  = "config.toml"
	crictlFile  = "crictl.yaml"
	cniConfDir  = "net.d"
	ipamDir     = "ipam"
	podsDir     = "pods" // pod configs and pod log directories
	rootDir     = "root"
	stateDir    = "state"
	runcRootDir = "runc"
	shimSockDir = "s" // shim sockets; containerd allows at most 42 bytes of path
	logFile     = "containerd.log"
)

// writeConfig writes containerd's config (version 4, the native one of
// containerd 2.4: version 3 is accepted but migrated with a warning at
// every start), the CNI conflist and crictl's config.
//
// Nothing in it points at the host's containerd paths: root, state, the
// gRPC and ttrpc sockets, shim sockets, the runc root of the runc handler,
// CNI config and IPAM leases are all below c.dir. The plugins that would
// create or serve host paths (/opt/containerd, NRI's /var/run/nri socket,
// CDI's /etc/cdi) are disabled, as are the snapshotters nobody uses.
func (c *CRI) writeConfig() error {
	for _, d := range []string{rootDir, stateDir, runcRootDir, shimSockDir, cniConfDir, ipamDir, podsDir} {
		if err := os.MkdirAll(c.path(d), 0o700); err != nil {
			return err
		}
	}
	if n := len(c.path(shimSockDir)); n > 42 {
		return fmt.Errorf("shim socket dir %s is %d bytes, containerd allows 42: set TMPDIR shorter", c.path(shimSockDir), n)
	}

	var runtimes strings.Builder
	for _, h := range []string{HandlerRunc, HandlerKataQemu, HandlerRuntimeRs} {
		fmt.Fprintf(&runtimes, `
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.%[1]s]
        runtime_type = %[2]q
        # The built shim: Debian's containerd 1.6 shim on PATH would be found otherwise.
        runtime_path = %[3]q
        sandboxer = %[4]q
`, quoteKey(h), Handlers[h], c.bins.shim, Sandboxer)
		if h == HandlerRunc {
			// CRI hands the shim runc options only for the runc type; for
			// the kata types it would wrap options in generic ones, which
			// the runc shim cannot read (it would panic). So the kata
			// handlers get none, and runc keeps their state in its
			// default root, /run/containerd/runc/k8s.io.
			fmt.Fprintf(&runtimes, `
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.%[1]s.options]
          Root = %[2]q
`, quoteKey(h), c.path(runcRootDir))
		}
	}

	cfg := fmt.Sprintf(`version = 4
root = %[1]q
state = %[2]q
imports = []
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.nri.v1.nri",
  "io.containerd.image-verifier.v1.bindir",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[plugins.'io.containerd.server.v1.grpc']
  address = %[3]q

[plugins.'io.containerd.server.v1.ttrpc']
  address = %[4]q

[plugins.'io.containerd.server.v1.debug']
  address = ""

[plugins.'io.containerd.server.v1.metrics']
  address = ""

[plugins.'io.containerd.shim.v1.manager']
  socket_dir = %[5]q

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[6]q
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = %[7]q

[plugins.'io.containerd.cri.v1.runtime']
  # As root, a sandbox's oom_score_adj (-998) below ours fails runc create.
  restrict_oom_score_adj = true
  disable_apparmor = true
  cdi_spec_dirs = []
  enable_criu = false
  # Pod netns under /var/run/netns, where CRI puts them on a node and
  # tapsync looks; true would put them in <state>/io.containerd.grpc.v1.cri/netns.
  netns_mounts_under_state_dir = false

  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = %[8]q
%[9]s
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%[10]q]
    conf_dir = %[11]q
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`, c.path(rootDir), c.path(stateDir), c.sock, c.sock+".ttrpc", c.path(shimSockDir),
		PauseImage, c.path("certs.d"), HandlerRunc, runtimes.String(), c.cniBinDir, c.path(cniConfDir))
	if err := os.WriteFile(c.path(configFile), []byte(cfg), 0o600); err != nil {
		return err
	}

	conflist, err := c.conflist()
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.path(cniConfDir), "10-"+c.netName+".conflist"), conflist, 0o600); err != nil {
		return err
	}

	crictl := fmt.Sprintf("runtime-endpoint: unix://%[1]s\nimage-endpoint: unix://%[1]s\ntimeout: 30\ndebug: false\npull-image-on-create: false\n", c.sock)
	return os.WriteFile(c.path(crictlFile), []byte(crictl), 0o600)
}

// conflist is the pod network: a bridge (c.bridge, holding the gateway)
// with host-local IPAM on c.subnet, leases below c.dir. ipMasq is off, so
// no plugin touches iptables.
func (c *CRI) conflist() ([]byte, error) {
	net := testcni.Bridge(c.netName, c.bridge, c.subnet)
	var conf map[string]any
	if err := json.Unmarshal(net.Conf, &conf); err != nil {
		return nil, fmt.Errorf("parse conflist %s: %w", net.Name, err)
	}
	plugins, _ := conf["plugins"].([]any)
	for _, pl := range plugins {
		pm, _ := pl.(map[string]any)
		if ipam, ok := pm["ipam"].(map[string]any); ok {
			ipam["dataDir"] = c.path(ipamDir)
		}
	}
	return json.MarshalIndent(conf, "", "  ")
}

// podConfig is the PodSandboxConfig crictl runp reads (CRI's JSON names).
// podConfig is the pod config of pod name; host puts it in the node's
// network and pid namespaces (NamespaceMode NODE).
func (c *CRI) podConfig(name, uid string, host bool) ([]byte, error) {
	cfg := map[string]any{
		"metadata": map[string]any{
			"name":      name,
			"uid":       uid,
			"namespace": PodNamespace,
			"attempt":   0,
		},
		"hostname":      name,
		"log_directory": c.path(podsDir, name+"-"+uid),
		"labels":        map[string]string{"tapsync.test/harness": filepath.Base(c.dir)},
		"linux": map[string]any{
			// Our cgroup parent (cgroupfs driver), removed at cleanup.
			"cgroup_parent": c.cgroupParent(),
		},
	}
	if host {
		// The node's UTS namespace too, whose hostname is not the pod's to set.
		delete(cfg, "hostname")
		cfg["linux"].(map[string]any)["security_context"] = map[string]any{"namespace_options": map[string]any{"network": 2, "pid": 2}}
	}
	return json.MarshalIndent(cfg, "", "  ")
}

// quoteKey quotes a TOML key that is not a bare key ("kata-qemu" is).
func quoteKey(k string) string {
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return fmt.Sprintf("%q", k)
		}
	}
	return k
}

// Subnet is the pod network's IPv4 range; pods get addresses from it and
// the bridge holds its first host address.
func (c *CRI) Subnet() netip.Prefix { return c.subnet }
