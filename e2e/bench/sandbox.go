package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// sandbox is one throwaway netns with a QEMU in it and a netlink handle
// of the bench's own, to add and delete its container links.
type sandbox struct {
	id    string
	name  string // netns name under /var/run/netns
	path  string
	ns    netns.NsHandle
	nl    *netlink.Handle
	vm    *testvm.VM
	trace *qemuTrace
}

func sh(args ...string) error {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// newNetns adds a named netns (ip netns add) and opens it.
func newNetns(name string) (string, netns.NsHandle, error) {
	if err := sh("ip", "netns", "add", name); err != nil {
		return "", 0, err
	}
	path := "/var/run/netns/" + name
	h, err := netns.GetFromPath(path)
	if err != nil {
		_ = sh("ip", "netns", "del", name)
		return "", 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	return path, h, nil
}

// newSandbox makes the netns and starts QEMU in it (see startVM).
func newSandbox(ctx context.Context, id, nsName, dir string, opts testvm.Options) (*sandbox, error) {
	s := &sandbox{id: id, name: nsName}
	var err error
	if s.path, s.ns, err = newNetns(nsName); err != nil {
		return nil, err
	}
	if s.nl, err = netlink.NewHandleAt(s.ns); err != nil {
		s.close()
		return nil, fmt.Errorf("netlink handle in %s: %w", s.path, err)
	}
	if err := s.startVM(ctx, dir, opts); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// startVM starts QEMU in the sandbox netns with its files in dir
// (opts.NetNS and opts.Dir are set here); the QEMU traces its QMP
// traffic into dir/trace.log, which s.trace reads.
func (s *sandbox) startVM(ctx context.Context, dir string, opts testvm.Options) error {
	trace := filepath.Join(dir, "trace.log")
	opts.NetNS, opts.Dir = s.path, dir
	opts.Args = append(append([]string(nil), opts.Args...), traceArgs(trace)...)
	vm, err := testvm.Start(ctx, opts)
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", s.id, err)
	}
	s.vm, s.trace = vm, newTrace(trace)
	return nil
}

// renew gives the sandbox a clean slate in the same netns: its QEMU is
// stopped (a paused VM without guest OS never completes a device_del, so
// one that has NICs plugged cannot be emptied), every link but loopback
// is deleted (the taps outlive QEMU, being persistent; a veth takes its
// peer, ingress qdisc and filters with it), and a new QEMU starts with
// its files in dir. The caller adds the container links again.
func (s *sandbox) renew(ctx context.Context, dir string, opts testvm.Options) error {
	if err := s.vm.Stop(); err != nil {
		return fmt.Errorf("sandbox %s: %w", s.id, err)
	}
	s.vm = nil
	links, err := s.nl.LinkList()
	if err != nil {
		return fmt.Errorf("list links in %s: %w", s.path, err)
	}
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		// Equivalent to: ip -n NS link del NAME
		if err := s.nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete %s in %s: %w", l.Attrs().Name, s.path, err)
		}
	}
	return s.startVM(ctx, dir, opts)
}

func (s *sandbox) close() {
	if s.vm != nil {
		_ = s.vm.Stop()
	}
	if s.nl != nil {
		s.nl.Close()
	}
	if s.ns != 0 {
		s.ns.Close()
	}
	_ = sh("ip", "netns", "del", s.name)
}

// pauseAfterFirmware pauses a VM without guest OS once its firmware has
// numbered the pci-bridge's secondary bus (polling query-pci on the test
// monitor), then stops it. Not -S: in a VM paused before its firmware ran,
// every bus number is 0, and tapsync's placement (query-pci) cannot see
// the NICs it put behind the bridge; firmware left running, on the other
// hand, costs about 0.8 % of a CPU per TCG QEMU, all of two cores at 250.
func (s *sandbox) pauseAfterFirmware(ctx context.Context) error {
	c, err := qmp.Dial(ctx, s.vm.TestQMP, qmp.Options{})
	if err != nil {
		return err
	}
	defer c.Close()
	err = eventually(ctx, time.Minute, 20*time.Millisecond, "firmware numbered the bridge", func() (bool, string, error) {
		out, err := c.Run([]byte(`{"execute": "query-pci"}`))
		if err != nil {
			return false, "", err
		}
		var r struct {
			Return []struct {
				Devices []struct {
					QDevID string `json:"qdev_id"`
					Bridge *struct {
						Bus struct{ Secondary int } `json:"bus"`
					} `json:"pci_bridge"`
				} `json:"devices"`
			} `json:"return"`
		}
		if err := json.Unmarshal(out, &r); err != nil {
			return false, "", err
		}
		for _, b := range r.Return {
			for _, d := range b.Devices {
				if d.QDevID == testvm.BridgeID && d.Bridge != nil && d.Bridge.Bus.Secondary != 0 {
					return true, "", nil
				}
			}
		}
		return false, "bridge secondary bus still 0", nil
	})
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", s.id, err)
	}
	// Equivalent to: {"execute": "stop"}
	if _, err := c.Run([]byte(`{"execute": "stop"}`)); err != nil {
		return fmt.Errorf("sandbox %s: stop: %w", s.id, err)
	}
	return nil
}

// addLink adds a veth named name, up, with mac, its peer (peer) in the
// peer netns: what a CNI plugin leaves in a pod's netns.
func (s *sandbox) addLink(name string, mac net.HardwareAddr, peer string, peerNS netns.NsHandle) error {
	la := netlink.NewLinkAttrs()
	la.Name, la.HardwareAddr, la.Flags = name, mac, net.FlagUp
	// Equivalent to: ip -n NS link add NAME address MAC up type veth peer name PEER netns PEERNS
	if err := s.nl.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peer, PeerNamespace: netlink.NsFd(int(peerNS))}); err != nil {
		return fmt.Errorf("add veth %s in %s: %w", name, s.path, err)
	}
	return nil
}

func (s *sandbox) delLink(name string) error {
	l, err := s.nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", name, s.path, err)
	}
	if err := s.nl.LinkDel(l); err != nil {
		return fmt.Errorf("delete %s in %s: %w", name, s.path, err)
	}
	return nil
}

// parallel runs fn(i) for i in [0,n) on `workers` goroutines and returns the
// first error; after one, no new i starts.
func parallel(n, workers int, fn func(i int) error) error {
	g, ctx := errgroup.WithContext(context.Background())
	g.SetLimit(workers)
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		g.Go(func() error { return fn(i) })
	}
	return g.Wait()
}

// eventually calls done every `every` until it reports true, an error, or
// the limit passes (then the error says what was last seen). It waits for
// the end of a measured operation; the figures come from timestamps, not
// from when this loop noticed.
func eventually(ctx context.Context, limit, every time.Duration, what string, done func() (bool, string, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, last, err := done()
		if err != nil || ok {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %v (last seen: %s)", what, limit, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(every):
		}
	}
}

// memAvailable is MemAvailable from /proc/meminfo, in bytes.
func memAvailable() (int64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(line, "MemAvailable: %d kB", &kb); err == nil {
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no MemAvailable in /proc/meminfo")
}
