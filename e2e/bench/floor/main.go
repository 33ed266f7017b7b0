// Command tapsync-floor is the floor of the B1/B1' benchmarks: the least
// work that can wire a container link into a VM with tapsync's design. It
// subscribes to link events in one sandbox netns and, with the netlink
// subscription and the QMP connection already open, answers each new link
// with exactly the primitive calls — tap, ingress qdiscs and redirect filters
// (datapath), getfd/netdev_add/device_add on a slot it knows in advance — and
// each vanished link with device_del, the wait for DEVICE_DELETED,
// netdev_del, the tap's filter and the tap. It observes nothing, records
// nothing, retries nothing: it is a measuring stick, not a daemon.
//
// It prints "ready" on stdout once both connections are open and runs until
// its stdin closes. The bench (e2e/bench) starts it; nothing else should.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func main() {
	nsPath := flag.String("netns", "", "sandbox netns path")
	qmpPath := flag.String("qmp", "", "QMP socket of the VM")
	bus := flag.String("bus", "pci-bridge-0", "bus of the hot-plugged NICs (a PCI bridge)")
	flag.Parse()
	if err := run(*nsPath, *qmpPath, *bus); err != nil {
		fmt.Fprintln(os.Stderr, "tapsync-floor:", err)
		os.Exit(1)
	}
}

// endpoint is one wired link.
type endpoint struct {
	index    int // tsn<index>, tapsync-net<index>
	tapIndex int // the tap's ifindex
}

