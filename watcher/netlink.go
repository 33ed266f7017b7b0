package watcher

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/datapath/hostnet"
	"golang.org/x/sys/unix"
)

const (
	// Backoff of resubscription attempts.
	resubRetryFirst = 10 * time.Millisecond
	resubRetryMax   = 5 * time.Second
	// receiveBuffer holds one datagram: a multicast notification is at
	// most a few pages. There is one, for every sandbox.
	receiveBuffer = 64 << 10
)

// netlinkGroups are the rtnetlink multicast groups of a sandbox that a
// watch follows: every change a reconcile of the sandbox reads back (its
// links, their addresses, the routes, the tc qdiscs and filters of the
// redirects).
var netlinkGroups = []uint{
	unix.RTNLGRP_LINK,
	unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR,
	unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE,
	unix.RTNLGRP_TC,
}

// listenGroups adds, for the socket's home netns, RTNLGRP_NSID: its
// RTM_DELNSID says that a netns with an nsid there has died.
var listenGroups = append(append([]uint(nil), netlinkGroups...), unix.RTNLGRP_NSID)

// NetlinkWatcher follows what changes inside sandbox network namespaces —
// links (RTM_NEWLINK, RTM_DELLINK), addresses, routes and tc qdiscs,
// classes, filters and actions — and emits KindSandbox{ID, SourceNetlink}
// for each message, its Why naming the kind of change and the object.
// Messages are never decoded into state: a reconcile reads it all again.
//
// One netlink socket serves every sandbox. It lives in a netns of its
// own (home: a private, empty netns of the process, see privateHome) and
// is opened with NETLINK_LISTEN_ALL_NSID, so it hears every netns that
// has an nsid in home, and each datagram names its netns by that nsid.
// Watch gives a sandbox netns an nsid in home (as `ip netns set NAME
// auto` does there) and maps it to the sandbox. Only sandbox netns get
// one: the host's and other pods' changes never reach the socket, and
// the idle daemon sleeps through them. One goroutine reads the socket,
// parked in the netpoller while nothing changes: no timer, no per-sandbox
// socket or goroutine. A netns with an nsid that no watch maps (one whose
// watch has ended) is heard and dropped.
//
// When the socket fails (the kernel dropped messages with ENOBUFS, or any
// other receive error) it is replaced by a new one, and every watched
// sandbox gets one KindSandbox with Why "netlink resubscribed: <error>",
// since changes of any of them may have been lost.
//
// A watch ends with Stop(id), StopAll, the end of the context given to
// Watch, or the death of its netns: the kernel then drops the netns's
// nsid and says so with RTM_DELNSID, after which the watch ends quietly.
// Nothing here polls a path. A netns file removed while something still
// holds the netns (a QEMU inside it) is the netns directory watcher's
// news (fsnotify); the daemon then stops the watch when it tears the
// sandbox down. A netns named outside the netns directory (containerd's
// /proc/<pid>/ns/net) has no fsnotify: its watch ends when containerd
// reports the sandbox gone and the daemon stops it, or when the netns
// dies with its last process.
type NetlinkWatcher struct {
	sink    Sink
	resubs  atomic.Uint64
	serials atomic.Uint64 // watches begun
	wakeups atomic.Uint64 // datagrams and errors the reader woke up for

	// emitMu is held while the events of one datagram are emitted. Stop
	// takes it once after unregistering, so that no event of the stopped
	// watch follows its return.
	emitMu sync.Mutex

	mu      sync.Mutex
	watches map[string]*netnsWatch           // by sandbox id
	byNsid  map[int32]map[string]*netnsWatch // by nsid in home, then sandbox id
	lst     *listener                        // the socket and its reader; nil while nothing is watched

	// home is the netns whose nsids the socket listens by: "" for a
	// private one of the process (see privateHome), falling back to the
	// daemon's own. Tests use a throwaway netns. Set before the first
	// Watch.
	home string
	// fallback logs, once, that no private home could be made.
	fallback sync.Once

	// nsidH is a route netlink handle in nsidHome, kept while something
	// is watched, through which Watch reads and assigns nsids: a handle
	// made per Watch (a socket made inside home: two setns) was the bulk
	// of a watch's cost. Dropped after a failed request and when the
	// watcher goes idle.
	nsidMu   sync.Mutex
	nsidH    *datapath.NsidSocket
	nsidHome string
	// Tunables for tests; set before the first Watch.
	retryFirst, retryMax time.Duration
	// groups are the multicast groups new sockets join (listenGroups; a
	// test names one that does not exist to make opening fail).
	groups []uint
	// rcvBuf, when non-zero, is the socket receive buffer of new
	// sockets (SO_RCVBUFFORCE; the kernel's minimum is about 2 KiB).
	rcvBuf atomic.Int64
	// holdUpdate, when set, is called before each message or socket
	// failure is handled: a test blocks in it to let the socket overflow
	// and to get exactly one resubscription once it lets go.
	holdUpdate func()
}

