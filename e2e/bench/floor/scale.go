package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// sandbox is one netns and its VM in scale mode.
type sandbox struct {
	path, qmpPath string
	nsid          int32 // the netns's nsid in ours, which the subscription reports

	// mu: one wiring at a time per sandbox, as tapsync's queue never
	// hands a sandbox to two workers. It guards the fields below.
	mu    sync.Mutex
	ns    *datapath.Netns
	mon   *monitor
	wired map[int]endpoint // container ifindex → endpoint
}

func readSandboxes(file string) ([]*sandbox, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var sbs []*sandbox
	for n, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("%s line %d: want \"NETNS-PATH QMP-SOCKET\", got %q", file, n+1, line)
		}
		sbs = append(sbs, &sandbox{path: f[0], qmpPath: f[1], wired: map[int]endpoint{}})
	}
	return sbs, nil
}

// runScale is the floor of B3: at start, wire every container link of
// every sandbox (workers sandboxes at a time); then wire each container
// link that appears, until stdin closes. One netlink socket hears every
// sandbox (NETLINK_LISTEN_ALL_NSID, as tapsync's watcher), opened before
// the start so that the events of the start's own taps are drained
// during the start, not during the storm.
func runScale(list, bus string, workers int) error {
	ctx := context.Background()
	sbs, err := readSandboxes(list)
	if err != nil {
		return err
	}
	fd, err := listenAllNsid()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	byNsid, err := assignNsids(sbs)
	if err != nil {
		return err
	}
	defer func() {
		for _, s := range sbs {
			if s.mon != nil {
				s.mon.close()
			}
			if s.ns != nil {
				s.ns.Close()
			}
		}
	}()

	type job struct {
		s    *sandbox
		link nic
	}
	jobs := make(chan job, 4096)
	failed := make(chan error, workers+1)
	fail := func(err error) {
		select {
		case failed <- err:
		default:
		}
	}
	// The reader: one blocking recvmsg loop on its own thread. A link
	// is queued once, on its first RTM_NEWLINK (a veth made up says so
	// more than once).
	go func() {
		queued := map[int32]map[int]bool{}
		buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4))
		for {
			n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, 0)
			if err != nil {
				if errors.Is(err, unix.EINTR) {
					continue
				}
				fail(fmt.Errorf("receive link events: %w", err))
				return
			}
			nsid := nsidOf(oob[:oobn])
			s, ok := byNsid[nsid]
			if !ok {
				continue // the bench's peer netns, or ours
			}
			msgs, err := syscall.ParseNetlinkMessage(buf[:n])
			if err != nil {
				fail(fmt.Errorf("parse link events: %w", err))
				return
			}
			for _, m := range msgs {
				if m.Header.Type != unix.RTM_NEWLINK {
					continue
				}
				l, err := netlink.LinkDeserialize(nil, m.Data)
				if err != nil || !containerLink(l) {
					continue
				}
				a := l.Attrs()
				if queued[nsid] == nil {
					queued[nsid] = map[int]bool{}
				}
				if queued[nsid][a.Index] {
					continue
				}
				queued[nsid][a.Index] = true
				jobs <- job{s, nic{ifindex: a.Index, mac: a.HardwareAddr, mtu: a.MTU}}
			}
		}
	}()
	for range workers {
		go func() {
			for j := range jobs {
				if err := j.s.wireOne(ctx, bus, j.link); err != nil {
					fail(err)
					return
				}
			}
		}()
	}

	if err := pool(len(sbs), workers, func(i int) error { return sbs[i].start(ctx, bus) }); err != nil {
		return err
	}
	fmt.Println("started")
	select {
	case <-stdinClosed():
		return nil
	case err := <-failed:
		return err
	}
}

// start connects to the sandbox's QMP (greeting, qmp_capabilities),
// opens its netns and wires every container link in it.
func (s *sandbox) start(ctx context.Context, bus string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var err error
	if s.ns, err = datapath.Open(s.path); err != nil {
		return err
	}
	if s.mon, err = dialQMP(s.qmpPath); err != nil {
		return err
	}
	links, err := s.ns.ContainerLinks()
	if err != nil {
		return err
	}
	for _, l := range links {
		if l.Kind != "veth" {
			continue
		}
		if err := s.wireLocked(ctx, bus, nic{ifindex: l.Ifindex, mac: l.MAC, mtu: l.MTU}); err != nil {
			return err
		}
	}
	return nil
}

