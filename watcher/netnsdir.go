package watcher

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// How long a new entry of the netns dir may stay a placeholder (an empty
// file waiting for its bind mount) before it is given up on. Nothing
// signals the mount, so the entry is looked at again with exponential
// backoff.
const (
	placeholderFirstRetry = 5 * time.Millisecond
	placeholderMaxRetry   = time.Second
	placeholderGiveUp     = 30 * time.Second
)

// WatchNetnsDir reports the network namespaces bound in dir (normally
// /var/run/netns): KindNetns for every netns present at start and for every
// one that appears later, KindNetnsGone when a reported one is removed or
// renamed away, and KindResyncAll when events may have been lost (the
// inotify queue overflowed), after which dir is scanned again.
//
// An entry counts once it is a bind mount of a network namespace (statfs
// reports nsfs). `ip netns add` and container runtimes create an empty
// placeholder first and mount onto it a moment later, with no inotify event
// for the mount, so a new regular file is looked at again with backoff (5 ms
// doubling to 1 s) for up to 30 s. Directories, symlinks (never followed),
// other file types, namespaces of other types and unsafe names are ignored
// with a log line.
//
// It blocks until ctx ends and then returns nil. It returns an error when
// dir cannot be watched (it is not created when missing) or when dir itself
// is removed.
func WatchNetnsDir(ctx context.Context, dir string, sink Sink) error {
	return watchNetnsDir(ctx, dir, sink, nil)
}

// watchNetnsDir is WatchNetnsDir; tune, when set, adjusts the timings
// (tests).
func watchNetnsDir(ctx context.Context, dir string, sink Sink, tune func(*netnsDir)) error {
	d, err := newNetnsDir(dir, sink)
	if err != nil {
		return err
	}
	if tune != nil {
		tune(d)
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch netns dir %s: %w", d.dir, err)
	}
	defer fw.Close()
	// Watch before the first scan, so that nothing created in between is
	// missed; an entry both scanned and created is only checked again.
	if err := fw.Add(d.dir); err != nil {
		return fmt.Errorf("watch netns dir %s: %w", d.dir, err)
	}
	return d.run(ctx, fw.Events, fw.Errors)
}

// IsNetns reports whether path (symlinks followed) is a network namespace:
// a bind mount of one, or a /proc/<pid>/ns/net link. A file that exists but
// is not one (such as a placeholder before its mount) is (false, nil); a
// missing one is an error matching fs.ErrNotExist.
func IsNetns(path string) (bool, error) {
	k, err := classifyAt(unix.AT_FDCWD, path, true)
	if err != nil {
		return false, fmt.Errorf("netns %s: %w", path, err)
	}
	return k == entryNetns, nil
}

// InDir returns an error unless path, after filepath.Clean, is a direct
// child of dir. It looks at the names only: symlinks are not resolved.
func InDir(dir, path string) error {
	d, p := filepath.Clean(dir), filepath.Clean(path)
	if filepath.Dir(p) != d || p == d || !safeName(filepath.Base(p)) {
		return fmt.Errorf("netns path %q outside netns_dir %q (must be a file directly in it)", path, dir)
	}
	return nil
}

// safeName reports whether name is a plain file name that stays in its
// directory.
func safeName(name string) bool {
	return name != "" && name != "." && !strings.Contains(name, "/") &&
		!strings.Contains(name, "..") && !strings.ContainsRune(name, 0)
}

// entryKind is what a directory entry turned out to be.
type entryKind int

const (
	entryNetns       entryKind = iota
	entryPlaceholder           // a regular file that is not (yet) a namespace
	entryOtherNS               // a bind mount of another namespace type
	entryDir
	entrySymlink
	entryOther // fifo, socket, device
)

func (k entryKind) String() string {
	return [...]string{"netns", "placeholder", "other namespace type", "directory", "symlink", "special file"}[k]
}

