package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/reconcile"
)

// `tapsync plan` changes nothing: against a real netns with a container
// link to wire and a real QEMU, computing the plan leaves the netns's
// links, the QEMU's devices and the state dir (a bad record included)
// exactly as they were.
func TestPlanHasNoSideEffects(t *testing.T) {
	ns := testnet.NewNS(t, "tsplan")
	peer := testnet.NewNS(t, "tsplanpeer")
	testnet.Veth(t, ns, "eth0", testvm.TestMAC(1), peer, "p0")
	vm := testvm.StartNoGuest(t, testvm.Options{NetNS: ns.Path})

	cfg := quietConfig(t)
	cfg.NetnsDir = filepath.Dir(ns.Path)
	cfg.Guest.Agent = GuestAgentNone
	d, err := newDaemon(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.rec.Close)
	if _, err := d.rec.Register(d.sandboxFor("sb", ns.Path, vm.QMP, nil, "", overrides{}), reconcile.SourceConfig); err != nil {
		t.Fatal(err)
	}
	record := filepath.Join(cfg.StateDir, "sb.json")
	if err := os.WriteFile(record, []byte("not a record"), 0o600); err != nil {
		t.Fatal(err)
	}
	links := func() string { return testnet.IP(t, "-n", ns.Name, "-o", "link", "show") }
	dir := func() []string {
		ents, err := os.ReadDir(cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		return names
	}
	beforeLinks, beforeDir := links(), dir()

	for range 2 {
		p, err := d.plan(context.Background(), "sb")
		if err != nil {
			t.Fatal(err)
		}
		if len(p.Actions) == 0 {
			t.Fatalf("plan is empty; want the actions that would wire eth0 (skipped: %+v)", p.Skipped)
		}
	}
	if after := links(); after != beforeLinks {
		t.Errorf("links changed by plan:\nbefore %s\nafter  %s", beforeLinks, after)
	}
	if after := dir(); !slices.Equal(after, beforeDir) {
		t.Errorf("state dir changed by plan: %v → %v", beforeDir, after)
	}
	if b, _ := os.ReadFile(record); string(b) != "not a record" {
		t.Errorf("record changed by plan: %q", b)
	}
}