func run(nsPath, qmpPath, bus string) error {
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
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		Namespace: &h,
		ErrorCallback: func(err error) {
			select {
			case subErr <- err:
			default:
			}
		},
	}); err != nil {
		return fmt.Errorf("subscribe to links in %s: %w", nsPath, err)
	}
	mon, err := dialQMP(qmpPath)
	if err != nil {
		return err
	}
	defer mon.close()
	fmt.Println("ready")

	stdinClosed := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString(0)
		close(stdinClosed)
	}()

	wired := map[int]endpoint{} // container ifindex → endpoint
	for {
		select {
		case <-stdinClosed:
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
				e, err := wire(ctx, ns, mon, bus, freeIndex(wired), a)
				if err != nil {
					return err
				}
				wired[a.Index] = e
			case u.Header.Type == unix.RTM_DELLINK && have:
				if err := unwire(ctx, ns, mon, a.Index, e); err != nil {
					return err
				}
				delete(wired, a.Index)
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
func wire(ctx context.Context, ns *datapath.Netns, mon *monitor, bus string, index int, link *netlink.LinkAttrs) (endpoint, error) {
	spec := datapath.TapSpec{Index: index, Queues: 1, MTU: link.MTU}
	tap, err := ns.EnsureTap(ctx, spec)
	if err != nil {
		return endpoint{}, err
	}
	q, err := ns.OpenQueues(ctx, spec, datapath.VhostAuto)
	if err != nil {
		return endpoint{}, err
	}
	defer q.Close()
	if err := ns.EnsureRedirects(link.Index, tap.Ifindex); err != nil {
		return endpoint{}, err
	}
	fd := fmt.Sprintf("floor-fd%d", index)
	if err := mon.run("getfd", map[string]any{"fdname": fd}, q.Tap[0]); err != nil {
		return endpoint{}, err
	}
	args := map[string]any{"type": "tap", "id": qmp.NetdevID(index), "fds": fd}
	if len(q.Vhost) > 0 {
		return endpoint{}, errors.New("vhost-net fds: the floor passes none (tapsync's default here neither)")
	}
	if err := mon.run("netdev_add", args, nil); err != nil {
		return endpoint{}, err
	}
	dev := map[string]any{
		"driver": "virtio-net-pci", "id": qmp.DeviceID(index), "netdev": qmp.NetdevID(index),
		"mac": link.HardwareAddr.String(), "bus": bus, "addr": fmt.Sprintf("%#x", 32-index), "romfile": "",
	}
	if link.MTU > 0 {
		dev["host_mtu"] = link.MTU
	}
	if err := mon.run("device_add", dev, nil); err != nil {
		return endpoint{}, err
	}
	return endpoint{index: index, tapIndex: tap.Ifindex}, nil
}

// unwire is the remove path in the design's order: device_del → wait for
// DEVICE_DELETED → netdev_del → redirects → tap.
func unwire(ctx context.Context, ns *datapath.Netns, mon *monitor, container int, e endpoint) error {
	id := qmp.DeviceID(e.index)
	gone := mon.expectDeleted(id)
	if err := mon.run("device_del", map[string]any{"id": id}, nil); err != nil {
		return err
	}
	select {
	case <-gone:
	case <-time.After(time.Minute):
		return fmt.Errorf("no DEVICE_DELETED for %s within a minute", id)
	}
	if err := mon.run("netdev_del", map[string]any{"id": qmp.NetdevID(e.index)}, nil); err != nil {
		return err
	}
	if err := ns.RemoveRedirects(container, e.tapIndex); err != nil {
		return err
	}
	return ns.RemoveTap(e.index)
}

// monitor is the smallest QMP client that can pass fds: qmp.Client
// passes them only inside AddNIC, which adds its idempotency lookups —
// exactly the overhead the floor leaves out.
type monitor struct {
	conn    *net.UnixConn
	mu      sync.Mutex
	next    int
	replies map[string]chan error
	deleted map[string]chan struct{}
	dead    chan struct{}
	err     error
}

func dialQMP(path string) (*monitor, error) {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("dial QMP %s: %w", path, err)
	}
	m := &monitor{conn: c.(*net.UnixConn), replies: map[string]chan error{}, deleted: map[string]chan struct{}{}, dead: make(chan struct{})}
	r := bufio.NewReaderSize(c, 64<<10)
	if _, err := r.ReadBytes('\n'); err != nil { // the greeting
		c.Close()
		return nil, fmt.Errorf("QMP greeting on %s: %w", path, err)
	}
	go m.read(r)
	if err := m.run("qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return m, nil
}

func (m *monitor) close() { m.conn.Close() }

func (m *monitor) read(r *bufio.Reader) {
	defer close(m.dead)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			m.err = err
			return
		}
		var msg struct {
			ID    string `json:"id"`
			Error *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
			Data  struct {
				Device string `json:"device"`
			} `json:"data"`
		}
		if json.Unmarshal(line, &msg) != nil {
			continue
		}
		m.mu.Lock()
		if msg.Event == "DEVICE_DELETED" {
			if ch, ok := m.deleted[msg.Data.Device]; ok {
				close(ch)
				delete(m.deleted, msg.Data.Device)
			}
		} else if ch, ok := m.replies[msg.ID]; ok {
			delete(m.replies, msg.ID)
			if msg.Error != nil {
				ch <- fmt.Errorf("%s: %s", msg.Error.Class, msg.Error.Desc)
			} else {
				ch <- nil
			}
		}
		m.mu.Unlock()
	}
}

func (m *monitor) expectDeleted(id string) <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch := make(chan struct{})
	m.deleted[id] = ch
	return ch
}

// run sends one command, with f's fd in SCM_RIGHTS when f is not nil, and
// waits for its reply.
func (m *monitor) run(cmd string, args any, f *os.File) error {
	m.mu.Lock()
	m.next++
	id := fmt.Sprintf("floor-%d", m.next)
	ch := make(chan error, 1)
	m.replies[id] = ch
	m.mu.Unlock()
	msg := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		msg["arguments"] = args
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	var oob []byte
	if f != nil {
		oob = unix.UnixRights(int(f.Fd()))
	}
	if _, _, err := m.conn.WriteMsgUnix(append(b, '\n'), oob, nil); err != nil {
		return fmt.Errorf("QMP %s: %w", cmd, err)
	}
	select {
	case err := <-ch:
		if err != nil {
			return fmt.Errorf("QMP %s %s: %w", cmd, strings.TrimSpace(string(b)), err)
		}
		return nil
	case <-m.dead:
		return fmt.Errorf("QMP %s: connection closed: %v", cmd, m.err)
	case <-time.After(30 * time.Second):
		return fmt.Errorf("QMP %s: no reply within 30s", cmd)
	}
}
