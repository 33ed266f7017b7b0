package datapath

import (
	"errors"
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

// TestCreateTapIsExclusive: a tap that appeared under our name between
// looking and creating (someone else's) is not attached to. Attaching
// would rewrite its vnet_hdr flag and hand its traffic to us.
func TestCreateTapIsExclusive(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-excl")
	n, err := Open(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	// Someone else's persistent tap, without vnet_hdr, under our name.
	testnet.IP(t, "-n", ns.Name, "tuntap", "add", "dev", TapName(7), "mode", "tap")
	before := testnet.IP(t, "-n", ns.Name, "-d", "link", "show", TapName(7))

	spec := TapSpec{Index: 7, Queues: 1}
	err = n.createTap(TapName(7), spec.tunFlags()|unix.IFF_TUN_EXCL)
	if !errors.Is(err, unix.EBUSY) {
		t.Fatalf("exclusive create over an existing tap = %v, want EBUSY", err)
	}
	if after := testnet.IP(t, "-n", ns.Name, "-d", "link", "show", TapName(7)); after != before {
		t.Errorf("the existing tap was changed:\n%s\n%s", before, after)
	}
}