// netnsWatch is one sandbox's watch: the netns its path named when the
// watch began, and that netns's nsid in home.
type netnsWatch struct {
	serial   uint64 // this watch's number (Serial)
	id, path string
	ns       nsID
	nsid     int32
	log      zerolog.Logger
	// unhook forgets the end registered on the Watch's context.
	unhook func() bool
}

// listener is the socket and the goroutine reading it.
type listener struct {
	log  zerolog.Logger // lines about the socket, which serves every sandbox
	done chan struct{}  // closed when the reader has returned
	quit chan struct{}  // closed by halt

	mu     sync.Mutex
	sock   *listenSocket // replaced on resubscription
	halted bool
}

// halt closes the socket and tells the reader to return; it does not
// wait for it.
func (l *listener) halt() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.halted {
		return
	}
	l.halted = true
	close(l.quit)
	l.sock.close()
}

// socket returns the current socket.
func (l *listener) socket() *listenSocket {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sock
}

// swap makes s the socket and closes the one before; when the listener
// has been halted it closes s instead and returns false.
func (l *listener) swap(s *listenSocket) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.halted {
		s.close()
		return false
	}
	old := l.sock
	l.sock = s
	old.close()
	return true
}

func (l *listener) isHalted() bool {
	select {
	case <-l.quit:
		return true
	default:
		return false
	}
}

// NewNetlinkWatcher returns a NetlinkWatcher that reports to sink. The
// sink must not call Stop or StopAll (they wait for the reader that calls
// the sink).
func NewNetlinkWatcher(sink Sink) *NetlinkWatcher {
	return &NetlinkWatcher{
		sink: sink, watches: map[string]*netnsWatch{}, byNsid: map[int32]map[string]*netnsWatch{},
		retryFirst: resubRetryFirst, retryMax: resubRetryMax, groups: listenGroups,
	}
}

// Resubscriptions returns how many times a failed socket has been
// replaced (each time, every watched sandbox got one event).
func (w *NetlinkWatcher) Resubscriptions() uint64 { return w.resubs.Load() }

