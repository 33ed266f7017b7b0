package watcher

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	// linkCheckEvery is how often a watched netns path is checked. The
	// subscription socket keeps its namespace alive after `ip netns del`
	// and no message says it was unbound, so only a look at the path
	// ends the watch (or resubscribes when the path names a new netns).
	linkCheckEvery = time.Second
	// Backoff of resubscription attempts.
	linkRetryFirst = 10 * time.Millisecond
	linkRetryMax   = 5 * time.Second
)

// LinkWatcher follows the link updates (RTM_NEWLINK, RTM_DELLINK) inside
// sandbox network namespaces, one netlink subscription per sandbox, and
// emits KindSandbox{ID, SourceNetlink} for each update.
//
// A subscription that fails (the kernel dropped messages with ENOBUFS, or
// any error reported by the netlink reader) is replaced by a new one, and a
// KindSandbox with Why "netlink resubscribed: <error>" asks for a full look
// at the sandbox, since updates may have been lost. When the netns path no
// longer exists the watch ends quietly.
type LinkWatcher struct {
	sink   Sink
	resubs atomic.Uint64

	mu      sync.Mutex
	watches map[string]*linkWatch // by sandbox id

	// Tunables for tests; set before the first Watch.
	checkEvery, retryFirst, retryMax time.Duration
	// rcvBuf, when non-zero, is the socket receive buffer of new
	// subscriptions (SO_RCVBUFFORCE; the kernel's minimum is about 2 KiB).
	rcvBuf atomic.Int64
	// holdUpdate, when set, is called before each update or subscription
	// failure is handled: a test blocks in it to let the socket overflow
	// and to get exactly one resubscription once it lets go.
	holdUpdate func()
}

// linkWatch is one running watch.
type linkWatch struct {
	path   string
	cancel context.CancelFunc
	done   chan struct{} // closed when its goroutine has ended
}

// NewLinkWatcher returns a LinkWatcher that reports to sink.
func NewLinkWatcher(sink Sink) *LinkWatcher {
	return &LinkWatcher{
		sink: sink, watches: map[string]*linkWatch{},
		checkEvery: linkCheckEvery, retryFirst: linkRetryFirst, retryMax: linkRetryMax,
	}
}

// Resubscriptions returns how many times a failed subscription has been
// replaced, over all sandboxes.
func (w *LinkWatcher) Resubscriptions() uint64 { return w.resubs.Load() }

// Watch follows the links of sandbox id in the netns at netnsPath until ctx
// ends or Stop(id). Watching the same id and path again while the watch runs
// does nothing; another path replaces the watch. It returns an error when
// the first subscription fails (e.g. netnsPath is not a netns yet).
func (w *LinkWatcher) Watch(ctx context.Context, id, netnsPath string) error {
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
	s, err := w.subscribe(netnsPath)
	if err != nil {
		return fmt.Errorf("watch links of sandbox %s in netns %s: %w", id, netnsPath, err)
	}
	log := zerolog.Ctx(ctx).With().Str("source", string(SourceNetlink)).Str("sandbox", id).Str("netns", netnsPath).Logger()
	ctx, cancel := context.WithCancel(log.WithContext(ctx))
	lw := &linkWatch{path: netnsPath, cancel: cancel, done: make(chan struct{})}
	w.watches[id] = lw
	go w.run(ctx, id, netnsPath, s, lw.done)
	log.Debug().Msg("watching links")
	return nil
}

// Stop ends the watch of sandbox id. When it returns, no more events for
// that watch are emitted.
func (w *LinkWatcher) Stop(id string) {
	w.mu.Lock()
	lw := w.watches[id]
	delete(w.watches, id)
	w.mu.Unlock()
	if lw != nil {
		lw.cancel()
		<-lw.done
	}
}

// StopAll ends every watch.
func (w *LinkWatcher) StopAll() {
	w.mu.Lock()
	all := w.watches
	w.watches = map[string]*linkWatch{}
	w.mu.Unlock()
	for _, lw := range all {
		lw.cancel()
	}
	for _, lw := range all {
		<-lw.done
	}
}

