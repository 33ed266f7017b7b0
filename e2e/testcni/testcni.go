// Package testcni is a test fixture: it drives the real CNI reference
// plugins (Debian's containernetworking-plugins) through libcni, the way
// Multus' dynamic networks controller adds a network to a running pod: a
// CNI ADD into an existing netns with a new ifname. Each test gets its own
// "node" netns that plays the host (bridges and macvlan masters live there,
// never in the real host's root netns) and its own IPAM and result caches;
// the demo program brings its own (Open). Test support only: nothing in the
// daemon imports it.
package testcni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netns"

	"github.com/tapsync/tapsync/e2e/testnet"
)

// pluginDirs are searched, in order, after the directories in $CNI_PATH.
// Debian installs the reference plugins in /usr/lib/cni; upstream tarballs
// go to /opt/cni/bin.
var pluginDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}

// Plugins runs CNI plugins for one test (New) or one program (Open).
// The zero value is not usable.
type Plugins struct {
	// Node is the netns that stands in for the node's host side: the
	// plugins run in it, so bridges, the host ends of veths and macvlan
	// masters are created here.
	Node testnet.NS

	t        testing.TB // nil when made by Open
	dir      string     // plugin directory
	ipamDir  string     // host-local's dataDir
	cacheDir string     // libcni's result cache
	node     netns.NsHandle
	cni      *libcni.CNIConfig
}

// Config is what Open needs. The caller owns all of it: Open creates
// nothing, so removing the netns and the directories is the caller's job
// (after the attachments are deleted, so host-local releases its leases).
type Config struct {
	// Node is an existing netns to run the plugins in (see Plugins.Node).
	Node testnet.NS
	// IPAMDir is host-local's dataDir and CacheDir libcni's result cache;
	// both are created on first use.
	IPAMDir, CacheDir string
	// Logf gets what a plugin printed on stderr when it succeeded (a
	// failure carries it in the error); nil drops it.
	Logf func(format string, args ...any)
}

// Open finds the plugin directory and prepares to run plugins in
// c.Node, for programs without a testing.TB (the demo); tests use New.
// Close releases it.
func Open(c Config) (*Plugins, error) {
	if c.IPAMDir == "" || c.CacheDir == "" {
		return nil, errors.New("testcni: Config needs an IPAM dir and a cache dir")
	}
	dir, err := findPluginDir()
	if err != nil {
		return nil, fmt.Errorf("%w (install Debian's containernetworking-plugins: make deps)", err)
	}
	node, err := netns.GetFromPath(c.Node.Path)
	if err != nil {
		return nil, fmt.Errorf("open node netns %s: %w", c.Node.Path, err)
	}
	logf := c.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	p := &Plugins{
		Node:     c.Node,
		dir:      dir,
		ipamDir:  c.IPAMDir,
		cacheDir: c.CacheDir,
		node:     node,
	}
	ex := &nodeExec{
		node:        node,
		DefaultExec: &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: logWriter(logf)}},
	}
	p.cni = libcni.NewCNIConfigWithCacheDir([]string{dir}, p.cacheDir, ex)
	return p, nil
}

// Close releases the handle on the node netns; the netns itself stays.
// Plugins must not be run after it.
func (p *Plugins) Close() error {
	if err := p.node.Close(); err != nil {
		return fmt.Errorf("close node netns %s: %w", p.Node.Path, err)
	}
	return nil
}