// Watch follows sandbox id in the netns at netnsPath until ctx ends,
// Stop(id), or the netns dies. Watching the same id and path again while
// the path names the same netns costs one stat and does nothing; another
// path, or the same path naming a new netns, replaces the watch. It
// returns an error when netnsPath is not a netns (yet) or no nsid can be
// had for it.
func (w *NetlinkWatcher) Watch(ctx context.Context, id, netnsPath string) error {
	cur, statErr := nsIDOf(netnsPath)
	w.mu.Lock()
	if old := w.watches[id]; old != nil && old.path == netnsPath && statErr == nil && old.ns == cur {
		w.mu.Unlock()
		return nil
	}
	w.mu.Unlock()

	home := w.homeNetns(ctx)
	ns, nsid, err := w.resolve(home, netnsPath)
	if err != nil {
		return fmt.Errorf("watch sandbox %s in netns %s: %w", id, netnsPath, err)
	}
	log := zerolog.Ctx(ctx).With().Str("source", string(SourceNetlink)).Str("sandbox", id).Str("netns", netnsPath).Logger()
	nw := &netnsWatch{serial: w.serials.Add(1), id: id, path: netnsPath, ns: ns, nsid: nsid, log: log}

	w.mu.Lock()
	var ended []*netnsWatch
	if old := w.watches[id]; old != nil {
		w.dropLocked(old)
	}
	// nsids are unique among the live netns of home: a watch that holds
	// this nsid for another netns watches one that has died (its
	// RTM_DELNSID is still on its way).
	for _, o := range w.byNsid[nsid] {
		if o.ns != ns {
			w.dropLocked(o)
			ended = append(ended, o)
		}
	}
	if w.lst == nil {
		// The socket is open before Watch returns: changes made after it
		// returns are heard.
		s, err := openListenSocket(home, w.groups, int(w.rcvBuf.Load()))
		if err != nil {
			w.idleLocked() // nothing is watched: resolve's nsid handle goes
			w.mu.Unlock()
			return fmt.Errorf("watch sandbox %s in netns %s: %w", id, netnsPath, err)
		}
		// The socket serves every sandbox: its lines carry none of the
		// fields of the Watch that happened to open it.
		l := &listener{
			log:  zerolog.Ctx(ctx).With().Reset().Str("source", string(SourceNetlink)).Logger(),
			done: make(chan struct{}), quit: make(chan struct{}), sock: s,
		}
		w.lst = l
		go w.listen(l)
	}
	w.watches[id] = nw
	if w.byNsid[nsid] == nil {
		w.byNsid[nsid] = map[string]*netnsWatch{}
	}
	w.byNsid[nsid][id] = nw
	nw.unhook = context.AfterFunc(ctx, func() { w.end(nw) })
	w.mu.Unlock()

	for _, o := range ended {
		o.log.Info().Str("reason", "its nsid now names another netns").Msg("netns gone; netlink watch ended")
	}
	log.Debug().Int32("nsid", nsid).Msg("watching links, addresses, routes and tc")
	return nil
}

// homeNetns is the path of the netns whose nsids the socket listens by:
// w.home when a test set one, else the process's private netns, else
// (no private netns could be made) "", the daemon's own.
func (w *NetlinkWatcher) homeNetns(ctx context.Context) string {
	if w.home != "" {
		return w.home
	}
	home, err := privateHome()
	if err != nil {
		w.fallback.Do(func() {
			zerolog.Ctx(ctx).Warn().Err(err).Str("source", string(SourceNetlink)).
				Msg("no private netns for the netlink socket; it listens in the daemon's own and wakes for every change there and in every netns with an nsid there")
		})
	}
	return home
}

// resolve opens the netns at path and returns its identity and its nsid
// in home, assigning one when it has none.
func (w *NetlinkWatcher) resolve(home, path string) (nsID, int32, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nsID{}, 0, err
	}
	defer unix.Close(fd)
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return nsID{}, 0, err
	}
	if sfs.Type != unix.NSFS_MAGIC {
		return nsID{}, 0, fmt.Errorf("%s is not a network namespace (yet?)", path)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nsID{}, 0, err
	}
	nsid, err := w.nsidOf(home, fd, true)
	if err != nil {
		return nsID{}, 0, err
	}
	return nsID{st.Dev, st.Ino}, nsid, nil
}

// nsidOf is the nsid home gives the netns open at fd (see
// datapath.NsidSocket.Nsid), through the watcher's kept socket in home.
func (w *NetlinkWatcher) nsidOf(home string, fd int, assign bool) (int32, error) {
	w.nsidMu.Lock()
	defer w.nsidMu.Unlock()
	if w.nsidH != nil && w.nsidHome != home {
		w.nsidH.Close()
		w.nsidH = nil
	}
	if w.nsidH == nil {
		h, err := datapath.OpenNsidSocket(home)
		if err != nil {
			return 0, err
		}
		w.nsidH, w.nsidHome = h, home
	}
	id, err := w.nsidH.Nsid(fd, assign)
	if err != nil {
		w.nsidH.Close()
		w.nsidH = nil
	}
	return id, err
}

// dropNsidHandle closes the kept nsid handle, if any.
func (w *NetlinkWatcher) dropNsidHandle() {
	w.nsidMu.Lock()
	defer w.nsidMu.Unlock()
	if w.nsidH != nil {
		w.nsidH.Close()
		w.nsidH = nil
	}
}