// running reports whether the watch of id is live (for tests).
func (w *LinkWatcher) running(id string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	lw := w.watches[id]
	return lw != nil && !isClosed(lw.done)
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

// linkSub is one netlink subscription.
type linkSub struct {
	ns      nsID
	updates chan netlink.LinkUpdate
	done    chan struct{} // closing it closes the socket
	failed  chan struct{} // poked (size 1) by the error callback

	mu  sync.Mutex
	err error // first error reported by the netlink reader
}

func (s *linkSub) onError(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	select {
	case s.failed <- struct{}{}:
	default:
	}
}

// reason says why the subscription failed.
func (s *linkSub) reason() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		return "update channel closed"
	}
	return s.err.Error()
}

// close closes the socket and waits for the netlink reader to end. The
// reader blocks on sending to updates, so they are drained.
func (s *linkSub) close() {
	close(s.done)
	for range s.updates {
	}
}

// subscribe opens a link subscription inside the netns at path.
func (w *LinkWatcher) subscribe(path string) (*linkSub, error) {
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
	s := &linkSub{
		ns:      nsID{st.Dev, st.Ino},
		updates: make(chan netlink.LinkUpdate, 16),
		done:    make(chan struct{}),
		failed:  make(chan struct{}, 1),
	}
	opts := netlink.LinkSubscribeOptions{Namespace: &h, ErrorCallback: s.onError}
	if n := w.rcvBuf.Load(); n != 0 {
		opts.ReceiveBufferSize, opts.ReceiveBufferForceSize = int(n), true
	}
	// Equivalent to: ip -n <netns> monitor link
	if err := netlink.LinkSubscribeWithOptions(s.updates, s.done, opts); err != nil {
		close(s.done)
		return nil, err
	}
	return s, nil
}

// run follows the subscription s of sandbox id until ctx ends or the netns
// is gone, replacing s when it fails.
func (w *LinkWatcher) run(ctx context.Context, id, path string, s *linkSub, done chan struct{}) {
	defer close(done)
	log := zerolog.Ctx(ctx)
	check := time.NewTicker(w.checkEvery)
	defer check.Stop()
	for s != nil {
		select {
		case <-ctx.Done():
			s.close()
			return
		case u, ok := <-s.updates:
			w.hold()
			if !ok {
				// The reader ended (ENOBUFS and other receive errors
				// end it); its socket is still open.
				reason := s.reason()
				s.close()
				s = w.resubscribe(ctx, id, path, reason)
				continue
			}
			w.sink(Event{Kind: KindSandbox, Source: SourceNetlink, ID: id, Why: describeLinkUpdate(u)})
		case <-s.failed:
			w.hold()
			reason := s.reason()
			s.close()
			s = w.resubscribe(ctx, id, path, reason)
		case <-check.C:
			cur, err := nsIDOf(path)
			if err == nil && cur == s.ns {
				continue
			}
			s.close()
			if errors.Is(err, fs.ErrNotExist) {
				log.Info().Str("reason", "netns file removed").Msg("netns gone; link watch ended")
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
		}
	}
}

// hold lets a test stop the loop before it acts on an update or a failure.
func (w *LinkWatcher) hold() {
	if w.holdUpdate != nil {
		w.holdUpdate()
	}
}

// resubscribe subscribes again, with backoff, until it works (then it
// emits the resync event), the netns path is gone or ctx ends (then it
// returns nil).
func (w *LinkWatcher) resubscribe(ctx context.Context, id, path, reason string) *linkSub {
	log := zerolog.Ctx(ctx)
	delay := w.retryFirst
	for attempt := 1; ; attempt++ {
		s, err := w.subscribe(path)
		if err == nil {
			n := w.resubs.Add(1)
			log.Info().Str("reason", reason).Int("attempts", attempt).Uint64("resubscriptions", n).Msg("netlink subscription failed; resubscribed")
			w.sink(Event{Kind: KindSandbox, Source: SourceNetlink, ID: id, Why: "netlink resubscribed: " + reason})
			return s
		}
		if _, serr := os.Stat(path); errors.Is(serr, fs.ErrNotExist) {
			log.Info().Str("reason", reason).Msg("netns gone; link watch ended")
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

func describeLinkUpdate(u netlink.LinkUpdate) string {
	what := "changed"
	if u.Header.Type == unix.RTM_DELLINK {
		what = "removed"
	}
	name := fmt.Sprintf("index %d", u.Index)
	if u.Link != nil && u.Link.Attrs() != nil {
		name = u.Link.Attrs().Name
	}
	return "link " + name + " " + what
}
