package testvm

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/tapsync/tapsync/e2e/testnet"
)

// inNetNS runs f on a thread in the netns at path: sockets f makes stay
// there. No goroutines may start inside f.
func inNetNS(path string, f func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer target.Close()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		// The thread stays in the wrong netns: let it die with the
		// goroutine rather than serve another.
		return errors.Join(ferr, fmt.Errorf("leave netns %s: %w", path, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// trafficRig is a guest with one NIC wired by hand as tapsync wires it: a
// veth (eth0, the NIC's MAC) in the pod netns QEMU runs in, its peer peer0
// in a peer netns with PeerIP, and a tap (tsv0) QEMU made, joined to eth0
// by tc redirects both ways.
type trafficRig struct {
	vm         *VM
	pod, peer  testnet.NS
	guest, hst netip.Addr // GuestIP and PeerIP
}

func newTrafficRig(t *testing.T) *trafficRig {
	t.Helper()
	testnet.SkipUnlessRoot(t)
	pod := testnet.NewNS(t, "tapsync-tvm")
	peer := testnet.NewNS(t, "tapsync-tvmpeer")
	mac := TestMAC(7)
	testnet.Veth(t, pod, "eth0", mac, peer, "peer0")
	hst, _ := netip.AddrFromSlice(PeerIP(mac))
	guest, _ := netip.AddrFromSlice(GuestIP(mac))
	testnet.IP(t, "-n", peer.Name, "addr", "add", fmt.Sprintf("%s/%d", hst, PrefixLen), "dev", "peer0")

	vm := ForTest(t, Options{NetNS: pod.Path, SelfConfig: true, RootPorts: 1})
	q := dialTestQMP(t, vm.TestQMP)
	// QEMU opens (and so creates) the tap in its own netns, the pod's.
	if _, err := q.run("netdev_add", map[string]any{"type": "tap", "id": "net0", "ifname": "tsv0", "script": "no", "downscript": "no"}); err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "-n", pod.Name, "link", "set", "tsv0", "up")
	for _, dir := range [][2]string{{"eth0", "tsv0"}, {"tsv0", "eth0"}} {
		// Equivalent to what datapath does for a tcfilter endpoint.
		testnet.Run(t, "tc", "-n", pod.Name, "qdisc", "add", "dev", dir[0], "ingress")
		testnet.Run(t, "tc", "-n", pod.Name, "filter", "add", "dev", dir[0], "parent", "ffff:", "protocol", "all",
			"u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", dir[1])
	}
	off := vm.SerialOffset()
	if _, err := q.run("device_add", map[string]any{"driver": "virtio-net-pci", "id": "nic0", "netdev": "net0", "bus": "rp1", "mac": mac.String()}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if _, err := vm.WaitSerialFrom(ctx, off, NICUpRE(mac)); err != nil {
		t.Fatal(err)
	}
	return &trafficRig{vm: vm, pod: pod, peer: peer, guest: guest, hst: hst}
}

// listen listens on the peer's address in the peer netns.
func (r *trafficRig) listen(t *testing.T) net.Listener {
	t.Helper()
	var ln net.Listener
	err := inNetNS(r.peer.Path, func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(r.hst, 0).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dial connects from the peer netns.
func (r *trafficRig) dial(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := inNetNS(r.peer.Path, func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", to.String())
		return err
	})
	return c, err
}

// measure runs one stream each way and returns them (out of the guest, into it).
func (r *trafficRig) measure(t *testing.T, dur time.Duration) (out, in TCPResult) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), dur+2*time.Minute)
	defer cancel()
	out, err := r.vm.GuestTCPSend(ctx, r.guest, r.listen(t), dur)
	if err != nil {
		t.Fatal(err)
	}
	in, err = r.vm.GuestTCPReceive(ctx, netip.AddrPortFrom(r.guest, 0), dur, r.dial)
	if err != nil {
		t.Fatal(err)
	}
	return out, in
}

// TestGuestTraffic proves the traffic tools against the kernel: TCP both
// ways through a hand-wired NIC, unlimited (the numbers a rate-limit test
// needs to stay well below) and under a 5 Mbit/s tbf on the veth ends,
// which the measurement must find within ±15 %; and GuestPing with and
// without DF at the guest's MTU and at a smaller MTU further along.
func TestGuestTraffic(t *testing.T) {
	r := newTrafficRig(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	// The guest's NIC answers as soon as its neighbour entry resolves.
	if err := r.vm.GuestPing(ctx, r.hst, 56, false); err != nil {
		t.Fatal(err)
	}

	t.Run("unlimited", func(t *testing.T) {
		out, in := r.measure(t, 3*time.Second)
		t.Logf("guest → peer: %v", out)
		t.Logf("peer → guest: %v", in)
		for what, res := range map[string]TCPResult{"out of the guest": out, "into the guest": in} {
			// Far above the limit below, or the limit proves nothing.
			if res.BitsPerSec() < 20e6 {
				t.Errorf("%s: %v, want well above the 5 Mbit/s limit", what, res)
			}
		}
	})

	t.Run("tbf", func(t *testing.T) {
		const rate = 5e6
		// eth0's egress carries what the guest sends (tap → redirect →
		// eth0), peer0's what it receives.
		for _, q := range []struct{ ns, dev string }{{r.pod.Name, "eth0"}, {r.peer.Name, "peer0"}} {
			testnet.Run(t, "tc", "-n", q.ns, "qdisc", "add", "dev", q.dev, "root", "tbf", "rate", "5mbit", "burst", "32kb", "latency", "100ms")
			t.Cleanup(func() { testnet.Run(t, "tc", "-n", q.ns, "qdisc", "del", "dev", q.dev, "root") })
		}
		out, in := r.measure(t, 5*time.Second)
		t.Logf("guest → peer under tbf 5mbit: %v", out)
		t.Logf("peer → guest under tbf 5mbit: %v", in)
		for what, res := range map[string]TCPResult{"out of the guest": out, "into the guest": in} {
			if dev := res.BitsPerSec()/rate - 1; math.Abs(dev) > 0.15 {
				t.Errorf("%s under tbf rate 5mbit: %v, %+.1f %% off", what, res, dev*100)
			}
		}
	})

	t.Run("ping", func(t *testing.T) {
		ping := func(size int, df, want bool) {
			t.Helper()
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			err := r.vm.GuestPing(ctx, r.hst, size, df)
			t.Logf("ping %d bytes DF %v: %v", size, df, err)
			if want && err != nil {
				t.Errorf("ping with %d bytes (DF %v) failed: %v", size, df, err)
			}
			if !want && err == nil {
				t.Errorf("ping with %d bytes (DF %v) passed, want a failure", size, df)
			}
		}
		// The guest's MTU is 1500: DF fails at once one byte above, and
		// without DF the guest fragments.
		ping(1500-28, true, true)
		ping(1500-27, true, false)
		ping(1500-27, false, true)

		// A smaller MTU on the way (the guest still at 1500): an echo
		// that fits passes, and one the size of the guest's MTU gets no
		// reply, dropped by the veth. Not one byte above: a veth forwards
		// up to its MTU plus a VLAN header (seen: 1401 bytes pass at 1400).
		for _, l := range []struct{ ns, dev string }{{r.pod.Name, "eth0"}, {r.peer.Name, "peer0"}} {
			testnet.IP(t, "-n", l.ns, "link", "set", l.dev, "mtu", "1400")
		}
		ping(1400-28, true, true)
		ping(1500-28, true, false)
	})
}
