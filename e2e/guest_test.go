//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
)

// guestRig is a running VM pod: a pod netns with a guest QEMU in it, a
// node netns where CNI plugins make bridges, and the daemon under test
// configured for the sandbox with the guest's agent.
type guestRig struct {
	t        *testing.T
	cni      *testcni.Plugins
	pod      testnet.NS
	vm       *testvm.VM
	stateDir string
	config   string
	d        *daemonProc
	metrics  string        // the daemon's metrics address
	probe    *agent.Client // the test's own agent connection (VM.TestAgent)
}

func newGuestRig(t *testing.T, agentURL func(vm *testvm.VM) string, extra string) *guestRig {
	t.Helper()
	return newGuestRigTop(t, agentURL, "", extra)
}

// newGuestRigTop is newGuestRig with top-level config keys (top) too.
func newGuestRigTop(t *testing.T, agentURL func(vm *testvm.VM) string, top, extra string) *guestRig {
	t.Helper()
	r := &guestRig{t: t, cni: testcni.New(t), pod: testnet.NewNS(t, "gpod"), stateDir: t.TempDir()}
	r.vm = testvm.ForTest(t, testvm.Options{NetNS: r.pod.Path, RootPorts: 8})
	u, err := agent.ParseURL(r.vm.TestAgent)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if r.probe, err = agent.Dial(ctx, u, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.probe.Close() })
	r.config = writeConfig(t, fmt.Sprintf(`%s
netns_dir = "/var/run/netns"
state_dir = %q
metrics_address = "127.0.0.1:0"
[containerd]
enabled = false
[discovery]
proc = false
[[sandbox]]
id = "pod"
netns = %q
qmp = %q
agent_url = %q
%s`, top, r.stateDir, r.pod.Path, r.vm.QMP, agentURL(r.vm), extra))
	r.start()
	return r
}

// restartAgent restarts the agent inside the guest. The test channel
// serves one client at a time: the probe lets go of it meanwhile.
func (r *guestRig) restartAgent() {
	r.t.Helper()
	r.withoutProbe(func() {
		if err := r.vm.RestartAgent(r.t.Context()); err != nil {
			r.t.Fatal(err)
		}
	})
}

// withoutProbe runs f with the probe's connection to the test channel
// closed, for the VM's own helpers that dial it (GuestPing, GuestTCPSend,
// GuestTCPReceive, RestartAgent): it serves one client at a time.
func (r *guestRig) withoutProbe(f func()) {
	r.t.Helper()
	r.probe.Close()
	defer func() {
		u, _ := agent.ParseURL(r.vm.TestAgent)
		ctx, cancel := context.WithTimeout(r.t.Context(), 30*time.Second)
		defer cancel()
		var err error
		if r.probe, err = agent.Dial(ctx, u, 10*time.Second); err != nil {
			r.t.Fatal(err)
		}
	}()
	f()
}

// status is sandbox id's entry in `tapsync status`, nil if absent.
func (r *guestRig) status(id string) map[string]any { return sandboxStatus(r.t, r.stateDir, id) }

// start runs the daemon and waits until it serves.
func (r *guestRig) start() {
	r.t.Helper()
	r.d = startDaemon(r.t, "--config", r.config)
	r.metrics = r.d.waitLog("serving metrics", nil)["address"].(string)
	r.d.waitLog("tapsync running", nil)
}

// agentCalls is the daemon's count of calls to guest agents, all methods.
func (r *guestRig) agentCalls() int {
	r.t.Helper()
	resp, err := http.Get("http://" + r.metrics + "/metrics")
	if err != nil {
		r.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	n := 0
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, "tapsync_agent_calls_total{"); ok {
			var v float64
			fmt.Sscanf(rest[strings.Index(rest, "} ")+2:], "%g", &v)
			n += int(v)
		}
	}
	return n
}

