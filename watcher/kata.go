package watcher

import (
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Runtime names as kata-deploy registers them (io.containerd.kata-<shim>.v2,
// one per shim) and as older installs name the Go shim.
var (
	// DefaultRuntimes match every Kata handler.
	DefaultRuntimes = []string{"io.containerd.kata.v2", "io.containerd.kata-*.v2"}
	// DefaultSkipRuntimes are Kata's confidential handlers (coco, snp,
	// tdx, se): the agent policy Kata generates for them denies
	// UpdateInterface and UpdateRoutes, so a NIC plugged into such a VM
	// may never be configured.
	DefaultSkipRuntimes = []string{"*coco*", "*snp*", "*tdx*", "*-se.v2", "*-se-*"}
)

// MatchRuntime reports whether runtime name matches one of patterns, in
// path.Match syntax (* is any run of characters). Malformed patterns
// match nothing (ValidRuntimePatterns refuses them at load).
func MatchRuntime(patterns []string, name string) bool {
	for _, p := range patterns {
		if ok, err := path.Match(p, name); ok && err == nil {
			return true
		}
	}
	return false
}

// ValidRuntimePatterns returns an error naming the first malformed pattern.
func ValidRuntimePatterns(patterns []string) error {
	for _, p := range patterns {
		if _, err := path.Match(p, ""); err != nil || p == "" {
			return fmt.Errorf("runtime pattern %q is malformed", p)
		}
	}
	return nil
}

// Flavours of Kata runtime: where a sandbox's monitor and agent address are.
const (
	// FlavourGo is Kata's Go runtime (containerd-shim-kata-v2): a QMP
	// extra monitor and the shim's /run/vc/sbs/<id>/shim-monitor.sock.
	FlavourGo = "kata-go"
	// FlavourRs is runtime-rs (the default shim since Kata 4.0): an HMP
	// debug monitor in QEMU's working directory (the bundle dir) and
	// /run/kata/<id>/shim-monitor.sock.
	FlavourRs = "kata-runtime-rs"
)

// Monitor protocols.
const (
	ProtoQMP = "qmp"
	ProtoHMP = "hmp"
)

// KataLayout says where each Kata runtime keeps a sandbox's monitor and
// agent address. Templates take {id} (the sandbox id) and, for bundle
// dirs, {namespace}. Zero fields take the defaults.
type KataLayout struct {
	// Wrapper is the QMP socket tapsync's QEMU wrapper (tapsync-qemu, at
	// Kata's [hypervisor.qemu] path) adds to every VM: preferred, for
	// either runtime, whenever it exists. It needs no debug mode.
	Wrapper string
	// GoMonitor is the Go runtime's QMP extra monitor (served with
	// enable_debug and extra_monitor_socket = "qmp").
	GoMonitor string
	// GoAgentURL is the Go runtime's agent address ("": guest side off).
	GoAgentURL string
	// RsDir is runtime-rs's per-sandbox directory: a sandbox whose RsDir
	// exists is runtime-rs's.
	RsDir string
	// RsMonitor is runtime-rs's HMP debug monitor, relative to the bundle
	// dir (QEMU's cwd; served with enable_debug and
	// extra_monitor_socket = "hmp").
	RsMonitor string
	// RsAgentURL is runtime-rs's agent address ("": guest side off).
	RsAgentURL string
	// BundleDirs are where containerd makes a sandbox's bundle dir, tried
	// in order: the podsandbox's task bundle, then the shim sandboxer's.
	BundleDirs []string
}

// Defaults of KataLayout.
const (
	DefaultWrapper    = "/run/tapsync/qmp/{id}.sock"
	DefaultGoMonitor  = "/run/vc/vm/{id}/extra-monitor.sock"
	DefaultGoAgentURL = "kata-shim:///run/vc/sbs/{id}/shim-monitor.sock"
	DefaultRsDir      = "/run/kata/{id}"
	DefaultRsMonitor  = "debug-monitor.sock"
	DefaultRsAgentURL = "kata-shim:///run/kata/{id}/shim-monitor.sock"
)

// DefaultBundleDirs are containerd's bundle dirs under its default state
// dir /run/containerd.
var DefaultBundleDirs = []string{
	"/run/containerd/io.containerd.runtime.v2.task/{namespace}/{id}",
	"/run/containerd/io.containerd.sandbox.controller.v1.shim/{namespace}/{id}",
}

func (l KataLayout) withDefaults() KataLayout {
	if l.Wrapper == "" {
		l.Wrapper = DefaultWrapper
	}
	if l.GoMonitor == "" {
		l.GoMonitor = DefaultGoMonitor
	}
	if l.RsDir == "" {
		l.RsDir = DefaultRsDir
	}
	if l.RsMonitor == "" {
		l.RsMonitor = DefaultRsMonitor
	}
	if len(l.BundleDirs) == 0 {
		l.BundleDirs = DefaultBundleDirs
	}
	return l
}

// Validate returns an error naming the first bad template.
func (l KataLayout) Validate() error {
	l = l.withDefaults()
	abs := func(key, t string) error {
		if !filepath.IsAbs(t) || !strings.Contains(t, "{id}") {
			return fmt.Errorf("%s: %q must be an absolute path template containing {id}", key, t)
		}
		return nil
	}
	if err := abs("wrapper monitor", l.Wrapper); err != nil {
		return err
	}
	if err := abs("go monitor", l.GoMonitor); err != nil {
		return err
	}
	if err := abs("runtime-rs dir", l.RsDir); err != nil {
		return err
	}
	if filepath.IsAbs(l.RsMonitor) || l.RsMonitor != filepath.Base(l.RsMonitor) || !safeName(l.RsMonitor) {
		return fmt.Errorf("runtime-rs monitor: %q must be a file name (it is relative to the bundle dir)", l.RsMonitor)
	}
	for _, b := range l.BundleDirs {
		if err := abs("bundle dir", b); err != nil {
			return err
		}
	}
	return nil
}

// expand fills a template. Ids are validated by the caller (containerd's
// identifiers: no slash, no dot-dot).
func expand(t, ns, id string) string {
	return strings.NewReplacer("{id}", id, "{namespace}", ns).Replace(t)
}

// KataSandbox is where one Kata sandbox's monitor and agent are.
type KataSandbox struct {
	Flavour  string
	Monitor  string // socket path
	Protocol string // ProtoQMP or ProtoHMP
	// Wrapped: Monitor is the wrapper's. When it is not, WrapperNote says
	// why the wrapper's was not taken.
	Wrapped     bool
	WrapperNote string
	// Bundle is the bundle dir that is QEMU's cwd (runtime-rs only): the
	// monitor's listener must have it as its cwd.
	Bundle   string
	AgentURL string // "" when the layout names none
}

// Resolve says which runtime serves sandbox id of containerd namespace ns
// running under runtime, by what exists on the node: runtime-rs when its
// per-sandbox dir exists, or (before it does) when the runtime's name
// says runtime-rs; the Go runtime otherwise. The monitor is the wrapper's
// when its socket exists, else that runtime's debug monitor.
func (l KataLayout) Resolve(ns, id, runtime string) KataSandbox {
	l = l.withDefaults()
	k := l.resolveRuntime(ns, id, runtime)
	wrapper := expand(l.Wrapper, ns, id)
	var st unix.Stat_t
	switch err := unix.Lstat(wrapper, &st); {
	case err == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK:
	case err == nil:
		k.WrapperNote = fmt.Sprintf("%s is not a socket: using the runtime's debug monitor", wrapper)
		return k
	case exists(k.Monitor):
		k.WrapperNote = fmt.Sprintf("no tapsync-qemu monitor at %s (QEMU's stderr, in Kata's log, says why the wrapper made none; or tapsync install-kata's drop-in is not in force): using the runtime's debug monitor", wrapper)
		return k
	default:
		// Neither yet: wait for the wrapper's, the one production has.
		k.WrapperNote = fmt.Sprintf("neither tapsync-qemu's monitor %s nor the runtime's debug monitor %s exists", wrapper, k.Monitor)
	}
	k.Monitor, k.Protocol, k.Bundle, k.Wrapped = wrapper, ProtoQMP, "", true
	return k
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// resolveRuntime is Resolve without the wrapper's monitor.
func (l KataLayout) resolveRuntime(ns, id, runtime string) KataSandbox {
	rs := strings.Contains(runtime, "runtime-rs")
	if fi, err := os.Stat(expand(l.RsDir, ns, id)); err == nil && fi.IsDir() {
		rs = true
	}
	if !rs {
		return KataSandbox{Flavour: FlavourGo, Monitor: expand(l.GoMonitor, ns, id), Protocol: ProtoQMP, AgentURL: expand(l.GoAgentURL, ns, id)}
	}
	bundle := expand(l.BundleDirs[0], ns, id)
	for _, b := range l.BundleDirs {
		if fi, err := os.Stat(expand(b, ns, id)); err == nil && fi.IsDir() {
			bundle = expand(b, ns, id)
			break
		}
	}
	return KataSandbox{Flavour: FlavourRs, Monitor: filepath.Join(bundle, l.RsMonitor), Protocol: ProtoHMP, Bundle: bundle,
		AgentURL: expand(l.RsAgentURL, ns, id)}
}

// CheckMonitorPeer returns an error unless the process listening at the
// other end of conn (a connected unix socket) runs as root inside network
// namespace netns and, when cwd is not "", has cwd as its working
// directory: that sandbox's QEMU, as Kata starts it. The listener's pid
// comes from SO_PEERCRED (recorded by the kernel at listen(2)), so check
// the connection that then carries the monitor.
func CheckMonitorPeer(conn *net.UnixConn, netns, cwd string) error {
	cred, err := peerCred(conn)
	if err != nil {
		return fmt.Errorf("monitor peer check: %w", err)
	}
	if cred.Uid != 0 {
		return fmt.Errorf("monitor %s is served by pid %d running as uid %d, not root", conn.RemoteAddr(), cred.Pid, cred.Uid)
	}
	if !sameFile(fmt.Sprintf("/proc/%d/ns/net", cred.Pid), netns) {
		return fmt.Errorf("monitor %s is served by pid %d, which is not in the sandbox's network namespace %s", conn.RemoteAddr(), cred.Pid, netns)
	}
	if cwd != "" && !sameFile(fmt.Sprintf("/proc/%d/cwd", cred.Pid), cwd) {
		return fmt.Errorf("monitor %s is served by pid %d, whose working directory is not the sandbox's bundle dir %s", conn.RemoteAddr(), cred.Pid, cwd)
	}
	return nil
}

// sameFile reports whether a and b (followed) are one inode.
func sameFile(a, b string) bool {
	var sa, sb unix.Stat_t
	if unix.Stat(a, &sa) != nil || unix.Stat(b, &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}
