package testvm

import (
	"context"
	"os"
	"testing"
	"time"
)

// Time limits for the test helpers. Generous: a cold build downloads a
// kernel package, and TCG on a loaded two-core machine is slow.
const (
	buildTimeout = 10 * time.Minute
	startTimeout = time.Minute
	readyTimeout = 2 * time.Minute
)

// ForTest starts a VM with a guest for test t and waits for READY. It skips
// t unless running as root, builds the image (into the default cache) when
// opts.Image is nil, and stops the VM when t ends, first logging the serial
// and QEMU log tails if t failed. Use StartNoGuest for a QEMU without guest.
func ForTest(t testing.TB, opts Options) *VM {
	t.Helper()
	skipUnlessRoot(t)
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	if opts.Image == nil {
		ctx, cancel := context.WithTimeout(t.Context(), buildTimeout)
		img, err := Build(ctx, "", opts.Logf)
		cancel()
		if err != nil {
			t.Fatalf("testvm: %v", err)
		}
		opts.Image = &img
	}
	vm := startForTest(t, opts)
	ctx, cancel := context.WithTimeout(t.Context(), readyTimeout)
	defer cancel()
	if err := vm.WaitReady(ctx); err != nil {
		t.Fatalf("testvm: guest not ready: %v", err)
	}
	return vm
}

// StartNoGuest starts QEMU with no guest OS for test t (opts.Image is
// ignored): it sits in firmware, so device_add works but device_del never
// completes. Like ForTest it skips unless root and stops the VM when t ends.
func StartNoGuest(t testing.TB, opts Options) *VM {
	t.Helper()
	skipUnlessRoot(t)
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	opts.Image = nil
	return startForTest(t, opts)
}

func startForTest(t testing.TB, opts Options) *VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), startTimeout)
	defer cancel()
	vm, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("testvm: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("testvm: QEMU pid %d (alive %v) in %s\n%s", vm.Pid, vm.Alive(), vm.Dir, vm.tails())
		}
		if err := vm.Stop(); err != nil {
			t.Errorf("testvm: stop: %v", err)
		}
	})
	return vm
}

func skipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testvm: skipped, needs root (QEMU in a network namespace via nsenter, image cache in " + DefaultCacheDir + "); run as root, e.g. sudo go test")
	}
}
