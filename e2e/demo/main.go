// Command tapsync-demo shows tapsync's job on one machine, end to end: it
// boots a small Linux guest in QEMU inside a pod-like network namespace
// and starts `tapsync run` with the guest's agent. Real CNI plugins
// (bridge + host-local) then add the pod's first network, eth0, and later
// a second one, net1, to the running pod as Multus' dynamic networks
// controller would; the daemon notices each by itself, hot-plugs a NIC
// and has the guest's agent give it the CNI name, addresses, MTU and
// routes. The demo reads what the guest has through a second agent port,
// pings it, deletes net1 with CNI DEL, prints `tapsync status`, and cleans
// everything up, also on failure or ^C. Run it as root (`make demo`).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
)

var tapsyncBin = flag.String("tapsync", "bin/tapsync", "the tapsync binary to run")

// podID is the sandbox id in tapsync's config and the CNI container ID.
const podID = "demo-pod"

// extraRoute is what the second network routes through its gateway
// instead of taking the pod's default route.
var extraRoute = netip.MustParsePrefix("10.198.0.0/16")

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }
func info(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }

// sh runs a command, returning its combined output in the error on failure.
func sh(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// eventually polls check until it returns "", for at most d; the error
// says what check last returned.
func eventually(ctx context.Context, d time.Duration, what string, check func() string) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		last := check()
		if last == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w; last: %s", what, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// attachment is one network CNI added to the pod.
type attachment struct {
	net    testcni.Network
	ifname string
	mac    net.HardwareAddr // of the pod's link, which the guest's NIC copies
	addrs  []netip.Prefix   // IPAM's
	gw     netip.Addr
}

func run() (err error) {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the demo creates network namespaces, taps, tc filters and CNI bridges")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	defer func() {
		if err != nil && ctx.Err() != nil {
			err = fmt.Errorf("interrupted: %w", err)
		}
	}()
	b := make([]byte, 3)
	rand.Read(b)
	suffix := hex.EncodeToString(b)
	var work string
	var vm *testvm.VM
	// leftover is what of the demo is still there after cleanup. Bridges,
	// taps and filters live only in the two namespaces, and the leases only
	// in the work directory.
	leftover := func() []string {
		var left []string
		if out, _ := sh("ip", "netns", "list"); strings.Contains(out, suffix) {
			left = append(left, "a namespace tapsync-demo-*-"+suffix)
		}
		if vm != nil && vm.Alive() {
			left = append(left, fmt.Sprintf("QEMU pid %d", vm.Pid))
		}
		if _, err := os.Stat(work); work != "" && err == nil {
			left = append(left, work)
		}
		return left
	}
	var cleanups []func()
	defer func() {
		step("cleaning up")
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		if left := leftover(); len(left) > 0 {
			info("left behind: %s", strings.Join(left, "; "))
			return
		}
		info("done: no namespace, bridge, tap, filter, CNI lease or QEMU process of the demo is left")
	}()

	step("building the guest (Debian cloud kernel + busybox initramfs + test agent, cached after the first run)")
	img, err := testvm.Build(ctx, "", func(f string, a ...any) { info(f, a...) })
	if err != nil {
		return err
	}
	info("kernel %s", img.Kernel)

	pod := testnet.NS{Name: "tapsync-demo-pod-" + suffix}
	node := testnet.NS{Name: "tapsync-demo-node-" + suffix}
	step("creating the pod's network namespace %s and the node namespace %s (where CNI makes its bridges)", pod.Name, node.Name)
	for _, ns := range []*testnet.NS{&pod, &node} {
		if _, err := sh("ip", "netns", "add", ns.Name); err != nil {
			return err
		}
		name := ns.Name
		cleanups = append(cleanups, func() { sh("ip", "netns", "del", name) })
		ns.Path = "/var/run/netns/" + ns.Name
		sh("ip", "-n", ns.Name, "link", "set", "lo", "up")
	}

	work, err = os.MkdirTemp("", "tapsync-demo-")
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { os.RemoveAll(work) })
	cni, err := testcni.Open(testcni.Config{
		Node:     node,
		IPAMDir:  filepath.Join(work, "cni-ipam"),
		CacheDir: filepath.Join(work, "cni-cache"),
		Logf:     func(f string, a ...any) { info(f, a...) },
	})
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { cni.Close() })
	info("CNI plugins from %s; host-local leases in %s", cni.Dir(), filepath.Join(work, "cni-ipam"))
	// CNI DEL of whatever is still attached runs after the daemon and QEMU
	// are gone (cleanups run last first), and releases the leases.
	var attached []*attachment
	cleanups = append(cleanups, func() {
		for i := len(attached) - 1; i >= 0; i-- {
			a := attached[i]
			dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := cni.Del(dctx, a.net, podID, pod.Path, a.ifname)
			cancel()
			if err != nil {
				info("CNI DEL %s: %v", a.ifname, err)
				continue
			}
			switch leases, err := cni.Leases(a.net); {
			case err != nil:
				info("CNI DEL %s: %v", a.ifname, err)
			case len(leases) > 0:
				info("CNI DEL %s (network %s): host-local still holds %v", a.ifname, a.net.Name, leases)
			case a.addrs == nil:
				info("CNI DEL %s (network %s): done", a.ifname, a.net.Name)
			default:
				info("CNI DEL %s (network %s): veth gone, lease %v released", a.ifname, a.net.Name, a.addrs)
			}
		}
	})

	step("booting the guest in QEMU inside the pod namespace; it configures no NIC itself, its agent waits for orders")
	vm, err = testvm.Start(ctx, testvm.Options{Image: &img, NetNS: pod.Path, Logf: func(f string, a ...any) { info(f, a...) }})
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { vm.Stop() })
	readyCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := vm.WaitReady(readyCtx); err != nil {
		return err
	}
	info("guest is up (QEMU pid %d, QMP socket %s)", vm.Pid, vm.QMP)
	info("guest agent for tapsync: %s; the demo watches through %s", vm.Agent, vm.TestAgent)
	u, err := agent.ParseURL(vm.TestAgent)
	if err != nil {
		return err
	}
	probe, err := agent.Dial(readyCtx, u, 10*time.Second)
	if err != nil {
		return fmt.Errorf("dial the guest's test agent: %w", err)
	}
	cleanups = append(cleanups, func() { probe.Close() })

	stateDir := filepath.Join(work, "run")
	cfgPath := filepath.Join(work, "config.toml")
	cfg := fmt.Sprintf(`# demo: one static sandbox with its guest agent, nothing else
state_dir = %q
metrics_address = ""
[containerd]
enabled = false
[discovery]
proc = false
[[sandbox]]
id = %q
netns = %q
qmp = %q
agent_url = %q
`, stateDir, podID, pod.Path, vm.QMP, vm.Agent)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	step("starting the daemon: %s run --config %s", *tapsyncBin, cfgPath)
	for _, l := range strings.Split(strings.TrimSpace(cfg), "\n") {
		info("  %s", l)
	}
	daemon := exec.Command(*tapsyncBin, "run", "--config", cfgPath, "--log-format", "console")
	logs, err := daemon.StderrPipe()
	if err != nil {
		return err
	}
	if err := testproc.Start(daemon); err != nil { // dies with the demo
		return fmt.Errorf("start %s (run `make build` first): %w", *tapsyncBin, err)
	}
	daemonDone := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(logs)
		for sc.Scan() {
			fmt.Printf("    tapsync| %s\n", sc.Text())
		}
		daemon.Wait()
		close(daemonDone)
	}()
	cleanups = append(cleanups, func() {
		daemon.Process.Signal(syscall.SIGTERM) // by pid: the daemon this demo started
		select {
		case <-daemonDone:
		case <-time.After(10 * time.Second):
			daemon.Process.Kill()
			<-daemonDone
		}
	})
	cli := func(args ...string) (string, error) {
		return sh(*tapsyncBin, append(args, "--state-dir", stateDir)...)
	}
	if err := eventually(ctx, 30*time.Second, "daemon serving", func() string {
		if _, err := cli("status"); err != nil {
			return err.Error()
		}
		return ""
	}); err != nil {
		return err
	}

	// add runs CNI ADD of a network into the running pod and shows what
	// IPAM gave.
	add := func(n testcni.Network, ifname string) (*attachment, error) {
		actx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		// Recorded first: an ADD cut short (^C) leaves a half-made
		// attachment that only DEL cleans up.
		a := &attachment{net: n, ifname: ifname}
		attached = append(attached, a)
		res, err := cni.Add(actx, n, podID, pod.Path, ifname)
		if err != nil {
			return nil, err
		}
		fillFromResult(a, res, pod.Path)
		info("CNI ADD %s (network %s): MAC %s, addresses %v, gateway %s", ifname, n.Name, a.mac, a.addrs, a.gw)
		for _, r := range res.Routes {
			info("  route from IPAM: %s via %s", r.Dst.String(), gwOr(r.GW, a.gw))
		}
		return a, nil
	}
	// guestHas waits until the guest's interface with a's MAC is named and
	// addressed as CNI says, and shows it.
	guestHas := func(a *attachment) error {
		var g agent.Interface
		err := eventually(ctx, time.Minute, "guest configures "+a.ifname, func() string {
			ifs, err := probe.ListInterfaces(ctx)
			if err != nil {
				return err.Error()
			}
			for _, i := range ifs {
				if bytes.Equal(i.MAC, a.mac) {
					if i.Name == a.ifname && slices.Equal(global(i.Addrs), a.addrs) {
						g = i
						return ""
					}
					return fmt.Sprintf("guest has %s as %s with %v", a.mac, i.Name, i.Addrs)
				}
			}
			return "no guest interface with MAC " + a.mac.String()
		})
		if err != nil {
			return err
		}
		info("the guest now has: %s", ifaceString(g))
		return nil
	}
	showGuestRoutes := func() error {
		rs, err := probe.ListRoutes(ctx)
		if err != nil {
			return err
		}
		info("the guest's routes:")
		for _, r := range rs {
			if !r.IPv6 {
				info("  %s", r.String())
			}
		}
		return nil
	}
	ping := func(a *attachment) error {
		addr := a.addrs[0].Addr()
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := cni.Ping(pctx, addr); err != nil {
			return fmt.Errorf("guest %s over %s: %w", addr, a.ifname, err)
		}
		// Equivalent to: ip netns exec <node> ping -c3 -i0.2 <addr>, now that it answers.
		out, err := sh("ip", "netns", "exec", node.Name, "ping", "-n", "-c3", "-i0.2", "-W1", addr.String())
		if err != nil {
			return err
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if strings.Contains(l, "bytes from") || strings.Contains(l, "packet loss") {
				info("  %s", l)
			}
		}
		return nil
	}

	step("the pod's first network: CNI ADD eth0 (bridge + host-local, default route); nobody tells tapsync")
	sub0 := testcni.Subnet4()
	eth0, err := add(testcni.Bridge("demo-"+suffix+"-0", "cni0-"+suffix, sub0), "eth0")
	if err != nil {
		return err
	}
	if err := guestHas(eth0); err != nil {
		return err
	}
	out, _ := sh("tc", "-n", pod.Name, "filter", "show", "dev", "eth0", "ingress")
	info("the redirect eth0 → tap, as tc shows it:")
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.Contains(l, "match") || strings.Contains(l, "mirred") {
			info("  %s", strings.TrimSpace(l))
		}
	}
	step("pinging the guest's eth0 from the node: bridge ⇄ veth eth0 ⇄ tap ⇄ virtio-net")
	if err := ping(eth0); err != nil {
		return err
	}

	step("a second network joins the running pod (Multus dynamic networks style): CNI ADD net1, route %s instead of a default", extraRoute)
	sub1 := testcni.Subnet4()
	net1, err := add(testcni.Bridge("demo-"+suffix+"-1", "cni1-"+suffix, sub1, testcni.WithRoutes(extraRoute)), "net1")
	if err != nil {
		return err
	}
	if err := guestHas(net1); err != nil {
		return err
	}
	want := fmt.Sprintf("%s via %s dev net1", extraRoute, net1.gw)
	if err := eventually(ctx, time.Minute, "guest route "+want, func() string {
		rs, err := probe.ListRoutes(ctx)
		if err != nil {
			return err.Error()
		}
		for _, r := range rs {
			if r.String() == want {
				return ""
			}
		}
		return fmt.Sprintf("guest routes %v", rs)
	}); err != nil {
		return err
	}
	if err := showGuestRoutes(); err != nil {
		return err
	}
	step("pinging the guest's net1 from the node")
	if err := ping(net1); err != nil {
		return err
	}

	step("tapsync plan: what a reconcile would do now")
	out, err = cli("plan")
	if err != nil {
		return err
	}
	info("%s", strings.TrimSpace(out))

	step("CNI DEL net1: tapsync unplugs the NIC from the guest, then removes its tap and filter")
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := cni.Del(dctx, net1.net, podID, pod.Path, "net1"); err != nil {
		return err
	}
	attached = slices.DeleteFunc(attached, func(a *attachment) bool { return a == net1 })
	var left []agent.Interface
	if err := eventually(ctx, time.Minute, "guest's net1 gone", func() string {
		ifs, err := probe.ListInterfaces(ctx)
		if err != nil {
			return err.Error()
		}
		left = ifs
		for _, i := range ifs {
			if bytes.Equal(i.MAC, net1.mac) {
				return "still there as " + i.Name
			}
		}
		return ""
	}); err != nil {
		return err
	}
	info("the guest's interfaces now:")
	for _, i := range left {
		info("  %s", ifaceString(i))
	}
	if err := showGuestRoutes(); err != nil {
		return err
	}
	step("eth0 still answers")
	if err := ping(eth0); err != nil {
		return err
	}

	step("tapsync status")
	// The GUEST column catches up with the unplug on the pass that follows it.
	if err := eventually(ctx, 30*time.Second, "status without net1", func() string {
		if out, err = cli("status"); err != nil {
			return err.Error()
		}
		if strings.Contains(out, "net1") {
			return out
		}
		return ""
	}); err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		info("%s", l)
	}
	return nil
}