// dropLocked unregisters nw (w.mu held).
func (w *NetlinkWatcher) dropLocked(nw *netnsWatch) {
	if w.watches[nw.id] == nw {
		delete(w.watches, nw.id)
	}
	if m := w.byNsid[nw.nsid]; m[nw.id] == nw {
		delete(m, nw.id)
		if len(m) == 0 {
			delete(w.byNsid, nw.nsid)
		}
	}
	nw.unhook()
}

// idleLocked (w.mu held), when nothing is watched any more, closes the
// kept nsid handle and detaches the listener and halts it, and returns
// the listener so that the caller can wait for its reader (see settle);
// nil otherwise. Whatever used the nsid handle calls it afterwards: the
// last watch may have ended, and closed the handle, while it used one.
func (w *NetlinkWatcher) idleLocked() *listener {
	if len(w.watches) > 0 {
		return nil
	}
	w.dropNsidHandle() // lock order: w.mu, then nsidMu
	l := w.lst
	if l == nil {
		return nil
	}
	w.lst = nil
	l.halt()
	return l
}

// end ends watch nw if it is still registered (its Watch's context has
// ended).
func (w *NetlinkWatcher) end(nw *netnsWatch) {
	w.mu.Lock()
	if w.watches[nw.id] == nw {
		w.dropLocked(nw)
	}
	l := w.idleLocked()
	w.mu.Unlock()
	w.settle(l)
}

// settle waits until the halted listener l (if any) has stopped and no
// event of a dropped watch is being emitted.
func (w *NetlinkWatcher) settle(l *listener) {
	if l != nil {
		<-l.done
	}
	// An empty critical section: waits for an emit in progress.
	w.emitMu.Lock()
	w.emitMu.Unlock() //nolint:staticcheck // SA2001: the wait is the point

}

// Stop ends the watch of sandbox id. When it returns, no more events for
// that watch are emitted.
func (w *NetlinkWatcher) Stop(id string) {
	w.mu.Lock()
	if nw := w.watches[id]; nw != nil {
		w.dropLocked(nw)
	}
	l := w.idleLocked()
	w.mu.Unlock()
	w.settle(l)
}

// StopAll ends every watch and closes the socket.
func (w *NetlinkWatcher) StopAll() {
	w.mu.Lock()
	for _, nw := range w.watches {
		w.dropLocked(nw)
	}
	l := w.idleLocked()
	w.mu.Unlock()
	w.settle(l)
}

// Watching reports whether the watch of id is live.
func (w *NetlinkWatcher) Watching(id string) bool { return w.Serial(id) != 0 }

// Serial numbers the live watch of id (0: none). Every watch begun, and
// every one that replaces another, has a new number: while it stays the
// same, every change in the watched netns since has been heard.
func (w *NetlinkWatcher) Serial(id string) uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	if nw := w.watches[id]; nw != nil {
		return nw.serial
	}
	return 0
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

// listen reads l's socket until l is halted, replacing the socket when
// it fails.
func (w *NetlinkWatcher) listen(l *listener) {
	defer close(l.done)
	buf, oob := make([]byte, receiveBuffer), make([]byte, unix.CmsgSpace(4))
	for {
		msgs, nsid, err := l.socket().receive(buf, oob)
		if l.isHalted() {
			return
		}
		w.wakeups.Add(1)
		switch {
		case errors.Is(err, errTruncated):
			// Too big to read: still a change in that netns.
			w.emit(nsid, "netlink message truncated", 0, TCStaleAll)
		case err != nil:
			// ENOBUFS: the kernel dropped messages for us.
			w.hold()
			if !w.resubscribe(l, "receive: "+err.Error()) {
				return
			}
		case nsid == noNsid:
			// Home itself: only the end of an nsid matters.
			for _, m := range msgs {
				if m.Header.Type != unix.RTM_DELNSID {
					continue
				}
				if n, ok := nsidAttr(m); ok {
					w.nsidDeleted(n)
				}
			}
		default:
			for _, m := range msgs {
				if why, ok := describeMessage(m); ok {
					w.hold()
					w.emit(nsid, why, deletedLink(m), tcStale(m))
				}
			}
		}
	}
}