// converged waits until a pass of sandbox "pod" newer than since
// succeeded and every endpoint's guest is configured, and returns that
// status.
func (r *guestRig) converged(since time.Time) map[string]any {
	r.t.Helper()
	var st map[string]any
	eventually(r.t, "sandbox converged, guest configured", func() string {
		if st = r.status("pod"); st == nil {
			return "no sandbox pod"
		}
		ts, _ := st["last_reconcile"].(string)
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil || !at.After(since) {
			return "no pass since " + since.String()
		}
		if e, _ := st["last_error"].(string); e != "" {
			return "last error: " + e
		}
		for _, e := range st["endpoints"].([]any) {
			if g := e.(map[string]any)["guest"]; g != "configured" {
				return fmt.Sprintf("endpoint %v: guest %v", e.(map[string]any)["link"], g)
			}
		}
		return ""
	})
	return st
}

// add runs a CNI ADD of net into the running pod, as Multus' dynamic
// networks controller does, and returns the addresses IPAM gave.
func (r *guestRig) add(n testcni.Network, ifname string) []netip.Prefix {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(r.t.Context(), time.Minute)
	defer cancel()
	res, err := r.cni.Add(ctx, n, "pod", r.pod.Path, ifname)
	if err != nil {
		r.t.Fatalf("CNI ADD %s as %s: %v", n.Name, ifname, err)
	}
	r.t.Cleanup(func() { _ = r.cni.Del(context.Background(), n, "pod", r.pod.Path, ifname) })
	var addrs []netip.Prefix
	for _, ip := range res.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		ones, _ := ip.Address.Mask.Size()
		addrs = append(addrs, netip.PrefixFrom(a.Unmap(), ones))
	}
	return addrs
}

// podLink is the container link ifname as the pod netns has it.
func (r *guestRig) podLink(ifname string) datapath.Link {
	r.t.Helper()
	n := openNetns(r.t, r.pod.Path)
	defer n.Close()
	return link(r.t, n, ifname)
}