// fillFromResult takes the pod link's MAC (the interface in netnsPath),
// the addresses and the IPv4 gateway from a CNI result.
func fillFromResult(a *attachment, res *types100.Result, netnsPath string) {
	for _, i := range res.Interfaces {
		if i.Sandbox == netnsPath && i.Name == a.ifname {
			a.mac, _ = net.ParseMAC(i.Mac)
		}
	}
	for _, ip := range res.IPs {
		addr, _ := netip.AddrFromSlice(ip.Address.IP)
		ones, _ := ip.Address.Mask.Size()
		a.addrs = append(a.addrs, netip.PrefixFrom(addr.Unmap(), ones))
		if gw, ok := netip.AddrFromSlice(ip.Gateway); ok && !a.gw.IsValid() {
			a.gw = gw.Unmap()
		}
	}
	slices.SortFunc(a.addrs, netip.Prefix.Compare)
}

// global drops link-local addresses, which the guest's kernel makes by
// itself, and sorts the rest.
func global(addrs []netip.Prefix) []netip.Prefix {
	var g []netip.Prefix
	for _, a := range addrs {
		if !a.Addr().IsLinkLocalUnicast() {
			g = append(g, a)
		}
	}
	slices.SortFunc(g, netip.Prefix.Compare)
	return g
}

func ifaceString(i agent.Interface) string {
	addrs := global(i.Addrs)
	s := fmt.Sprintf("%-5s MAC %s  MTU %d  addresses %v", i.Name, i.MAC, i.MTU, addrs)
	if len(addrs) == 0 {
		s = fmt.Sprintf("%-5s MAC %s  MTU %d  no addresses", i.Name, i.MAC, i.MTU)
	}
	return s
}

func gwOr(gw net.IP, def netip.Addr) string {
	if gw != nil {
		return gw.String()
	}
	return def.String() + " (the network's gateway)"
}
