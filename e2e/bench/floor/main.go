// Command tapsync-floor is the floor of the benchmarks: the least work
// that can wire container links into VMs with tapsync's design, the same
// datapath primitives and the same QMP commands, with nothing around them.
// It observes nothing, records nothing, retries nothing: it is a measuring
// stick, not a daemon. The bench (e2e/bench) starts it; nothing else should.
//
// B1 mode (-netns, -qmp): one sandbox. With its netlink subscription and
// QMP connection already open, it answers each new link with tap, ingress
// qdiscs and redirect filters (datapath), getfd/netdev_add/device_add on a
// bridge slot known in advance, and each vanished link with device_del,
// the wait for DEVICE_DELETED, netdev_del, the tap's filter and the tap.
// It prints "ready" once both are open. With -agent (B5) it also dials
// the guest's agent in advance and, after each plug, configures the guest
// as tapsync would (agent.go): it prints "configured NAME" after the
// guest's routes are sent and "unwired NAME" after a removal. With -hmp
// the socket is QEMU's
// human monitor (Kata runtime-rs's debug monitor), spoken through
// qmp.DialHMP's Client: the same three commands as HMP lines, and, there
// being no DEVICE_DELETED, the unplug polled as RemoveNICs polls it.
//
// Scale mode (-sandboxes FILE, one "NETNS-PATH QMP-SOCKET" a line), for
// B3 and B4 (see scale.go): it wires every container link of every
// sandbox at start, prints "started", then wires every link that appears
// (the storm). With -verify it does the least a restarted daemon must do
// instead (a QEMU listing and a link dump per sandbox, no mutation; with
// -verify-datapath also each endpoint's redirects and a subscription to
// every netns's link events) and prints "verified <unix µs>".
//
// In every mode it runs until its stdin closes.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"

	"github.com/tapsync/tapsync/datapath"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func main() {
	nsPath := flag.String("netns", "", "B1 mode: sandbox netns path")
	qmpPath := flag.String("qmp", "", "B1 mode: QMP socket of the VM")
	hmp := flag.Bool("hmp", false, "B1 mode: the -qmp socket is QEMU's human monitor (-monitor unix:…), spoken through qmp.DialHMP")
	bus := flag.String("bus", "pci-bridge-0", "bus of the hot-plugged NICs (a PCI bridge)")
	agentURL := flag.String("agent", "", "B5 mode: the guest agent's URL; configure the guest after each plug")
	busPath := flag.String("bus-path", "1e", "B5 mode: the PCI path of -bus from the root bus (the agent's devicePath less the slot)")
	list := flag.String("sandboxes", "", "scale mode: file of \"NETNS-PATH QMP-SOCKET\" lines")
	workers := flag.Int("workers", 4, "scale mode: sandboxes wired or verified in parallel (tapsync's default workers)")
	verify := flag.Bool("verify", false, "scale mode: verify every sandbox without mutating, as a restarted daemon must")
	verifyDatapath := flag.Bool("verify-datapath", false, "with -verify: also check every endpoint's redirects and subscribe to every netns's link events")
	flag.Parse()
	var err error
	switch {
	case *list != "" && *verify:
		err = runVerify(*list, *workers, *verifyDatapath)
	case *list != "":
		err = runScale(*list, *bus, *workers)
	default:
		err = run(*nsPath, *qmpPath, *bus, *hmp, *agentURL, *busPath)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tapsync-floor:", err)
		os.Exit(1)
	}
}

// stdinClosed is closed when the bench closes our stdin: time to go.
func stdinClosed() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString(0)
		close(ch)
	}()
	return ch
}

// nic is what wiring needs of a container link.
type nic struct {
	ifindex int
	mac     net.HardwareAddr
	mtu     int
	noARP   bool
}

// endpoint is one wired link.
type endpoint struct {
	index    int // tsn<index>, tapsync-net<index>
	tapIndex int // the tap's ifindex
	name     string
}