// classifyAt says what name (relative to dirfd, or a path with
// unix.AT_FDCWD) is, without opening anything but the inode itself: an
// O_PATH descriptor has no side effects even on a fifo or a device.
func classifyAt(dirfd int, name string, follow bool) (entryKind, error) {
	k, _, err := inspectAt(dirfd, name, follow)
	return k, err
}

// inspectAt is classifyAt that also returns the identity of what it
// classified, read from the same descriptor (so that the kind and the
// identity belong to one inode even if name is replaced meanwhile).
func inspectAt(dirfd int, name string, follow bool) (entryKind, nsID, error) {
	flags := unix.O_PATH | unix.O_CLOEXEC
	if !follow {
		flags |= unix.O_NOFOLLOW
	}
	fd, err := unix.Openat(dirfd, name, flags, 0)
	if err != nil {
		return 0, nsID{}, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, nsID{}, err
	}
	id := nsID{st.Dev, st.Ino}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		return entryDir, id, nil
	case unix.S_IFLNK:
		return entrySymlink, id, nil
	default:
		return entryOther, id, nil
	}
	// Equivalent to: stat -f -c %T <path>  →  nsfs
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return 0, nsID{}, err
	}
	if sfs.Type != unix.NSFS_MAGIC {
		return entryPlaceholder, id, nil
	}
	// Which namespace type: ioctl(NS_GET_NSTYPE) needs a real descriptor,
	// opened through the O_PATH one so that it is the same inode. Without
	// /proc or the ioctl (kernels before 4.11), nsfs is taken as a netns.
	rfd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return entryNetns, id, nil
	}
	defer unix.Close(rfd)
	t, err := unix.IoctlRetInt(rfd, unix.NS_GET_NSTYPE)
	if err == nil && t != unix.CLONE_NEWNET {
		return entryOtherNS, id, nil
	}
	return entryNetns, id, nil
}

// CheckNetns vets a netns path that a pod controls (the one in a
// container's OCI spec). It returns the path to use instead: path is
// accepted only when it names a network namespace bound directly in
// netnsDir, and the result is then netnsDir/<name>, so that nothing the
// pod can change later (a symlink on the way) redirects it.
//
// The directory holding path must be netnsDir itself (the same directory
// by device and inode, so /run/netns and /var/run/netns are one), the
// entry must be a bind mount of a network namespace and not a symlink,
// and the namespace must not be the host's (that of pid 1 or of this
// process): wiring a VM to the node's own interfaces would hand a pod the
// host network.
func CheckNetns(netnsDir, path string) (string, error) {
	p := filepath.Clean(path)
	name := filepath.Base(p)
	if !filepath.IsAbs(p) || !safeName(name) {
		return "", fmt.Errorf("netns path %q: not an absolute path to a file", path)
	}
	dir := filepath.Clean(netnsDir)
	var want unix.Stat_t
	if err := unix.Stat(dir, &want); err != nil {
		return "", fmt.Errorf("netns path %q: netns_dir %s: %w", path, dir, err)
	}
	// Equivalent to: [ "$(stat -L -c %d:%i $(dirname P))" = "$(stat -L -c %d:%i /var/run/netns)" ]
	dfd, err := unix.Open(filepath.Dir(p), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("netns path %q outside netns_dir %s: %w", path, dir, err)
	}
	defer unix.Close(dfd)
	var got unix.Stat_t
	if err := unix.Fstat(dfd, &got); err != nil {
		return "", fmt.Errorf("netns path %q: %w", path, err)
	}
	if got.Dev != want.Dev || got.Ino != want.Ino {
		return "", fmt.Errorf("netns path %q outside netns_dir %s (must be a file directly in it)", path, dir)
	}
	// The last component is opened with O_NOFOLLOW relative to the
	// directory just checked: a symlink in netns_dir pointing elsewhere
	// is refused, not followed.
	k, id, err := inspectAt(dfd, name, false)
	if err != nil {
		return "", fmt.Errorf("netns path %q: %w", path, err)
	}
	if k != entryNetns {
		return "", fmt.Errorf("netns path %q: a %s, not a network namespace", path, k)
	}
	if err := notHostNetns(id); err != nil {
		return "", fmt.Errorf("netns path %q: %w", path, err)
	}
	return filepath.Join(dir, name), nil
}