// wireOne wires a link heard from the subscription, unless the start
// wired it already.
func (s *sandbox) wireOne(ctx context.Context, bus string, link nic) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mon == nil {
		return fmt.Errorf("netns %s: link %d appeared before the start reached the sandbox", s.path, link.ifindex)
	}
	return s.wireLocked(ctx, bus, link)
}

// wireLocked wires link if it is not wired yet; s.mu is held.
func (s *sandbox) wireLocked(ctx context.Context, bus string, link nic) error {
	if _, ok := s.wired[link.ifindex]; ok {
		return nil
	}
	e, err := wire(ctx, s.ns, s.mon, bus, freeIndex(s.wired), link)
	if err != nil {
		return fmt.Errorf("netns %s: %w", s.path, err)
	}
	s.wired[link.ifindex] = e
	return nil
}

// runVerify is the floor of B4: what a restarted daemon must do at the
// least before it can say that every sandbox is as it should be —
// connect to every QMP, one listing of the VM's devices
// (qom-list /machine/peripheral) and one link dump of the netns, and see
// that container links, taps and NICs agree in number. With checkDatapath it
// also sees that the datapath carries frames — one ingress filter dump
// per container link and per tap, each holding a mirred redirect to a
// link of the other side — and hears every netns's link events from then
// on (an nsid each, one NETLINK_LISTEN_ALL_NSID socket), as a daemon
// back in service must. It mutates nothing. It prints
// "verified <unix µs>" when every sandbox is done, and then holds its
// connections, as a daemon would, until stdin closes.
func runVerify(list string, workers int, checkDatapath bool) error {
	sbs, err := readSandboxes(list)
	if err != nil {
		return err
	}
	if checkDatapath {
		fd, err := listenAllNsid()
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if _, err := assignNsids(sbs); err != nil {
			return err
		}
	}
	handles := make([]*netlink.Handle, len(sbs))
	defer func() {
		for i, s := range sbs {
			if s.mon != nil {
				s.mon.close()
			}
			if handles[i] != nil {
				handles[i].Close()
			}
		}
	}()
	err = pool(len(sbs), workers, func(i int) error {
		s := sbs[i]
		var err error
		if s.mon, err = dialQMP(s.qmpPath); err != nil {
			return err
		}
		// Equivalent to: {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}
		ret, err := s.mon.call("qom-list", map[string]any{"path": "/machine/peripheral"}, nil)
		if err != nil {
			return err
		}
		var props []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		}
		if err := json.Unmarshal(ret, &props); err != nil {
			return fmt.Errorf("qom-list on %s: %w", s.qmpPath, err)
		}
		nics := 0
		for _, p := range props {
			if _, ok := qmp.ParseDeviceID(p.Name); ok && p.Type == "child<virtio-net-pci>" {
				nics++
			}
		}
		h, err := netns.GetFromPath(s.path)
		if err != nil {
			return fmt.Errorf("open netns %s: %w", s.path, err)
		}
		handles[i], err = netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
		h.Close()
		if err != nil {
			return fmt.Errorf("netlink handle in netns %s: %w", s.path, err)
		}
		// Equivalent to: ip -n NS link show
		links, err := handles[i].LinkList()
		if err != nil {
			return fmt.Errorf("list links in netns %s: %w", s.path, err)
		}
		containers, taps := 0, 0
		for _, l := range links {
			if containerLink(l) {
				containers++
			} else if _, ok := datapath.ParseTapName(l.Attrs().Name); ok {
				taps++
			}
		}
		if containers != taps || taps != nics {
			return fmt.Errorf("netns %s: %d container links, %d taps, %d NICs", s.path, containers, taps, nics)
		}
		if checkDatapath {
			return checkRedirects(handles[i], s.path, links)
		}
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Printf("verified %d\n", time.Now().UnixMicro())
	<-stdinClosed()
	return nil
}

// checkRedirects sees that every container link and every tap among
// links has a mirred redirect on its ingress to a link of the other kind.
//
// Equivalent to: tc -n NS filter show dev LINK ingress, per link
func checkRedirects(h *netlink.Handle, path string, links []netlink.Link) error {
	kinds := map[int]bool{} // ifindex → a container link (else a tap)
	for _, l := range links {
		if containerLink(l) {
			kinds[l.Attrs().Index] = true
		} else if _, ok := datapath.ParseTapName(l.Attrs().Name); ok {
			kinds[l.Attrs().Index] = false
		}
	}
	for _, l := range links {
		container, ok := kinds[l.Attrs().Index]
		if !ok {
			continue
		}
		filters, err := h.FilterList(l, netlink.MakeHandle(0xffff, 0))
		if err != nil {
			return fmt.Errorf("netns %s: ingress filters of %s: %w", path, l.Attrs().Name, err)
		}
		if !redirectsTo(filters, func(to int) bool { c, ok := kinds[to]; return ok && c != container }) {
			return fmt.Errorf("netns %s: %s redirects to no link of the other side", path, l.Attrs().Name)
		}
	}
	return nil
}

// redirectsTo reports whether a u32 filter among filters has a mirred
// redirect to a link that to accepts.
func redirectsTo(filters []netlink.Filter, to func(ifindex int) bool) bool {
	for _, f := range filters {
		u, ok := f.(*netlink.U32)
		if !ok {
			continue
		}
		for _, a := range u.Actions {
			if m, ok := a.(*netlink.MirredAction); ok && m.MirredAction == netlink.TCA_EGRESS_REDIR && to(m.Ifindex) {
				return true
			}
		}
	}
	return false
}

// listenAllNsid opens a rtnetlink socket in our netns that hears link
// events of every netns with an nsid here.
//
// Equivalent to: ip monitor all-nsid link
func listenAllNsid() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return -1, fmt.Errorf("open netlink socket: %w", err)
	}
	err = errors.Join(
		unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}),
		unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, unix.RTNLGRP_LINK),
		unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_LISTEN_ALL_NSID, 1),
		// The start's own taps and a storm everywhere arrive in bursts;
		// the kernel's default buffer would drop them (ENOBUFS).
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20),
	)
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("set up netlink socket: %w", err)
	}
	return fd, nil
}