// guestIface waits until the guest has an interface with mac that
// satisfies ok, and returns it.
func (r *guestRig) guestIface(mac net.HardwareAddr, what string, ok func(agent.Interface) bool) agent.Interface {
	r.t.Helper()
	var last []agent.Interface
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		ifs, err := r.probe.ListInterfaces(r.t.Context())
		if err != nil {
			r.t.Fatalf("ListInterfaces through the test channel: %v", err)
		}
		last = ifs
		for _, i := range ifs {
			if bytes.Equal(i.MAC, mac) && ok(i) {
				return i
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.t.Fatalf("no guest interface with MAC %s that %s within a minute; the guest has %+v\nstatus: %v", mac, what, last, status(r.t, r.stateDir))
	return agent.Interface{}
}

// waitGuestRoutes waits until the guest has every route of want
// ("dest via gw dev name", "dest dev name").
func (r *guestRig) waitGuestRoutes(want ...string) {
	r.t.Helper()
	var have []string
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		rs, err := r.probe.ListRoutes(r.t.Context())
		if err != nil {
			r.t.Fatalf("ListRoutes through the test channel: %v", err)
		}
		have = have[:0]
		for _, rt := range rs {
			have = append(have, rt.String())
		}
		if !slices.ContainsFunc(want, func(w string) bool { return !slices.Contains(have, w) }) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.t.Fatalf("guest routes %q lack some of %q", have, want)
}

func sameAddrs(have []netip.Prefix, want []netip.Prefix) bool {
	var global []netip.Prefix
	for _, a := range have {
		if !a.Addr().IsLinkLocalUnicast() {
			global = append(global, a)
		}
	}
	return len(global) == len(want) && !slices.ContainsFunc(want, func(w netip.Prefix) bool { return !slices.Contains(global, w) })
}

// pingFromNode pings addr from the node netns with extra ping flags until
// it answers or a minute passes.
func (r *guestRig) pingFromNode(addr netip.Addr, flags ...string) {
	r.t.Helper()
	var out []byte
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		args := append([]string{"netns", "exec", r.cni.Node.Name, "ping", "-n", "-c1", "-W1"}, flags...)
		var err error
		// Equivalent to: ip netns exec <node> ping -c1 -W1 [flags] <addr>
		if out, err = exec.Command("ip", append(args, addr.String())...).CombinedOutput(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	r.t.Fatalf("ping %s %v from the node: %s", addr, flags, out)
}

// TestGuestConfiguredByAgent adds networks to a running VM pod with real
// CNI plugins; the daemon plugs each NIC and has the guest's agent give it
// the CNI ifname, the IPAM addresses, CNI's routes and the MTU. Each kind is
// a subtest on the same running pod, in order; the last one deletes them.
func TestGuestConfiguredByAgent(t *testing.T) {
	r := newGuestRig(t, func(vm *testvm.VM) string { return vm.Agent }, "")
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()
	type added struct {
		net    testcni.Network
		ifname string
		mac    net.HardwareAddr
	}
	var nets []added
	extra := netip.MustParsePrefix("10.198.0.0/16")

	t.Run("bridge with host-local IPv4", func(t *testing.T) {
		sub := testcni.Subnet4()
		n := testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), sub)
		addrs := r.add(n, "net1")
		l := r.podLink("net1")
		nets = append(nets, added{n, "net1", l.MAC})
		g := r.guestIface(l.MAC, "is net1 with "+fmt.Sprint(addrs), func(i agent.Interface) bool {
			return i.Name == "net1" && sameAddrs(i.Addrs, addrs)
		})
		if g.MTU != l.MTU {
			t.Errorf("guest MTU %d, link MTU %d", g.MTU, l.MTU)
		}
		r.waitGuestRoutes("default via " + testcni.Gateway(sub).String() + " dev net1")
		r.pingFromNode(addrs[0].Addr())
	})
	t.Run("dual-stack", func(t *testing.T) {
		v4, v6 := testcni.Subnet4(), testcni.Subnet6()
		n := testcni.BridgeDualStack(testcni.UniqueName("net"), testcni.UniqueName("br"), v4, v6, testcni.WithRoutes(extra, netip.MustParsePrefix("fd99::/64")))
		addrs := r.add(n, "net2")
		l := r.podLink("net2")
		nets = append(nets, added{n, "net2", l.MAC})
		r.guestIface(l.MAC, "is net2 with "+fmt.Sprint(addrs), func(i agent.Interface) bool {
			return i.Name == "net2" && sameAddrs(i.Addrs, addrs)
		})
		r.waitGuestRoutes(extra.String()+" via "+testcni.Gateway(v4).String()+" dev net2",
			"fd99::/64 via "+testcni.Gateway(v6).String()+" dev net2")
		for _, a := range addrs {
			r.pingFromNode(a.Addr())
		}
	})
	t.Run("macvlan", func(t *testing.T) {
		sub := testcni.Subnet4()
		master := testcni.UniqueName("mvm")
		r.cni.AddMacvlanMaster(master, sub)
		n := testcni.Macvlan(testcni.UniqueName("net"), master, sub, testcni.WithRoutes(netip.MustParsePrefix("10.197.0.0/16")))
		addrs := r.add(n, "net3")
		l := r.podLink("net3")
		if l.Kind != "macvlan" {
			t.Fatalf("net3 is a %s", l.Kind)
		}
		nets = append(nets, added{n, "net3", l.MAC})
		r.guestIface(l.MAC, "is net3 with "+fmt.Sprint(addrs), func(i agent.Interface) bool {
			return i.Name == "net3" && sameAddrs(i.Addrs, addrs)
		})
		r.pingFromNode(addrs[0].Addr())
	})
	t.Run("L2 only", func(t *testing.T) {
		n := testcni.L2Only(testcni.UniqueName("net"), testcni.UniqueName("br"))
		if addrs := r.add(n, "net4"); len(addrs) != 0 {
			t.Fatalf("an L2-only network gave addresses %v", addrs)
		}
		l := r.podLink("net4")
		nets = append(nets, added{n, "net4", l.MAC})
		r.guestIface(l.MAC, "is net4, up, without addresses", func(i agent.Interface) bool {
			return i.Name == "net4" && sameAddrs(i.Addrs, nil)
		})
	})
	t.Run("MTU 1400", func(t *testing.T) {
		sub := testcni.Subnet4()
		n := testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), sub, testcni.WithMTU(1400), testcni.WithRoutes(netip.MustParsePrefix("10.196.0.0/16")))
		addrs := r.add(n, "net5")
		l := r.podLink("net5")
		if l.MTU != 1400 {
			t.Fatalf("CNI made net5 with MTU %d", l.MTU)
		}
		nets = append(nets, added{n, "net5", l.MAC})
		r.guestIface(l.MAC, "is net5 at MTU 1400", func(i agent.Interface) bool {
			return i.Name == "net5" && i.MTU == 1400 && sameAddrs(i.Addrs, addrs)
		})
		// 1372 bytes of payload + 8 ICMP + 20 IP = 1400, not fragmented.
		r.pingFromNode(addrs[0].Addr(), "-M", "do", "-s", "1372")
	})
	t.Run("check reports hot-plug capacity", func(t *testing.T) {
		out, err := exec.Command(tapsyncBinary(t), "check", "--config", r.config, "--sandbox", "pod").CombinedOutput()
		// Five NICs on the bridge (slots 0x1f down to 0x1b), none on the root ports.
		if !strings.Contains(string(out), "sandbox pod: hot-plug capacity hotplug = bridge: 26 free") {
			t.Errorf("tapsync check --sandbox pod: %v\n%s", err, out)
		}
	})
	t.Run("restart and SIGHUP make no agent call", func(t *testing.T) {
		r.converged(time.Time{})
		if r.agentCalls() == 0 {
			t.Fatal("the daemon reports no agent calls at all: the count is broken")
		}
		r.d.stop(syscall.SIGKILL)
		before := time.Now()
		r.start()
		st := r.converged(before)
		if m := st["last_mutations"].(float64); m != 0 {
			t.Errorf("restart on a converged sandbox made %v mutations", m)
		}
		before = time.Now()
		r.d.cmd.Process.Signal(syscall.SIGHUP)
		r.converged(before)
		if calls := r.agentCalls(); calls != 0 {
			t.Errorf("a restart and a SIGHUP on a converged sandbox made %d agent calls", calls)
		}
	})
	t.Run("CNI DEL", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		for _, a := range nets {
			if err := r.cni.Del(ctx, a.net, "pod", r.pod.Path, a.ifname); err != nil {
				t.Fatalf("CNI DEL %s: %v", a.ifname, err)
			}
		}
		for _, a := range nets {
			r.waitNoGuestIface(a.mac)
		}
		c, err := qmp.Dial(ctx, r.vm.TestQMP, qmp.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		n := openNetns(t, r.pod.Path)
		defer n.Close()
		eventually(t, "nothing of ours left in the pod and the VM", func() string {
			st, err := n.Observe(datapath.All)
			if err != nil {
				return err.Error()
			}
			nics, err := c.ListNICs(ctx)
			if err != nil {
				return err.Error()
			}
			var left []string
			for _, tp := range st.Taps {
				left = append(left, "tap "+tp.Name)
			}
			for _, rd := range st.Redirects {
				if rd.Owned {
					left = append(left, "redirect "+rd.String())
				}
			}
			for _, nic := range nics {
				left = append(left, "NIC "+nic.ID)
			}
			return strings.Join(left, ", ")
		})
	})
}