// checkTaskNetns vets path as the /proc/<pid>/ns/net of process pid (a
// container's own task): a network namespace, and not the host's.
func checkTaskNetns(path string, pid uint32) error {
	if pid == 0 || filepath.Clean(path) != fmt.Sprintf("/proc/%d/ns/net", pid) {
		return fmt.Errorf("netns path %q: not /proc/<pid>/ns/net of the task (pid %d)", path, pid)
	}
	// The magic link must be followed: it is how the namespace is reached.
	k, id, err := inspectAt(unix.AT_FDCWD, path, true)
	if err != nil {
		return fmt.Errorf("netns path %q: %w", path, err)
	}
	if k != entryNetns {
		return fmt.Errorf("netns path %q: a %s, not a network namespace", path, k)
	}
	if err := notHostNetns(id); err != nil {
		return fmt.Errorf("netns path %q: %w", path, err)
	}
	return nil
}

// notHostNetns returns an error when id is the host's network namespace:
// our own (the daemon runs in the host's), or that of pid 1. When our own
// cannot be read, it fails closed. Pid 1's is skipped when reading it is
// not permitted (a sandboxed init can deny even root, as on VM sandboxes
// whose init is not dumpable); ours then stands for the host's.
func notHostNetns(id nsID) error {
	for _, p := range []string{"/proc/self/ns/net", "/proc/1/ns/net"} {
		host, err := nsIDOf(p)
		if p == "/proc/1/ns/net" && errors.Is(err, fs.ErrPermission) {
			continue
		}
		if err != nil {
			return fmt.Errorf("cannot compare with the host netns %s: %w", p, err)
		}
		if id == host {
			return fmt.Errorf("it is the host network namespace (%s)", p)
		}
	}
	return nil
}

// UnderDir returns an error unless path, after filepath.Clean, is inside
// dir (at any depth) and absolute. Like InDir it looks at the names only.
func UnderDir(dir, path string) error {
	d, p := filepath.Clean(dir), filepath.Clean(path)
	if !filepath.IsAbs(d) || !filepath.IsAbs(p) || strings.ContainsRune(p, 0) {
		return fmt.Errorf("path %q not under %q: both must be absolute", path, dir)
	}
	prefix := d + "/"
	if d == "/" {
		prefix = "/"
	}
	if !strings.HasPrefix(p, prefix) || p == d {
		return fmt.Errorf("path %q not under %q", path, dir)
	}
	return nil
}

// netnsDir is the state of one WatchNetnsDir. Everything but the check
// goroutines runs on the goroutine of run.
type netnsDir struct {
	dir  string
	sink Sink

	firstRetry, maxRetry, giveUp time.Duration

	entries map[string]*nsEntry
	gen     uint64 // last generation handed out to a check
	results chan checkResult
	checks  sync.WaitGroup
}

// nsEntry is what is known of one name in dir.
type nsEntry struct {
	gen      uint64             // generation of the latest check; older results are stale
	cancel   context.CancelFunc // stops the pending check; nil when none runs
	reported bool               // KindNetns was emitted and no KindNetnsGone since
}

// checkResult is what a check goroutine found for name.
type checkResult struct {
	name   string
	gen    uint64
	kind   entryKind
	err    error
	waited time.Duration // from the first look to this verdict
	tries  int
}

func newNetnsDir(dir string, sink Sink) (*netnsDir, error) {
	dir = filepath.Clean(dir)
	// No descriptor of dir is kept open: it would delay the inotify event
	// of dir's own removal until it is closed.
	if st, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("netns dir %s: %w", dir, err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("netns dir %s: not a directory", dir)
	}
	return &netnsDir{
		dir: dir, sink: sink,
		firstRetry: placeholderFirstRetry, maxRetry: placeholderMaxRetry, giveUp: placeholderGiveUp,
		entries: map[string]*nsEntry{},
		results: make(chan checkResult),
	}, nil
}