// emit sends one event to every sandbox watching the netns with nsid;
// gone is the ifindex of a link the event reports deleted, or 0; stale is
// the event's TCStale.
func (w *NetlinkWatcher) emit(nsid int32, why string, gone, stale int) {
	w.emitMu.Lock()
	defer w.emitMu.Unlock()
	w.mu.Lock()
	m := w.byNsid[nsid]
	ids := make([]string, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	w.mu.Unlock()
	for _, id := range ids {
		w.sink(Event{Kind: KindSandbox, Source: SourceNetlink, ID: id, Why: why, LinkGone: gone, TCStale: stale})
	}
}

// nsidDeleted ends the watches of the netns that had nsid n in home: it
// died. A watch whose path still names its netns with nsid n is kept:
// the notice was about an earlier holder of the number.
func (w *NetlinkWatcher) nsidDeleted(n int32) {
	w.mu.Lock()
	var cands []*netnsWatch
	for _, nw := range w.byNsid[n] {
		cands = append(cands, nw)
	}
	w.mu.Unlock()
	for _, nw := range cands {
		if w.stillNamed(nw) {
			continue
		}
		w.mu.Lock()
		if w.watches[nw.id] == nw {
			// The reader is ours: halting it is enough, it returns once
			// this datagram is done.
			w.dropLocked(nw)
			w.idleLocked()
			nw.log.Info().Str("reason", "netns died (RTM_DELNSID)").Int32("nsid", n).Msg("netns gone; netlink watch ended")
		}
		w.mu.Unlock()
	}
}

// stillNamed reports whether nw's path names its netns and that netns
// still has nw's nsid.
func (w *NetlinkWatcher) stillNamed(nw *netnsWatch) bool {
	cur, err := nsIDOf(nw.path)
	if err != nil || cur != nw.ns {
		return false
	}
	fd, err := unix.Open(nw.path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	id, err := w.nsidOf(w.homeNetns(context.Background()), fd, false)
	// The last watch may have ended (a Stop after nsidDeleted picked nw)
	// and closed the handle that nsidOf has just opened again.
	w.mu.Lock()
	w.idleLocked()
	w.mu.Unlock()
	return err == nil && id == nw.nsid
}

// hold lets a test stop the loop before it acts on a message or a failure.
func (w *NetlinkWatcher) hold() {
	if w.holdUpdate != nil {
		w.holdUpdate()
	}
}

// resubscribe replaces l's socket, with backoff, until it works (then
// every watched sandbox gets an event and it returns true) or l is halted
// (false).
func (w *NetlinkWatcher) resubscribe(l *listener, reason string) bool {
	delay := w.retryFirst
	for attempt := 1; ; attempt++ {
		s, err := openListenSocket(w.homeNetns(context.Background()), w.groups, int(w.rcvBuf.Load()))
		if err == nil {
			if !l.swap(s) {
				return false
			}
			n := w.resubs.Add(1)
			w.emitMu.Lock()
			w.mu.Lock()
			ids := make([]string, 0, len(w.watches))
			for id := range w.watches {
				ids = append(ids, id)
			}
			w.mu.Unlock()
			// Level-triggered: one look at each sandbox covers whatever
			// was lost.
			for _, id := range ids {
				w.sink(Event{Kind: KindSandbox, Source: SourceNetlink, ID: id, Why: "netlink resubscribed: " + reason, TCStale: TCStaleAll})
			}
			w.emitMu.Unlock()
			l.log.Info().Str("reason", reason).Int("attempts", attempt).Uint64("resubscriptions", n).Int("sandboxes", len(ids)).
				Msg("netlink socket failed; resubscribed and resyncing every watched sandbox")
			return true
		}
		ev := l.log.Debug()
		if attempt == 5 {
			ev = l.log.Warn()
		}
		ev.Err(err).Str("reason", reason).Dur("retry_in", delay).Msg("netlink resubscription failed; retrying")
		t := time.NewTimer(delay)
		select {
		case <-l.quit:
			t.Stop()
			return false
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
// are not changes (ok is false), nor are those about routes no reconcile
// reads. The text is all that is taken from the payload.
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
		if !hostnet.ObservedMessage(m.Data) {
			return "", false
		}
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

// tcStale is a message's Event.TCStale: a link message and a tc
// message name their link (a message too short to, every link); a tc
// action, which filters on any link may share, and a message about a
// shared block (its ifindex TCM_IFINDEX_MAGIC_BLOCK) concern every link.
func tcStale(m syscall.NetlinkMessage) int {
	switch m.Header.Type {
	case unix.RTM_NEWLINK, unix.RTM_DELLINK, unix.RTM_NEWQDISC, unix.RTM_DELQDISC, unix.RTM_NEWTCLASS, unix.RTM_DELTCLASS,
		unix.RTM_NEWTFILTER, unix.RTM_DELTFILTER, unix.RTM_NEWCHAIN, unix.RTM_DELCHAIN:
		// ifi_index and tcm_ifindex are both at offset 4.
		if i, ok := ifindexAt(m.Data, 4); ok && i > 0 {
			return int(i)
		}
		return TCStaleAll
	case unix.RTM_NEWACTION, unix.RTM_DELACTION:
		return TCStaleAll
	}
	return 0
}

// deletedLink is the ifindex of the link an RTM_DELLINK deletes; 0 for
// any other message. (A DELLINK with a family is a bridge port's
// AF_BRIDGE notice: the link itself stays.)
func deletedLink(m syscall.NetlinkMessage) int {
	if m.Header.Type != unix.RTM_DELLINK || len(m.Data) < unix.SizeofIfInfomsg || m.Data[0] != unix.AF_UNSPEC {
		return 0
	}
	i, _ := ifindexAt(m.Data, 4)
	return int(max(i, 0))
}

// attrs yields the type and value of each attribute after a fixed header
// of size hdr, up to the first malformed one. Ranging over it builds no
// list (a link message has dozens of attributes, and one arrives for every
// change of every link watched), and a loop that has found its attribute
// stops there. Not nl.ParseRouteAttr (nor the standard library's parser):
// both slice past the end of a last attribute whose length is not padded
// to 4 bytes, a panic in the watcher's only reader (found by
// FuzzNetlinkMessage).
func attrs(data []byte, hdr int) iter.Seq2[uint16, []byte] {
	return func(yield func(typ uint16, value []byte) bool) {
		if len(data) < hdr {
			return
		}
		for b := data[hdr:]; len(b) >= unix.SizeofRtAttr; {
			n := int(binary.NativeEndian.Uint16(b))
			if n < unix.SizeofRtAttr || n > len(b) {
				return
			}
			if !yield(binary.NativeEndian.Uint16(b[2:]), b[unix.SizeofRtAttr:n]) {
				return
			}
			b = b[min((n+unix.NLA_ALIGNTO-1)&^(unix.NLA_ALIGNTO-1), len(b)):]
		}
	}
}

func ifindexAt(data []byte, off int) (int32, bool) {
	if len(data) < off+4 {
		return 0, false
	}
	return int32(binary.NativeEndian.Uint32(data[off:])), true
}

// linkName is the IFLA_IFNAME of an ifinfomsg, or "index N".
func linkName(data []byte) string {
	for typ, v := range attrs(data, unix.SizeofIfInfomsg) {
		if typ == unix.IFLA_IFNAME {
			return string(trimNUL(v))
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
	for typ, v := range attrs(data, unix.SizeofIfAddrmsg) {
		switch typ {
		case unix.IFA_LOCAL:
			ip = net.IP(v) // the address itself on point-to-point links
		case unix.IFA_ADDRESS:
			if ip == nil {
				ip = net.IP(v)
			}
		}
	}
	return fmt.Sprintf("%s/%d on link %d", ip, plen, idx)
}

// routeName is the destination of an rtmsg ("default" when it has none).
// Its table is main: describeMessage names only the routes
// hostnet.ObservedMessage lets through.
func routeName(data []byte) string {
	if len(data) < unix.SizeofRtMsg {
		return "?"
	}
	family, dstLen := data[0], data[1]
	dst := "default"
	for typ, v := range attrs(data, unix.SizeofRtMsg) {
		if typ == unix.RTA_DST {
			dst = fmt.Sprintf("%s/%d", net.IP(v), dstLen)
		}
	}
	if dst == "default" && family == unix.AF_INET6 {
		dst = "default (ipv6)"
	}
	return dst
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