func run(nsPath, qmpPath, bus string, hmp bool, agentURL, busPath string) error {
	ctx := context.Background()
	ns, err := datapath.Open(nsPath)
	if err != nil {
		return err
	}
	defer ns.Close()
	h, err := netns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", nsPath, err)
	}
	defer h.Close()
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	subErr := make(chan error, 1)
	// keepErr keeps a subscription's first error for the loop below.
	keepErr := func(err error) {
		select {
		case subErr <- err:
		default:
		}
	}
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		Namespace: &h, ErrorCallback: keepErr,
	}); err != nil {
		return fmt.Errorf("subscribe to links in %s: %w", nsPath, err)
	}
	var mon plugger
	if hmp {
		mon, err = dialHMP(ctx, qmpPath)
	} else {
		mon, err = dialQMP(qmpPath)
	}
	if err != nil {
		return err
	}
	defer mon.close()
	var guest *guestSide
	if agentURL != "" {
		c, err := dialGuest(ctx, agentURL)
		if err != nil {
			return err
		}
		defer c.Close()
		nl, err := netlink.NewHandleAt(h)
		if err != nil {
			return fmt.Errorf("netlink handle in %s: %w", nsPath, err)
		}
		defer nl.Close()
		addrs := make(chan netlink.AddrUpdate, 256)
		if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{
			Namespace: &h, ErrorCallback: keepErr,
		}); err != nil {
			return fmt.Errorf("subscribe to addresses in %s: %w", nsPath, err)
		}
		guest = &guestSide{agent: c, nl: nl, addrs: addrs, busPath: busPath}
	}
	fmt.Println("ready")

	stop := stdinClosed()

	wired := map[int]endpoint{} // container ifindex → endpoint
	for {
		select {
		case <-stop:
			return nil
		case err := <-subErr:
			return fmt.Errorf("link subscription in %s: %w", nsPath, err)
		case u, ok := <-updates:
			if !ok {
				return fmt.Errorf("link subscription in %s closed", nsPath)
			}
			a := u.Link.Attrs()
			if !containerLink(u.Link) {
				continue
			}
			e, have := wired[a.Index]
			switch {
			case u.Header.Type == unix.RTM_NEWLINK && !have:
				link := nic{a.Index, a.HardwareAddr, a.MTU, noARP(a)}
				index := freeIndex(wired)
				e, err := wire(ctx, ns, mon, bus, index, link)
				if err != nil {
					return err
				}
				e.name = a.Name
				wired[a.Index] = e
				if guest != nil {
					if err := guest.configure(ctx, ns, e, link, 32-index, wired); err != nil {
						return err
					}
					fmt.Println("configured", a.Name)
				}
			case u.Header.Type == unix.RTM_DELLINK && have:
				if err := unwire(ctx, ns, mon, a.Index, e); err != nil {
					return err
				}
				delete(wired, a.Index)
				if guest != nil {
					fmt.Println("unwired", a.Name)
				}
			}
		}
	}
}

// containerLink: a veth the bench put there, not loopback nor our taps.
func containerLink(l netlink.Link) bool {
	_, tap := datapath.ParseTapName(l.Attrs().Name)
	return l.Type() == "veth" && !tap
}

func freeIndex(wired map[int]endpoint) int {
	for i := 1; ; i++ {
		used := false
		for _, e := range wired {
			used = used || e.index == i
		}
		if !used {
			return i
		}
	}
}

// wire is the add path: tap → qdiscs and filters → getfd → netdev_add →
// device_add into bridge slot 32-index (tapsync's bridge placement takes
// slots from the top too).
func wire(ctx context.Context, ns *datapath.Netns, mon plugger, bus string, index int, link nic) (endpoint, error) {
	spec := datapath.TapSpec{Index: index, Queues: 1, MTU: link.mtu}
	tap, err := ns.EnsureTap(ctx, spec)
	if err != nil {
		return endpoint{}, err
	}
	q, err := ns.OpenQueues(ctx, spec, datapath.VhostAuto)
	if err != nil {
		return endpoint{}, err
	}
	defer q.Close()
	if err := ns.EnsureRedirects(link.ifindex, tap.Ifindex); err != nil {
		return endpoint{}, err
	}
	if len(q.Vhost) > 0 {
		return endpoint{}, errors.New("vhost-net fds: the floor passes none (tapsync's default here neither)")
	}
	if err := mon.plug(ctx, index, q.Tap[0], link, bus, 32-index); err != nil {
		return endpoint{}, err
	}
	return endpoint{index: index, tapIndex: tap.Ifindex}, nil
}

// unwire is the remove path in the design's order: device_del → wait
// until the device is gone → netdev_del → redirects → tap.
func unwire(ctx context.Context, ns *datapath.Netns, mon plugger, container int, e endpoint) error {
	if err := mon.unplug(ctx, e.index); err != nil {
		return err
	}
	if err := ns.RemoveRedirects(container, e.tapIndex); err != nil {
		return err
	}
	return ns.RemoveTap(e.index)
}
