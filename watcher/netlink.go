package watcher

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	// netnsCheckEvery is how often a watched netns path is checked. The
	// subscription socket keeps its namespace alive after `ip netns del`
	// and no message says it was unbound, so only a look at the path
	// ends the watch (or resubscribes when the path names a new netns).
	netnsCheckEvery = time.Second
	// Backoff of resubscription attempts.
	resubRetryFirst = 10 * time.Millisecond
	resubRetryMax   = 5 * time.Second
)

// netlinkGroups are the rtnetlink multicast groups a watch joins: every
// change a reconcile of the sandbox reads back (its links, their
// addresses, the routes, the tc qdiscs and filters of the redirects).
var netlinkGroups = []uint{
	unix.RTNLGRP_LINK,
	unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR,
	unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE,
	unix.RTNLGRP_TC,
}

// NetlinkWatcher follows what changes inside sandbox network namespaces —
// links (RTM_NEWLINK, RTM_DELLINK), addresses, routes and tc qdiscs,
// classes, filters and actions — and emits KindSandbox{ID, SourceNetlink}
// for each message, its Why naming the kind of change and the object.
// Messages are never decoded into state: a reconcile reads it all again.
//
// Each sandbox has one netlink socket joined to every group and one
// goroutine reading it, which also checks the netns path now and then.
//
// A socket that fails (the kernel dropped messages with ENOBUFS, or any
// other receive error) is replaced by a new one, and a KindSandbox with
// Why "netlink resubscribed: <error>" asks for a full look at the sandbox,
// since changes may have been lost. When the netns path no longer exists
// the watch ends quietly.
type NetlinkWatcher struct {
	sink   Sink
	resubs atomic.Uint64

	mu      sync.Mutex
	watches map[string]*netnsWatch // by sandbox id

	// Tunables for tests; set before the first Watch.
	checkEvery, retryFirst, retryMax time.Duration
	// rcvBuf, when non-zero, is the socket receive buffer of new
	// subscriptions (SO_RCVBUFFORCE; the kernel's minimum is about 2 KiB).
	rcvBuf atomic.Int64
	// holdUpdate, when set, is called before each message or subscription
	// failure is handled: a test blocks in it to let the socket overflow
	// and to get exactly one resubscription once it lets go.
	holdUpdate func()
}

// netnsWatch is one running watch.
type netnsWatch struct {
	path   string
	cancel context.CancelFunc
	done   chan struct{} // closed when its goroutine has ended
}

// NewNetlinkWatcher returns a NetlinkWatcher that reports to sink.
func NewNetlinkWatcher(sink Sink) *NetlinkWatcher {
	return &NetlinkWatcher{
		sink: sink, watches: map[string]*netnsWatch{},
		checkEvery: netnsCheckEvery, retryFirst: resubRetryFirst, retryMax: resubRetryMax,
	}
}

// Resubscriptions returns how many times a failed subscription has been
// replaced, over all sandboxes.
func (w *NetlinkWatcher) Resubscriptions() uint64 { return w.resubs.Load() }

// Watch follows sandbox id in the netns at netnsPath until ctx ends or
// Stop(id). Watching the same id and path again while the watch runs does
// nothing; another path replaces the watch. It returns an error when the
// first subscription fails (e.g. netnsPath is not a netns yet).
func (w *NetlinkWatcher) Watch(ctx context.Context, id, netnsPath string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if old := w.watches[id]; old != nil {
		if old.path == netnsPath && !isClosed(old.done) {
			return nil
		}
		delete(w.watches, id)
		old.cancel()
		<-old.done
	}
	log := zerolog.Ctx(ctx).With().Str("source", string(SourceNetlink)).Str("sandbox", id).Str("netns", netnsPath).Logger()
	ctx, cancel := context.WithCancel(log.WithContext(ctx))
	s, err := w.subscribe(ctx, netnsPath)
	if err != nil {
		cancel()
		return fmt.Errorf("watch sandbox %s in netns %s: %w", id, netnsPath, err)
	}
	nw := &netnsWatch{path: netnsPath, cancel: cancel, done: make(chan struct{})}
	w.watches[id] = nw
	go w.run(ctx, id, netnsPath, s, nw.done)
	log.Debug().Msg("watching links, addresses, routes and tc")
	return nil
}

