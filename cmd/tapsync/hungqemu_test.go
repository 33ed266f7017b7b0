package main

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
)

// Hung QEMUs hold no worker: with 2 workers, a 30 s QMP timeout and 4
// sandboxes whose QEMU is stopped (the kernel accepts the connection,
// QEMU never greets), a healthy sandbox's new link is wired while the
// hung sandboxes' dials are still under way. Holding a worker per dial,
// the link would wait for two rounds of the timeout.
func TestHungQEMUsDoNotDelayOthers(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	one := 1
	cfg := quietConfig(t)
	cfg.Workers = 2
	cfg.Defaults.QMPTimeout = 30 * time.Second
	cfg.Guest.Agent = GuestAgentNone
	healthyNS, peer := testnet.NewNS(t, "tshealthy"), testnet.NewNS(t, "tshealthypeer")
	healthy := testvm.StartNoGuest(t, testvm.Options{NetNS: healthyNS.Path})
	// The healthy sandbox comes first: its first pass is done before the
	// hung ones are taken up.
	cfg.Sandboxes = []StaticSandbox{{ID: "healthy", Netns: healthyNS.Path, QMP: healthy.QMP, Queues: &one}}
	var hung []string
	for i := range 4 {
		ns := testnet.NewNS(t, "tshung")
		vm := testvm.StartNoGuest(t, testvm.Options{NetNS: ns.Path})
		if err := syscall.Kill(vm.Pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Kill(vm.Pid, syscall.SIGCONT) }) // before the VM's own cleanup stops it
		id := fmt.Sprintf("hung%d", i)
		hung = append(hung, id)
		cfg.Sandboxes = append(cfg.Sandboxes, StaticSandbox{ID: id, Netns: ns.Path, QMP: vm.QMP, Queues: &one})
	}
	s := serveDaemon(t, cfg, nil)
	statuses := func() string {
		var b strings.Builder
		for _, st := range s.d.rec.Status() {
			fmt.Fprintf(&b, "\n%s: endpoints %d, error %q", st.Sandbox.ID, len(st.Endpoints), st.LastError)
		}
		return b.String()
	}
	eventually(t, "the healthy sandbox's first pass", func() bool {
		st := s.d.status("healthy")
		return !st.LastReconcile.IsZero() && st.LastError == ""
	}, statuses)

	testnet.Veth(t, healthyNS, "eth0", net.HardwareAddr{0x02, 0x54, 0x53, 0, 0, 7}, peer, "peer0")
	eventually(t, "the healthy sandbox's new link wired", func() bool {
		st := s.d.status("healthy")
		return st.LastError == "" && slices.ContainsFunc(st.Endpoints, func(e state.Endpoint) bool { return e.LinkName == "eth0" })
	}, statuses)
	for _, id := range hung {
		if e := s.d.status(id).LastError; !strings.Contains(e, reconcile.ErrConnecting.Error()) {
			t.Errorf("%s: last error %q; want its dial still under way (%q)", id, e, reconcile.ErrConnecting)
		}
	}
}
