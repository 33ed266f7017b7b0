package datapath

import (
	"context"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

// A macvtap link deleted between reading its device numbers and opening
// them, its minor taken meanwhile by another pod's macvtap of the same
// name (net1 is common): the queue opened would be the other pod's, and
// is refused, naming the link.
func TestMacvtapQueueOfAnotherPodRefused(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	mine, other := testnet.NewNS(t, "tapsync-mvA"), testnet.NewNS(t, "tapsync-mvB")
	for _, ns := range []testnet.NS{mine, other} {
		testnet.IP(t, "-n", ns.Name, "link", "add", "lower", "type", "veth", "peer", "name", "lowerpeer")
		testnet.IP(t, "-n", ns.Name, "link", "set", "lower", "up")
	}
	testnet.IP(t, "-n", mine.Name, "link", "add", "link", "lower", "name", "net1", "type", "macvtap", "mode", "bridge")
	n, err := Open(mine.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	m, err := n.macvtap("net1")
	if err != nil {
		t.Fatal(err)
	}
	before, err := n.macvtapDevNum("net1", m.Attrs().Index)
	if err != nil {
		t.Fatal(err)
	}
	o, err := Open(other.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	swapped := false
	macvtapOpening = func(string) {
		macvtapOpening = nil
		// CNI DEL of my pod, then CNI ADD of the other's.
		testnet.IP(t, "-n", mine.Name, "link", "del", "net1")
		testnet.IP(t, "-n", other.Name, "link", "add", "link", "lower", "name", "net1", "type", "macvtap", "mode", "bridge")
		om, err := o.macvtap("net1")
		if err != nil {
			t.Fatal(err)
		}
		dev, err := o.macvtapDevNum("net1", om.Attrs().Index)
		if err != nil {
			t.Fatal(err)
		}
		swapped = dev == before
	}
	t.Cleanup(func() { macvtapOpening = nil })
	q, err := n.OpenMacvtapLinkQueues(context.Background(), "net1", 1, VhostOff)
	if !swapped {
		if q != nil {
			q.Close()
		}
		t.Skipf("the other pod's macvtap did not get minor %d (another macvtap took it)", unix.Minor(before))
	}
	if err == nil {
		q.Close()
		t.Fatal("a queue of the other pod's macvtap net1 was handed out")
	}
	if !strings.Contains(err.Error(), "net1") || !strings.Contains(err.Error(), mine.Path) {
		t.Errorf("refusal %q does not name net1 in %s", err, mine.Path)
	}
	t.Log(err)
}