// run scans dir, then follows events until ctx ends. Checks it started
// have ended when it returns, so sink is no longer called.
func (d *netnsDir) run(ctx context.Context, events <-chan fsnotify.Event, errs <-chan error) error {
	log := zerolog.Ctx(ctx).With().Str("source", string(SourceNetnsDir)).Str("netns_dir", d.dir).Logger()
	ctx, cancel := context.WithCancel(log.WithContext(ctx))
	defer func() {
		cancel()
		d.checks.Wait()
	}()
	if err := d.scan(ctx, "present at start"); err != nil {
		return err
	}
	log.Debug().Msg("watching netns dir")
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				return fmt.Errorf("watch netns dir %s: event channel closed", d.dir)
			}
			if err := d.handle(ctx, ev); err != nil {
				return err
			}
		case err, ok := <-errs:
			if !ok {
				return fmt.Errorf("watch netns dir %s: error channel closed", d.dir)
			}
			// Overflow (IN_Q_OVERFLOW) or a read error: events were lost.
			log.Warn().Err(err).Str("reason", "events lost").Msg("netns dir watch lost events; rescanning")
			d.sink(Event{Kind: KindResyncAll, Source: SourceNetnsDir, Why: "netns dir " + d.dir + ": " + err.Error()})
			if err := d.scan(ctx, "rescan after lost events"); err != nil {
				return err
			}
		case r := <-d.results:
			d.settle(ctx, r)
		}
	}
}

// scan checks every entry of dir again and forgets the names that are no
// longer there.
func (d *netnsDir) scan(ctx context.Context, why string) error {
	ents, err := os.ReadDir(d.dir)
	if err != nil {
		return fmt.Errorf("scan netns dir %s: %w", d.dir, err)
	}
	present := map[string]bool{}
	for _, e := range ents {
		present[e.Name()] = true
		d.lookAt(ctx, e.Name(), why)
	}
	for name := range d.entries {
		if !present[name] {
			d.forget(ctx, name, "gone at rescan")
		}
	}
	return nil
}

// handle follows one fsnotify event.
func (d *netnsDir) handle(ctx context.Context, ev fsnotify.Event) error {
	if filepath.Clean(ev.Name) == d.dir {
		if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
			return fmt.Errorf("netns dir %s was removed or renamed", d.dir)
		}
		return nil
	}
	name := filepath.Base(ev.Name)
	if filepath.Dir(ev.Name) != d.dir {
		zerolog.Ctx(ctx).Debug().Str("netns", ev.Name).Str("reason", "not directly in the netns dir").Msg("ignoring event")
		return nil
	}
	switch {
	case ev.Has(fsnotify.Remove):
		d.forget(ctx, name, "netns file removed")
	case ev.Has(fsnotify.Rename):
		d.forget(ctx, name, "netns file renamed away")
	case ev.Has(fsnotify.Create):
		d.lookAt(ctx, name, "created")
	}
	// Write and Chmod say nothing about being a namespace: a bind mount
	// makes no inotify event at all.
	return nil
}

// lookAt starts (or restarts) the check of name. The verdict comes back
// through d.results.
func (d *netnsDir) lookAt(ctx context.Context, name, why string) {
	path := filepath.Join(d.dir, name)
	if !safeName(name) || InDir(d.dir, path) != nil {
		logIgnored(ctx, name, path, "unsafe name").Msg("ignoring netns dir entry")
		return
	}
	e := d.entries[name]
	if e == nil {
		e = &nsEntry{}
		d.entries[name] = e
	}
	if e.cancel != nil {
		e.cancel()
	}
	d.gen++
	e.gen = d.gen
	cctx, cancel := context.WithCancel(ctx)
	e.cancel = cancel
	d.checks.Add(1)
	go d.check(cctx, name, e.gen)
	zerolog.Ctx(ctx).Debug().Str("netns", path).Str("reason", why).Msg("looking at netns dir entry")
}

