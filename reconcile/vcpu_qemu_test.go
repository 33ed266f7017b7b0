package reconcile

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

// queues = 0 gives an endpoint one queue per vCPU the VM has when the
// endpoint is made: a vCPU hot-added after the connection (as Kata does
// for a container's CPU limit) counts for the next endpoint, and the
// endpoints made before keep their count.
func TestQueuesFollowHotAddedVCPUs(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-vcpu")
	peer := testnet.NewNS(t, "tapsync-vcpupeer")
	testnet.Veth(t, ns, "net0", macN(1), peer, "peer0")
	sock, test := startQEMU(t, "-smp", "1,maxcpus=4")
	store, err := state.Open(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	r := New(store)
	t.Cleanup(r.Close)
	sb := Sandbox{ID: "vcpu", Netns: ns.Path, QMP: sock, Queues: 0, Vhost: datapath.VhostOff, UnplugTimeout: 5 * time.Second,
		Placement: qmp.Placement{Hotplug: qmp.HotplugRootPort}}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	converge(t, ctx, r, sb.ID)

	outside, err := qmp.Dial(ctx, test, qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer outside.Close()
	// Equivalent to: (qemu) device_add qemu64-x86_64-cpu,id=cpu1,socket-id=0,core-id=1,thread-id=0
	if _, err := outside.Run([]byte(`{"execute": "device_add", "arguments": {"driver": "qemu64-x86_64-cpu", "id": "cpu1",
		"socket-id": 0, "core-id": 1, "thread-id": 0}}`)); err != nil {
		t.Fatalf("hot-add a vCPU: %v", err)
	}
	testnet.Veth(t, ns, "net1", macN(2), peer, "peer1")
	converge(t, ctx, r, sb.ID)

	rec, err := store.Load(ctx, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"net0": 1, "net1": 2}
	for _, e := range rec.Endpoints {
		if e.Queues != want[e.LinkName] {
			t.Errorf("endpoint %d (%s): %d queues, want %d", e.Index, e.LinkName, e.Queues, want[e.LinkName])
		}
	}
	if len(rec.Endpoints) != 2 {
		t.Errorf("record %+v, want two endpoints", rec.Endpoints)
	}
}