// nsidOf reads the nsid control message of a datagram (-1: our netns).
func nsidOf(oob []byte) int32 {
	cms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return -1
	}
	for _, cm := range cms {
		if cm.Header.Level == unix.SOL_NETLINK && cm.Header.Type == unix.NETLINK_LISTEN_ALL_NSID && len(cm.Data) >= 4 {
			return int32(binary.NativeEndian.Uint32(cm.Data))
		}
	}
	return -1
}

// assignNsids gives every sandbox netns an nsid in ours (the kernel picks
// it), without which its events do not reach the socket.
//
// Equivalent to: ip netns set NAME auto; ip netns list-id
func assignNsids(sbs []*sandbox) (map[int32]*sandbox, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	by := map[int32]*sandbox{}
	for _, s := range sbs {
		ns, err := netns.GetFromPath(s.path)
		if err != nil {
			return nil, fmt.Errorf("open netns %s: %w", s.path, err)
		}
		id, err := h.GetNetNsIdByFd(int(ns))
		if err == nil && id < 0 {
			if err = h.SetNetNsIdByFd(int(ns), -1); err == nil || errors.Is(err, unix.EEXIST) {
				id, err = h.GetNetNsIdByFd(int(ns))
			}
		}
		ns.Close()
		if err == nil && id < 0 {
			err = errors.New("the kernel assigned none")
		}
		if err != nil {
			return nil, fmt.Errorf("nsid of netns %s: %w", s.path, err)
		}
		s.nsid = int32(id)
		by[s.nsid] = s
	}
	return by, nil
}

// pool runs fn(i) for i in [0,n) on `workers` goroutines and returns the
// first error; after one, no new i starts.
func pool(n, workers int, fn func(i int) error) error {
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