// Stop ends the watch of sandbox id. When it returns, no more events for
// that watch are emitted.
func (w *NetlinkWatcher) Stop(id string) {
	w.mu.Lock()
	nw := w.watches[id]
	delete(w.watches, id)
	w.mu.Unlock()
	if nw != nil {
		nw.cancel()
		<-nw.done
	}
}

// StopAll ends every watch.
func (w *NetlinkWatcher) StopAll() {
	w.mu.Lock()
	all := w.watches
	w.watches = map[string]*netnsWatch{}
	w.mu.Unlock()
	for _, nw := range all {
		nw.cancel()
	}
	for _, nw := range all {
		<-nw.done
	}
}

// running reports whether the watch of id is live (for tests).
func (w *NetlinkWatcher) running(id string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	nw := w.watches[id]
	return nw != nil && !isClosed(nw.done)
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// nsID names a namespace: the device and inode of its nsfs file.
type nsID struct{ dev, ino uint64 }

func nsIDOf(path string) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsID{}, err
	}
	return nsID{st.Dev, st.Ino}, nil
}

// subscription is one netlink socket inside a sandbox netns.
type subscription struct {
	ns   nsID
	sock *nl.NetlinkSocket
	// unhook forgets the close registered on the watch's context.
	unhook func() bool
}

// close closes the socket; a Receive blocked on it returns.
func (s *subscription) close() {
	s.unhook()
	s.sock.Close()
}