// New is Open for a test: a fresh node netns, IPAM data dir and libcni
// cache dir, all gone when the test ends, and plugin stderr in the test
// log. It skips when not root and fails when the plugins are not
// installed (`make deps` installs them).
func New(t testing.TB) *Plugins {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	tmp := t.TempDir()
	p, err := Open(Config{
		Node:     testnet.NewNS(t, "cninode"),
		IPAMDir:  filepath.Join(tmp, "ipam"),
		CacheDir: filepath.Join(tmp, "cache"),
		Logf:     t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	p.t = t
	return p
}

func findPluginDir() (string, error) {
	var dirs []string
	if env := os.Getenv("CNI_PATH"); env != "" {
		dirs = append(dirs, filepath.SplitList(env)...)
	}
	dirs = append(dirs, pluginDirs...)
	for _, d := range dirs {
		if fi, err := os.Stat(filepath.Join(d, "bridge")); err == nil && fi.Mode().IsRegular() {
			return d, nil
		}
	}
	return "", fmt.Errorf("no CNI bridge plugin in %s", strings.Join(dirs, ", "))
}

// Dir is the directory the plugins are run from.
func (p *Plugins) Dir() string { return p.dir }

// Add runs CNI ADD for net: ifname appears in the netns at netnsPath and
// the host side in p.Node.
func (p *Plugins) Add(ctx context.Context, net Network, containerID, netnsPath, ifname string) (*types100.Result, error) {
	list, err := p.confList(net)
	if err != nil {
		return nil, err
	}
	res, err := p.cni.AddNetworkList(ctx, list, runtimeConf(containerID, netnsPath, ifname))
	if err != nil {
		return nil, fmt.Errorf("cni add %s (%s) to %s in %s: %w", net.Name, ifname, containerID, netnsPath, err)
	}
	cur, err := types100.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("cni add %s: convert result: %w", net.Name, err)
	}
	return cur, nil
}

// Del runs CNI DEL for net. Like the plugins it is idempotent: deleting
// an attachment that is gone, or whose netns is gone, succeeds.
func (p *Plugins) Del(ctx context.Context, net Network, containerID, netnsPath, ifname string) error {
	list, err := p.confList(net)
	if err != nil {
		return err
	}
	if err := p.cni.DelNetworkList(ctx, list, runtimeConf(containerID, netnsPath, ifname)); err != nil {
		return fmt.Errorf("cni del %s (%s) of %s in %s: %w", net.Name, ifname, containerID, netnsPath, err)
	}
	return nil
}

func runtimeConf(containerID, netnsPath, ifname string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: containerID, NetNS: netnsPath, IfName: ifname}
}

// confList parses net's conflist and points every host-local IPAM at the
// test's own data dir, so leases never outlive the test or meet another
// test's (host-local defaults to the node-wide /var/lib/cni/networks).
func (p *Plugins) confList(net Network) (*libcni.NetworkConfigList, error) {
	var conf map[string]any
	if err := json.Unmarshal(net.Conf, &conf); err != nil {
		return nil, fmt.Errorf("parse conflist %s: %w", net.Name, err)
	}
	plugins, _ := conf["plugins"].([]any)
	for _, pl := range plugins {
		pm, _ := pl.(map[string]any)
		if ipam, ok := pm["ipam"].(map[string]any); ok && ipam["type"] == "host-local" {
			ipam["dataDir"] = p.ipamDir
		}
	}
	b, err := json.Marshal(conf)
	if err != nil {
		return nil, fmt.Errorf("encode conflist %s: %w", net.Name, err)
	}
	list, err := libcni.NetworkConfFromBytes(b)
	if err != nil {
		return nil, fmt.Errorf("load conflist %s: %w", net.Name, err)
	}
	return list, nil
}

