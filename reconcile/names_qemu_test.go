package reconcile

import (
	"fmt"
	"testing"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
)

// Pod links named as our devices (Multus interfaces tsn0 and tsm1, a
// link with the altname tsn2) are wired like any other link, under
// indexes whose names are free: a new endpoint given index 0 would need a
// tap tsn0, which the kernel already has as a veth, and the sandbox would
// fail every pass.
func TestPodLinksNamedLikeOurs(t *testing.T) {
	g := newModelRig(t, 0)
	testnet.Veth(t, g.ns, "tsn0", macN(1), g.peer, "peer0")
	testnet.Veth(t, g.ns, "tsm1", macN(2), g.peer, "peer1")
	testnet.Veth(t, g.ns, "net2", macN(3), g.peer, "peer2")
	testnet.IP(t, "-n", g.ns.Name, "link", "property", "add", "dev", "net2", "altname", "tsn2")
	if _, err := g.pass(t); err != nil {
		t.Fatalf("pass over pod links named tsn0, tsm1 and (altname) tsn2: %v\n%s", err, g.log)
	}
	rec, err := g.store.Load(g.ctx, g.sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for _, e := range rec.Endpoints {
		got[e.LinkName] = e.Index
	}
	if want := map[string]int{"tsn0": 3, "tsm1": 4, "net2": 5}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("endpoints %v, want %v", got, want)
	}
	h, err := datapath.Open(g.ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	taps, err := h.Taps()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tp := range taps {
		names = append(names, tp.Name)
	}
	if fmt.Sprint(names) != "[tsn3 tsn4 tsn5]" {
		t.Errorf("our taps %v, want [tsn3 tsn4 tsn5]", names)
	}
	if n, err := g.pass(t); err != nil || n != 0 {
		t.Errorf("the next pass: %d QMP commands, err %v; want none", n, err)
	}
}

// squatAfterObserve makes the rig's next pass find a bridge named name in
// the netns once it has observed it: the pass plans as if the name were
// free, and the step that needs it fails on the host side. The endpoint
// recorded meanwhile keeps its index, so later passes fail there too.
func (g *modelRig) squatAfterObserve(t *testing.T, name string) {
	t.Helper()
	g.r.afterObserve = func(string) {
		g.r.afterObserve = nil
		testnet.IP(t, "-n", g.ns.Name, "link", "add", name, "type", "bridge")
	}
}
