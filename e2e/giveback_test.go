//go:build e2e

package e2e

import (
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/reconcile"
)

// TestReconcileMacvtapGivesBackExactly: a container link furnished as a
// CNI chain with sbr and an administrator leave it (two default routes,
// an sbr table and its rules, addresses with scopes, flags, labels,
// metrics and finite lifetimes, IPv6 routes with preferences and
// expiries, a route on lo with the link's address as source) is wired in
// the macvtap model by the reconciler, and the sandbox is torn down with
// a SIGKILL after every step in turn. After every teardown the link's
// addresses, the routes of every table and the rules are as they were.
func TestReconcileMacvtapGivesBackExactly(t *testing.T) {
	r := newRig(t, 1)
	r.model = reconcile.ModelMacvtap
	eth0 := testvm.TestMAC(1)
	r.addLink("eth0", eth0)
	testnet.Furnish(t, r.sb, "eth0", 0)
	orig := testnet.Facts(t, r.sb, "eth0")
	for k := 1; ; k++ {
		off := r.vm.SerialOffset()
		r.converge()
		r.waitSerial(off, testvm.NICUpRE(eth0))
		r.check()
		if lent := testnet.Facts(t, r.sb, "eth0"); lent == orig {
			t.Fatalf("eth0 wired in the macvtap model kept everything:\n%s", lent)
		}
		off = r.vm.SerialOffset()
		r.teardown = true
		_, killed := r.reconcile(k)
		if killed {
			r.reconcile(0)
		}
		r.teardown = false
		r.waitSerial(off, testvm.NICGoneRE(eth0))
		testnet.WaitDAD(t, r.sb, "eth0")
		if now := testnet.Facts(t, r.sb, "eth0"); now != orig {
			t.Fatalf("teardown killed after step %d: eth0 and the netns's routing differ from before it was wired:\n%s", k, testnet.Diff(orig, now))
		}
		if !killed {
			t.Logf("teardown: %d steps, each crash repaired", k-1)
			break
		}
	}
}