// waitNoGuestIface waits until the guest has no interface with mac.
func (r *guestRig) waitNoGuestIface(mac net.HardwareAddr) {
	r.t.Helper()
	eventually(r.t, "guest interface "+mac.String()+" gone", func() string {
		ifs, err := r.probe.ListInterfaces(r.t.Context())
		if err != nil {
			return err.Error()
		}
		for _, i := range ifs {
			if bytes.Equal(i.MAC, mac) {
				return "still there as " + i.Name
			}
		}
		return ""
	})
}

// eventually polls check until it returns "" or a minute passes, then
// fails with what it last returned.
func eventually(t testing.TB, what string, check func() string) {
	t.Helper()
	var last string
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if last = check(); last == "" {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not within a minute; last: %s", what, last)
}

// silentAgent accepts connections on a unix socket and never answers.
func silentAgent(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
}

// TestGuestAgentFaults: an agent that accepts and never answers, and one
// that is not there, leave the host side wired and show in status while
// the pass is retried with backoff; another sandbox with a hung agent
// does not hold this one up; once the agent answers the guest converges,
// and after the agent restarts inside the guest a new network is
// configured again.
func TestGuestAgentFaults(t *testing.T) {
	dir := t.TempDir()
	agentLink := dir + "/agent.sock" // a symlink: the test moves it between agents
	silent := dir + "/silent.sock"
	silentAgent(t, silent)
	if err := os.Symlink(silent, agentLink); err != nil {
		t.Fatal(err)
	}
	// Another sandbox whose agent never answers, on a QEMU without a guest.
	otherPod := testnet.NewNS(t, "gother")
	other := testvm.StartNoGuest(t, testvm.Options{NetNS: otherPod.Path})
	otherSilent := dir + "/other-silent.sock"
	silentAgent(t, otherSilent)
	r := newGuestRig(t, func(*testvm.VM) string { return "unix://" + agentLink }, fmt.Sprintf(`
[[sandbox]]
id = "other"
netns = %q
qmp = %q
agent_url = "unix://%s"
[guest]
timeout = "1s"
`, otherPod.Path, other.QMP, otherSilent))
	defer func() {
		if t.Failed() {
			t.Logf("status: %v", status(t, r.stateDir))
		}
	}()

	// The other sandbox gets a link too: its host side and NIC are wired,
	// its guest side keeps failing.
	testnet.Veth(t, otherPod, "eth0", testvm.TestMAC(7), r.cni.Node, testcni.UniqueName("ov"))
	eventually(t, "other sandbox wired, its agent reported silent", func() string {
		st := r.status("other")
		if st == nil || len(st["endpoints"].([]any)) != 1 {
			return fmt.Sprintf("status %v", st)
		}
		if g, _ := st["guest"].(string); !strings.Contains(g, "agent unreachable") {
			return fmt.Sprintf("guest %q", g)
		}
		return ""
	})

	sub := testcni.Subnet4()
	n1 := testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), sub)
	addrs := r.add(n1, "net1")
	mac := r.podLink("net1").MAC
	ctx := t.Context()
	c, err := qmp.Dial(ctx, r.vm.TestQMP, qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	eventually(t, "host side wired and NIC plugged while the agent is silent; the error in status, retried", func() string {
		nics, err := c.ListNICs(ctx)
		if err != nil {
			return err.Error()
		}
		if !slices.ContainsFunc(nics, func(n qmp.NICInfo) bool { return bytes.Equal(n.MAC, mac) }) {
			return "no NIC with the link's MAC"
		}
		st := r.status("pod")
		g, _ := st["guest"].(string)
		if !strings.Contains(g, "agent unreachable") || !strings.Contains(g, "no answer") {
			return fmt.Sprintf("guest %q", g)
		}
		if st["retries"].(float64) < 2 {
			return fmt.Sprintf("retries %v", st["retries"])
		}
		for _, e := range st["endpoints"].([]any) {
			if g := e.(map[string]any)["guest"].(string); !strings.Contains(g, "agent unreachable") {
				return "endpoint guest " + g
			}
		}
		return ""
	})

	// No agent at all: a clear error too.
	if err := os.Remove(agentLink); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(dir+"/nothing.sock", agentLink); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a missing agent socket reported", func() string {
		g, _ := r.status("pod")["guest"].(string)
		if !strings.Contains(g, "agent unreachable") || !strings.Contains(g, "no such file") {
			return fmt.Sprintf("guest %q", g)
		}
		return ""
	})

	// The agent answers: the next retry configures the guest.
	agentPath := strings.TrimPrefix(r.vm.Agent, "unix://")
	if err := os.Remove(agentLink); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(agentPath, agentLink); err != nil {
		t.Fatal(err)
	}
	r.guestIface(mac, "is net1 with "+fmt.Sprint(addrs), func(i agent.Interface) bool {
		return i.Name == "net1" && sameAddrs(i.Addrs, addrs)
	})
	r.converged(time.Time{})
	if g, _ := r.status("other")["guest"].(string); !strings.Contains(g, "agent unreachable") {
		t.Errorf("other sandbox: guest %q, want its silent agent reported", g)
	}

	// The agent restarts inside the guest: the next network still reaches it.
	r.restartAgent()
	n2 := testcni.Bridge(testcni.UniqueName("net"), testcni.UniqueName("br"), testcni.Subnet4(), testcni.WithRoutes(netip.MustParsePrefix("10.195.0.0/16")))
	addrs2 := r.add(n2, "net2")
	r.guestIface(r.podLink("net2").MAC, "is net2 with "+fmt.Sprint(addrs2), func(i agent.Interface) bool {
		return i.Name == "net2" && sameAddrs(i.Addrs, addrs2)
	})
	r.converged(time.Time{})
}
