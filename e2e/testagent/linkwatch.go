package testagent

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// reopenDelay paces new subscriptions after one failed, so that a socket
// that keeps failing does not spin.
const reopenDelay = 100 * time.Millisecond

// linkWatch follows the links of the agent's netns on a netlink
// subscription (RTM_NEWLINK, RTM_DELLINK), as Kata's agent waits on
// events rather than polling: each event wakes whoever waits for a link
// (changed) and goes on the timeline. A lost event (the socket overran)
// wakes the waiters too: they look at the links again.
//
// The socket is read through Go's poller (not netlink's blocking
// Receive), so that stop ends the reader at once.
type linkWatch struct {
	ns       *netns.NsHandle // nil: the netns of the calling thread
	timeline func() *Timeline

	mu   sync.Mutex
	wake chan struct{} // closed and replaced on every event
	sock *os.File

	done    chan struct{}
	stopped chan struct{}
}

// startLinkWatch subscribes (in ns, when not nil) and follows the links
// until stop. The subscription exists when it returns, so a look at the
// links after changed() misses no event.
func startLinkWatch(ns *netns.NsHandle, timeline func() *Timeline) (*linkWatch, error) {
	w := &linkWatch{ns: ns, timeline: timeline, wake: make(chan struct{}), done: make(chan struct{}), stopped: make(chan struct{})}
	sock, err := w.open()
	if err != nil {
		return nil, err
	}
	w.sock = sock
	go w.run(sock)
	return w, nil
}

// open subscribes a new netlink socket to the link group and hands it
// to Go's poller.
//
// Equivalent to: ip monitor link
func (w *linkWatch) open() (*os.File, error) {
	var s *nl.NetlinkSocket
	var err error
	if w.ns != nil {
		s, err = nl.SubscribeAt(*w.ns, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_LINK)
	} else {
		s, err = nl.Subscribe(unix.NETLINK_ROUTE, unix.RTNLGRP_LINK)
	}
	if err != nil {
		return nil, fmt.Errorf("subscribe to links: %w", err)
	}
	defer s.Close()
	fd, err := unix.FcntlInt(uintptr(s.GetFd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("subscribe to links: dup: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("subscribe to links: %w", err)
	}
	return os.NewFile(uintptr(fd), "netlink links"), nil
}

// changed returns a channel closed at the next link event: take it
// before looking at the links, then wait on it.
func (w *linkWatch) changed() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.wake
}

func (w *linkWatch) poke() {
	w.mu.Lock()
	close(w.wake)
	w.wake = make(chan struct{})
	w.mu.Unlock()
}

// stop ends the subscription and waits for the reader to end.
func (w *linkWatch) stop() {
	close(w.done)
	w.mu.Lock()
	w.sock.Close()
	w.mu.Unlock()
	<-w.stopped
}

func (w *linkWatch) stopping() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

func (w *linkWatch) run(sock *os.File) {
	defer close(w.stopped)
	buf := make([]byte, 64<<10)
	for {
		n, err := sock.Read(buf)
		at := time.Now()
		switch {
		case err == nil:
			w.handle(at, buf[:n])
			w.poke()
			continue
		case errors.Is(err, unix.ENOBUFS):
			w.poke() // events were lost: the waiters look again
			continue
		case w.stopping():
			return
		}
		// The socket broke: a new one, and the waiters look again.
		sock.Close()
		for {
			select {
			case <-w.done:
				return
			case <-time.After(reopenDelay):
			}
			if sock, err = w.open(); err == nil {
				break
			}
		}
		w.mu.Lock()
		if w.stopping() {
			w.mu.Unlock()
			sock.Close()
			return
		}
		w.sock = sock
		w.mu.Unlock()
		w.poke()
	}
}

// handle puts the link messages read at at on the timeline.
func (w *linkWatch) handle(at time.Time, b []byte) {
	t := w.timeline()
	if t == nil {
		return
	}
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil {
		return
	}
	for _, m := range msgs {
		kind := control.EventNewLink
		switch m.Header.Type {
		case unix.RTM_NEWLINK:
		case unix.RTM_DELLINK:
			kind = control.EventDelLink
		default:
			continue
		}
		h := unix.NlMsghdr(m.Header)
		l, err := netlink.LinkDeserialize(&h, m.Data)
		if err != nil {
			continue
		}
		a := l.Attrs()
		t.RecordAt(at, kind, a.HardwareAddr.String(), fmt.Sprintf("ifindex %d name %s flags %s", a.Index, a.Name, a.Flags))
	}
}
