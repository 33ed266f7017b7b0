//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
)

// pingable waits until the guest answers ping from the host netns, and
// fails with ping's last output when it does not within the deadline.
func pingable(t *testing.T, host testnet.NS, ip net.IP) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command("ip", "netns", "exec", host.Name, "ping", "-c", "1", "-W", "1", ip.String()).CombinedOutput()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest %s not reachable from %s: %v\n%s", ip, host.Name, err, out)
		}
	}
}

func link(t *testing.T, n *datapath.Netns, name string) datapath.Link {
	t.Helper()
	links, err := n.ContainerLinks()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(links, func(l datapath.Link) bool { return l.Name == name })
	if i < 0 {
		t.Fatalf("no link %s in %v", name, links)
	}
	return links[i]
}

// TestHotplugPingAndRemove wires two container links into a running guest
// with datapath and qmp alone (one single-queue, one multiqueue), pings the
// guest through each redirect, then unwires them and checks that nothing
// of ours is left on the host or in QEMU.
func TestHotplugPingAndRemove(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	sb := testnet.NewNS(t, "tapsync-e2e")
	host := testnet.NewNS(t, "tapsync-e2ehost")
	type ep struct {
		name, peer string
		mac        net.HardwareAddr
		index      int
		queues     int
	}
	eps := []ep{
		{"eth0", "host0", testvm.TestMAC(1), 0, 1},
		{"net1", "host1", testvm.TestMAC(2), 1, 2},
	}
	for _, e := range eps {
		testnet.Veth(t, sb, e.name, e.mac, host, e.peer)
		testnet.IP(t, "-n", host.Name, "addr", "add", fmt.Sprintf("%s/%d", testvm.PeerIP(e.mac), testvm.PrefixLen), "dev", e.peer)
	}
	vm := testvm.ForTest(t, testvm.Options{NetNS: sb.Path, SelfConfig: true})

	n, err := datapath.Open(sb.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	c, err := qmp.Dial(ctx, vm.QMP, qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	for _, e := range eps {
		l := link(t, n, e.name)
		spec := datapath.TapSpec{Index: e.index, Queues: e.queues, MTU: l.MTU}
		tap, err := n.EnsureTap(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.EnsureRedirects(l.Ifindex, tap.Ifindex); err != nil {
			t.Fatal(err)
		}
		q, err := n.OpenQueues(ctx, spec, datapath.VhostAuto)
		if err != nil {
			t.Fatal(err)
		}
		off := vm.SerialOffset()
		info, err := c.AddNIC(ctx, qmp.NIC{Index: e.index, MAC: e.mac, TapFDs: q.Tap, VhostFDs: q.Vhost})
		if err != nil {
			t.Fatal(err)
		}
		if info.ID != qmp.DeviceID(e.index) || info.MAC.String() != e.mac.String() {
			t.Errorf("AddNIC = %+v", info)
		}
		if _, err := vm.WaitSerialFrom(ctx, off, testvm.NICUpRE(e.mac)); err != nil {
			t.Fatal(err)
		}
		pingable(t, host, testvm.GuestIP(e.mac))
		if got := tapOf(t, n, e.index).Attached; got != e.queues {
			t.Errorf("%s: QEMU holds %d queues, want %d", e.name, got, e.queues)
		}
	}

	for _, e := range eps {
		l := link(t, n, e.name)
		tap := tapOf(t, n, e.index)
		off := vm.SerialOffset()
		if err := c.RemoveNIC(ctx, e.index, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		if _, err := vm.WaitSerialFrom(ctx, off, testvm.NICGoneRE(e.mac)); err != nil {
			t.Fatal(err)
		}
		if err := n.RemoveRedirects(l.Ifindex, tap.Ifindex); err != nil {
			t.Fatal(err)
		}
		if err := n.RemoveTap(e.index); err != nil {
			t.Fatal(err)
		}
	}
	assertNothingOurs(t, ctx, n, c)
	if !vm.Alive() {
		t.Error("QEMU died during the test")
	}
}

func tapOf(t *testing.T, n *datapath.Netns, index int) datapath.Tap {
	t.Helper()
	taps, err := n.Taps()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(taps, func(tp datapath.Tap) bool { return tp.Index == index })
	if i < 0 {
		t.Fatalf("no tap %d in %v", index, taps)
	}
	return taps[i]
}

// assertNothingOurs checks that no tap, filter, netdev or device of ours
// is left.
func assertNothingOurs(t *testing.T, ctx context.Context, n *datapath.Netns, c *qmp.Client) {
	t.Helper()
	st, err := n.Observe(datapath.All)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Taps) != 0 {
		t.Errorf("taps left: %v", st.Taps)
	}
	if len(st.Redirects) != 0 {
		t.Errorf("redirects left: %v", st.Redirects)
	}
	nics, err := c.ListNICs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(nics) != 0 {
		t.Errorf("NICs left in QEMU: %+v", nics)
	}
	netdevs, err := c.ListNetdevs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(netdevs, func(id string) bool { return strings.HasPrefix(id, "tapsync-") }) {
		t.Errorf("netdevs left in QEMU: %v", netdevs)
	}
}

func openNetns(t *testing.T, path string) *datapath.Netns {
	t.Helper()
	n, err := datapath.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}
