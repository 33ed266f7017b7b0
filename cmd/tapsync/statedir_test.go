package main

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

// A state dir that is full fails the pass that must record, and says so:
// the log line and the errors-by-cause metric name the state, not the
// netns the pass was working on.
func TestFullStateDirIsCauseState(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	cfg := quietConfig(t)
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Equivalent to: mount -t tmpfs -o size=256k,mode=0700 tmpfs STATEDIR
	if err := unix.Mount("tmpfs", cfg.StateDir, "tmpfs", 0, "size=256k,mode=0700"); err != nil {
		t.Skipf("skipping: mount a tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(cfg.StateDir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", cfg.StateDir, err)
		}
	})
	ns, peer := testnet.NewNS(t, "tsfull"), testnet.NewNS(t, "tsfullpeer")
	qemu := startOddQEMU(t)
	one := 1
	cfg.Sandboxes = []StaticSandbox{{ID: "full", Netns: ns.Path, QMP: qemu.path, Queues: &one}}
	s := serveDaemon(t, cfg, nil)
	eventually(t, "the first pass", func() bool { return passes(t, s.d) > 0 }, s.log.String)
	fill(t, filepath.Join(cfg.StateDir, "filler"))
	testnet.Veth(t, ns, "eth0", net.HardwareAddr{0x02, 0x54, 0x53, 0, 0, 1}, peer, "peer0")
	line := ""
	// Other passes may fail too on a loaded machine (a slow monitor): the
	// one that hit the full dir is the one to read.
	eventually(t, "the failed pass logged with cause state", func() bool {
		for _, l := range strings.Split(s.log.String(), "\n") {
			if strings.Contains(l, "pass failed") && strings.Contains(l, `"cause":"state"`) {
				line = l
			}
		}
		return line != ""
	}, s.log.String)
	for _, want := range []string{`"cause":"state"`, "state: write record", "no space left on device"} {
		if !strings.Contains(line, want) {
			t.Errorf("failure line lacks %s: %s", want, line)
		}
	}
	if n := errorsByCause(t, s.d, "state"); n == 0 {
		t.Error("no error counted under cause state")
	}
	if n := errorsByCause(t, s.d, "netns"); n != 0 {
		t.Errorf("%d errors counted under cause netns for a full state dir", n)
	}
}

// fill writes path until its filesystem has no space left.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return
		}
	}
}