// Leases lists the addresses host-local holds for net in this test's IPAM
// data dir (one file per leased address, beside its lock and
// last_reserved_ip files).
func (p *Plugins) Leases(net Network) ([]netip.Addr, error) {
	ents, err := os.ReadDir(filepath.Join(p.ipamDir, net.Name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read leases of %s: %w", net.Name, err)
	}
	var addrs []netip.Addr
	for _, e := range ents {
		if a, err := netip.ParseAddr(e.Name()); err == nil {
			addrs = append(addrs, a)
		}
	}
	return addrs, nil
}

// AddMacvlanMaster creates a link named master in p.Node to carry Macvlan
// networks, plus a macvlan of its own in bridge mode holding
// Gateway(subnet). A macvlan's master cannot talk to its macvlans;
// bridge-mode siblings can, so the sibling is what lets the node side reach
// a pod (and be its gateway). The master is one end of a veth pair whose
// other end is up, for carrier: the kernels of these machines have no
// dummy driver. It fails the test on error, so it needs Plugins from New;
// with Plugins from Open use MacvlanMaster.
func (p *Plugins) AddMacvlanMaster(master string, subnet netip.Prefix) {
	if p.t == nil {
		panic("testcni: AddMacvlanMaster needs Plugins made by New; use MacvlanMaster")
	}
	p.t.Helper()
	if err := p.MacvlanMaster(master, subnet); err != nil {
		p.t.Fatal(err)
	}
}

// MacvlanMaster is AddMacvlanMaster returning its error.
func (p *Plugins) MacvlanMaster(master string, subnet netip.Prefix) error {
	peer, shim := UniqueName("mvp"), UniqueName("mvs")
	for _, args := range [][]string{
		{"link", "add", master, "type", "veth", "peer", "name", peer},
		{"link", "set", peer, "up"},
		{"link", "set", master, "up"},
		{"link", "add", shim, "link", master, "type", "macvlan", "mode", "bridge"},
		{"addr", "add", netip.PrefixFrom(Gateway(subnet), subnet.Bits()).String(), "dev", shim},
		{"link", "set", shim, "up"},
	} {
		args = append([]string{"-n", p.Node.Name}, args...)
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("macvlan master %s in netns %s: ip %s: %w: %s", master, p.Node.Name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// Ping pings addr from p.Node until it answers or ctx ends, and then
// returns the last ping's output with the error. A fresh IPv6 address is
// tentative until DAD finishes, hence the retries.
func (p *Plugins) Ping(ctx context.Context, addr netip.Addr) error {
	var last []byte
	for {
		// Equivalent to: ip netns exec <node> ping -c1 -W1 <addr>
		out, err := exec.CommandContext(ctx, "ip", "netns", "exec", p.Node.Name, "ping", "-n", "-c1", "-W1", addr.String()).CombinedOutput()
		if err == nil {
			return nil
		}
		last = out
		select {
		case <-ctx.Done():
			return fmt.Errorf("ping %s from netns %s: %w; last output: %s", addr, p.Node.Name, ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// nodeExec runs each plugin as a process whose netns is the node netns.
//
// A plugin creates host-side objects (bridge, veth host end) in the netns
// it starts in, and only enters CNI_NETNS for the container side. Go forks
// a child from the OS thread of the goroutine that calls exec.Cmd.Start,
// and the child inherits that thread's netns; so the exec runs on a fresh
// goroutine that locks its thread and setns()es into the node netns. That
// goroutine returns without unlocking, and Go then ends the thread instead
// of reusing it: nothing needs restoring, and no other goroutine can ever
// run in the node netns by accident. This keeps the whole process (and its
// children, e.g. host-local) in the node netns from its first instruction,
// with no dependency on nsenter and with setns errors as Go errors.
type nodeExec struct {
	node netns.NsHandle
	*invoke.DefaultExec
}

func (e *nodeExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with this goroutine
		if err := netns.Set(e.node); err != nil {
			done <- result{nil, fmt.Errorf("enter node netns to run %s: %w", filepath.Base(pluginPath), err)}
			return
		}
		out, err := e.DefaultExec.ExecPlugin(ctx, pluginPath, stdin, environ)
		done <- result{out, err}
	}()
	r := <-done
	return r.out, r.err
}

// logWriter sends what a plugin printed on stderr (when it succeeded;
// a failure carries it in the error) to a log function.
type logWriter func(format string, args ...any)

func (w logWriter) Write(b []byte) (int, error) {
	w("cni plugin stderr: %s", strings.TrimSpace(string(b)))
	return len(b), nil
}