// check looks at name until it is a namespace, is something that will
// never become one, is gone, or d.giveUp has passed.
func (d *netnsDir) check(ctx context.Context, name string, gen uint64) {
	defer d.checks.Done()
	start := time.Now()
	delay := d.firstRetry
	for tries := 1; ; tries++ {
		// name is one path component and is not followed if a symlink.
		k, err := classifyAt(unix.AT_FDCWD, filepath.Join(d.dir, name), false)
		waited := time.Since(start)
		if err != nil || k != entryPlaceholder || waited >= d.giveUp {
			select {
			case d.results <- checkResult{name: name, gen: gen, kind: k, err: err, waited: waited, tries: tries}:
			case <-ctx.Done():
			}
			return
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		delay = min(delay*2, d.maxRetry)
	}
}

// settle acts on the verdict of a check, unless a newer check or a removal
// made it stale.
func (d *netnsDir) settle(ctx context.Context, r checkResult) {
	e := d.entries[r.name]
	if e == nil || e.gen != r.gen {
		return
	}
	e.cancel()
	e.cancel = nil
	path := filepath.Join(d.dir, r.name)
	log := zerolog.Ctx(ctx)
	switch {
	case errors.Is(r.err, fs.ErrNotExist):
		// Created and removed again; its Remove event may still come.
		d.forget(ctx, r.name, "netns file vanished")
	case r.err != nil:
		log.Warn().Err(r.err).Str("netns", path).Str("reason", "cannot inspect").Msg("ignoring netns dir entry")
		d.unreport(path, e, "netns file cannot be inspected: "+r.err.Error())
	case r.kind == entryNetns:
		e.reported = true
		why := "netns appeared"
		if r.tries > 1 {
			why = fmt.Sprintf("netns appeared (a placeholder, mounted within %s)", r.waited.Round(time.Millisecond))
		}
		log.Info().Str("netns", path).Dur("waited", r.waited).Int("tries", r.tries).Str("reason", why).Msg("netns found")
		d.sink(Event{Kind: KindNetns, Source: SourceNetnsDir, Path: path, Why: why})
	case r.kind == entryPlaceholder:
		ev := log.Warn()
		if strings.HasPrefix(r.name, ".") {
			ev = log.Debug()
		}
		ev.Str("netns", path).Dur("waited", r.waited).Str("reason", "no namespace mounted on it").Msg("gave up on netns dir entry; ignoring it")
		d.unreport(path, e, "no longer a netns")
	default:
		logIgnored(ctx, r.name, path, r.kind.String()).Msg("ignoring netns dir entry")
		d.unreport(path, e, "no longer a netns: "+r.kind.String())
	}
}

// unreport emits KindNetnsGone for an entry that was reported and is no
// longer a namespace (replaced under the same name).
func (d *netnsDir) unreport(path string, e *nsEntry, why string) {
	if e.reported {
		e.reported = false
		d.sink(Event{Kind: KindNetnsGone, Source: SourceNetnsDir, Path: path, Why: why})
	}
}

// forget drops name: a pending check stops, and a reported namespace is
// reported gone.
func (d *netnsDir) forget(ctx context.Context, name, why string) {
	e := d.entries[name]
	if e == nil {
		return
	}
	if e.cancel != nil {
		e.cancel()
	}
	delete(d.entries, name)
	path := filepath.Join(d.dir, name)
	if e.reported {
		zerolog.Ctx(ctx).Info().Str("netns", path).Str("reason", why).Msg("netns gone")
		d.sink(Event{Kind: KindNetnsGone, Source: SourceNetnsDir, Path: path, Why: why})
	}
}

// logIgnored starts the log line for an ignored entry: Debug for dotfiles,
// Info otherwise.
func logIgnored(ctx context.Context, name, path, reason string) *zerolog.Event {
	log := zerolog.Ctx(ctx)
	ev := log.Info()
	if strings.HasPrefix(name, ".") {
		ev = log.Debug()
	}
	return ev.Str("netns", path).Str("reason", reason)
}