// subscribe opens a socket inside the netns at path, joined to
// netlinkGroups. Ending ctx closes it, which wakes the reader.
func (w *NetlinkWatcher) subscribe(ctx context.Context, path string) (*subscription, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(h), &st); err != nil {
		return nil, err
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(int(h), &sfs); err != nil {
		return nil, err
	}
	if sfs.Type != unix.NSFS_MAGIC {
		return nil, fmt.Errorf("%s is not a network namespace (yet?)", path)
	}
	// Equivalent to: ip -n <netns> monitor link address route; tc -n <netns> monitor
	sock, err := nl.SubscribeAt(h, netns.None(), unix.NETLINK_ROUTE, netlinkGroups...)
	if err != nil {
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	if n := w.rcvBuf.Load(); n != 0 {
		if err := sock.SetReceiveBufferSize(int(n), true); err != nil {
			sock.Close()
			return nil, fmt.Errorf("set receive buffer: %w", err)
		}
	}
	// The reader wakes up at least this often to check the netns path.
	tv := unix.NsecToTimeval(w.checkEvery.Nanoseconds())
	if err := sock.SetReceiveTimeout(&tv); err != nil {
		sock.Close()
		return nil, fmt.Errorf("set receive timeout: %w", err)
	}
	return &subscription{
		ns:     nsID{st.Dev, st.Ino},
		sock:   sock,
		unhook: context.AfterFunc(ctx, sock.Close),
	}, nil
}

// run reads the subscription s of sandbox id until ctx ends or the netns
// is gone, replacing s when it fails.
func (w *NetlinkWatcher) run(ctx context.Context, id, path string, s *subscription, done chan struct{}) {
	defer close(done)
	log := zerolog.Ctx(ctx)
	checked := time.Now()
	for s != nil {
		msgs, from, err := s.sock.Receive()
		if ctx.Err() != nil {
			s.close()
			return
		}
		switch {
		case errors.Is(err, unix.EAGAIN):
			// Nothing for checkEvery: time to look at the path.
		case err != nil:
			// ENOBUFS: the kernel dropped messages for us.
			w.hold()
			reason := "receive: " + err.Error()
			s.close()
			s = w.resubscribe(ctx, id, path, reason)
			checked = time.Now()
			continue
		case from.Pid != nl.PidKernel:
			// Only the kernel speaks for the namespace.
		default:
			for _, m := range msgs {
				why, ok := describeMessage(m)
				if !ok {
					continue
				}
				w.hold()
				w.sink(Event{Kind: KindSandbox, Source: SourceNetlink, ID: id, Why: why})
			}
		}
		if time.Since(checked) < w.checkEvery {
			continue
		}
		checked = time.Now()
		cur, err := nsIDOf(path)
		if err == nil && cur == s.ns {
			continue
		}
		s.close()
		if errors.Is(err, fs.ErrNotExist) {
			log.Info().Str("reason", "netns file removed").Msg("netns gone; netlink watch ended")
			return
		}
		reason := "netns path now names another namespace"
		if err != nil {
			reason = err.Error()
		} else if ok, _ := IsNetns(path); !ok {
			// `ip netns del` unmounts, then unlinks.
			reason = "netns unmounted"
		}
		s = w.resubscribe(ctx, id, path, reason)
		checked = time.Now()
	}
}

// hold lets a test stop the loop before it acts on a message or a failure.
func (w *NetlinkWatcher) hold() {
	if w.holdUpdate != nil {
		w.holdUpdate()
	}
}

// resubscribe subscribes again, with backoff, until it works (then it
// emits the resync event), the netns path is gone or ctx ends (then it
// returns nil).
func (w *NetlinkWatcher) resubscribe(ctx context.Context, id, path, reason string) *subscription {
	log := zerolog.Ctx(ctx)
	delay := w.retryFirst
	for attempt := 1; ; attempt++ {
		s, err := w.subscribe(ctx, path)
		if err == nil {
			n := w.resubs.Add(1)
			log.Info().Str("reason", reason).Int("attempts", attempt).Uint64("resubscriptions", n).Msg("netlink subscription failed; resubscribed")
			w.sink(Event{Kind: KindSandbox, Source: SourceNetlink, ID: id, Why: "netlink resubscribed: " + reason})
			return s
		}
		if _, serr := os.Stat(path); errors.Is(serr, fs.ErrNotExist) {
			log.Info().Str("reason", reason).Msg("netns gone; netlink watch ended")
			return nil
		}
		// Quiet at first: `ip netns del` leaves an unmounted file for a
		// moment before unlinking it.
		ev := log.Debug()
		if attempt == 5 {
			ev = log.Warn()
		}
		ev.Err(err).Str("reason", reason).Dur("retry_in", delay).Msg("netlink resubscription failed; retrying")
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		delay = min(delay*2, w.retryMax)
	}
}

// sizeofTcMsg is the length of struct tcmsg (family, padding, ifindex,
// handle, parent, info), which x/sys/unix does not define.
const sizeofTcMsg = 20

// describeMessage says, for a log line, which object a message is about:
// "link eth0 changed", "address 10.0.0.2/24 on link 3 removed", "route
// default changed", "tc filter on link 3 changed". Messages of other types
// are not changes (ok is false). The text is all that is taken from the
// payload.
func describeMessage(m syscall.NetlinkMessage) (why string, ok bool) {
	what := "changed"
	switch m.Header.Type {
	case unix.RTM_DELLINK, unix.RTM_DELADDR, unix.RTM_DELROUTE, unix.RTM_DELQDISC,
		unix.RTM_DELTCLASS, unix.RTM_DELTFILTER, unix.RTM_DELCHAIN, unix.RTM_DELACTION:
		what = "removed"
	}
	switch m.Header.Type {
	case unix.RTM_NEWLINK, unix.RTM_DELLINK:
		return "link " + linkName(m.Data) + " " + what, true
	case unix.RTM_NEWADDR, unix.RTM_DELADDR:
		return "address " + addrName(m.Data) + " " + what, true
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		return "route " + routeName(m.Data) + " " + what, true
	case unix.RTM_NEWQDISC, unix.RTM_DELQDISC:
		return "tc qdisc " + tcLink(m.Data) + what, true
	case unix.RTM_NEWTCLASS, unix.RTM_DELTCLASS:
		return "tc class " + tcLink(m.Data) + what, true
	case unix.RTM_NEWTFILTER, unix.RTM_DELTFILTER:
		return "tc filter " + tcLink(m.Data) + what, true
	case unix.RTM_NEWCHAIN, unix.RTM_DELCHAIN:
		return "tc chain " + tcLink(m.Data) + what, true
	case unix.RTM_NEWACTION, unix.RTM_DELACTION:
		return "tc action " + what, true
	}
	return "", false
}

// attrs parses the attributes after a fixed header of size hdr; nil when
// the message is too short or malformed.
func attrs(data []byte, hdr int) []syscall.NetlinkRouteAttr {
	if len(data) < hdr {
		return nil
	}
	as, err := nl.ParseRouteAttr(data[hdr:])
	if err != nil {
		return nil
	}
	return as
}

func ifindexAt(data []byte, off int) (int32, bool) {
	if len(data) < off+4 {
		return 0, false
	}
	return int32(binary.NativeEndian.Uint32(data[off:])), true
}

// linkName is the IFLA_IFNAME of an ifinfomsg, or "index N".
func linkName(data []byte) string {
	for _, a := range attrs(data, unix.SizeofIfInfomsg) {
		if a.Attr.Type == unix.IFLA_IFNAME {
			return string(trimNUL(a.Value))
		}
	}
	if i, ok := ifindexAt(data, 4); ok {
		return fmt.Sprintf("index %d", i)
	}
	return "?"
}

// addrName is "<address>/<len> on link <index>" for an ifaddrmsg.
func addrName(data []byte) string {
	if len(data) < unix.SizeofIfAddrmsg {
		return "?"
	}
	plen := data[1]
	idx, _ := ifindexAt(data, 4)
	var ip net.IP
	for _, a := range attrs(data, unix.SizeofIfAddrmsg) {
		switch a.Attr.Type {
		case unix.IFA_LOCAL:
			ip = net.IP(a.Value) // the address itself on point-to-point links
		case unix.IFA_ADDRESS:
			if ip == nil {
				ip = net.IP(a.Value)
			}
		}
	}
	return fmt.Sprintf("%s/%d on link %d", ip, plen, idx)
}

// routeName is the destination of an rtmsg ("default" when it has none)
// and its table when not main.
func routeName(data []byte) string {
	if len(data) < unix.SizeofRtMsg {
		return "?"
	}
	family, dstLen, table := data[0], data[1], uint32(data[4])
	dst := "default"
	for _, a := range attrs(data, unix.SizeofRtMsg) {
		switch a.Attr.Type {
		case unix.RTA_DST:
			dst = fmt.Sprintf("%s/%d", net.IP(a.Value), dstLen)
		case unix.RTA_TABLE:
			if len(a.Value) >= 4 {
				table = binary.NativeEndian.Uint32(a.Value)
			}
		}
	}
	if dst == "default" && family == unix.AF_INET6 {
		dst = "default (ipv6)"
	}
	switch table {
	case unix.RT_TABLE_MAIN:
		return dst
	case unix.RT_TABLE_LOCAL:
		return dst + " in table local"
	}
	return fmt.Sprintf("%s in table %d", dst, table)
}

// tcLink is "on link <index> " for a tcmsg, or "" when it names none.
func tcLink(data []byte) string {
	if len(data) < sizeofTcMsg {
		return ""
	}
	i, _ := ifindexAt(data, 4)
	if i == 0 {
		return ""
	}
	return fmt.Sprintf("on link %d ", i)
}

func trimNUL(b []byte) []byte {
	for len(b) > 0 && b[len(b)-1] == 0 {
		b = b[:len(b)-1]
	}
	return b
}
