package reconcile

import (
	"context"
	"testing"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
)

// BenchmarkNoopPass measures a converged pass over a sandbox with two
// links against the kernel and a real QEMU: what every sandbox costs on
// each resync when nothing changed (issue 9). Profile it with
//
//	go test -run xxx -bench NoopPass -benchmem -cpuprofile cpu.out ./reconcile/
func BenchmarkNoopPass(b *testing.B) {
	ns, sock, r := qemuSandbox(b, "tapsync-noop", 2)
	sb := Sandbox{ID: "noop", Netns: ns.Path, QMP: sock, Queues: 1, Vhost: datapath.VhostOff,
		Placement: qmp.Placement{Hotplug: qmp.HotplugRootPort}}
	if _, err := r.Register(sb, SourceConfig); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	converge(b, ctx, r, sb.ID)
	// One more pass so that the model of the VM is trusted.
	if err := r.Reconcile(ctx, sb.ID); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := r.Reconcile(ctx, sb.ID); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if st, _ := r.StatusOf(sb.ID); st.Mutations != 0 || len(st.Endpoints) != 2 {
		b.Fatalf("status after the no-op passes: %d mutations, %d endpoints; want 0 and 2", st.Mutations, len(st.Endpoints))
	}
}
