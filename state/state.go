// Package state owns tapsync's per-sandbox records on disk: what cannot be
// observed back from the kernel or QEMU (endpoint index allocation, the
// link identity an endpoint was made for, removals QEMU left pending).
//
// Records are JSON with a schema version, one file per sandbox, replaced
// atomically. A record of an older schema version is migrated when it is
// loaded. The kernel and QEMU stay the truth: a record that cannot be
// read is set aside and rebuilt from observation, never a reason to stop.
// This package decides nothing about endpoints and touches no network
// object.
package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/renameio/v2"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// ErrStore marks a failure of the state directory itself, not of what a
// record says: a record that cannot be read, written or deleted (a full
// or read-only disk, a directory gone). Such errors read
// "state: write record …: no space left on device".
var ErrStore = errors.New("state")

// Version is the record schema this build writes and reads; it reads
// the older ones too (see migrate).
const Version = 2

// DefaultDir lives on tmpfs: records must not survive a reboot, because
// the namespaces and VMs they describe do not.
const DefaultDir = "/run/tapsync"

// Record is what tapsync remembers about one sandbox.
type Record struct {
	Version   int        `json:"version"`
	Sandbox   string     `json:"sandbox"`
	Netns     string     `json:"netns"`
	Endpoints []Endpoint `json:"endpoints"`
	// GuestRoutes and GuestNeighbors fingerprint the routes and permanent
	// neighbours last confirmed in the guest by its agent ("" = none).
	GuestRoutes    string    `json:"guest_routes,omitempty"`
	GuestNeighbors string    `json:"guest_neighbors,omitempty"`
	Updated        time.Time `json:"updated"`
}

// Endpoint is one container link wired (or being wired or unwired) by
// tapsync, under the stable index N of tap<N>_kata and QEMU's tapsync-net<N>.
type Endpoint struct {
	Index int `json:"index"`
	// Identity of the container link the endpoint was made for. A link
	// re-created under the same name has a new ifindex or MAC and is a
	// different endpoint.
	LinkName    string `json:"link_name"`
	LinkIfindex int    `json:"link_ifindex"`
	LinkMAC     string `json:"link_mac"`
	Queues      int    `json:"queues"`
	// Removing is set once the endpoint's removal has started; while it
	// is set the index stays reserved, even if QEMU leaves the unplug
	// pending for a long time.
	Removing bool `json:"removing,omitempty"`
	// UnplugRequested is set once QEMU has been asked to unplug the NIC
	// and the guest has not acknowledged yet: later passes only check
	// back instead of waiting again.
	UnplugRequested bool `json:"unplug_requested,omitempty"`
	// Burned marks an index QEMU can no longer use (a netdev id it holds
	// but cannot delete). The entry stays, reserving the index, for the
	// life of the record; the link gets an endpoint under a new index.
	Burned bool `json:"burned,omitempty"`
	// Guest fingerprints the guest interface configuration last confirmed
	// by the agent for this endpoint's NIC ("" = not configured).
	Guest string `json:"guest,omitempty"`
	// Kind is how the endpoint is wired (see the Kind constants), decided
	// when it is made and kept for its life: a model changed in the
	// config never re-plugs a live endpoint. "" is KindTap (records
	// written before kinds existed).
	Kind string `json:"kind,omitempty"`
	// Moved is what the macvtap model took from the container link, to be
	// given back on removal: recorded before it is taken, since the
	// addresses and routes exist nowhere else meanwhile. LinkMAC is the
	// MAC it took (the guest's).
	Moved *Moved `json:"moved,omitempty"`
	// PlugMTU is the MTU the NIC was plugged with (QEMU's host_mtu, which
	// caps the guest driver's MTU); 0: unknown or none.
	PlugMTU int `json:"plug_mtu,omitempty"`
	// Plugs counts the NIC's plugs, each recorded before it is made: to
	// the guest every plug is a new device, and what tapsync believes of
	// the guest names the plug it was confirmed for.
	Plugs int `json:"plugs,omitempty"`
}

// Endpoint kinds.
const (
	KindTap         = ""             // tcfilter model: our tap tsn<N>, redirects both ways
	KindMacvtap     = "macvtap"      // macvtap model: our macvtap tsm<N> on the container link
	KindTapLink     = "tap-link"     // the container link is a tap: handed to QEMU as it is
	KindMacvtapLink = "macvtap-link" // the container link is a macvtap: its queues handed to QEMU
)

// Moved is what the macvtap model took from a container link, with what
// it takes to give it back as it was, in text form (this package knows no
// network types).
type Moved struct {
	Addrs  []Addr  `json:"addrs,omitempty"`  // in the kernel's order
	Routes []Route `json:"routes,omitempty"` // of every table
}

// Addr is one address taken from a container link, with its attributes.
type Addr struct {
	Prefix    string `json:"prefix"`              // local address and prefix length: 10.1.2.3/24
	Peer      string `json:"peer,omitempty"`      // point-to-point peer address
	Broadcast string `json:"broadcast,omitempty"` // "" = none
	Label     string `json:"label,omitempty"`     // "" = the link's name
	Scope     uint8  `json:"scope,omitempty"`
	Flags     uint32 `json:"flags,omitempty"`  // IFA_F_* as set (nodad, noprefixroute, …)
	Metric    uint32 `json:"metric,omitempty"` // of its prefix route
	Proto     uint8  `json:"proto,omitempty"`
	// ValidUntil and PreferredUntil end finite lifetimes: nanoseconds on
	// CLOCK_MONOTONIC, the clock the kernel counts lifetimes on (records
	// do not outlive a boot). 0 = forever.
	ValidUntil     int64 `json:"valid_until,omitempty"`
	PreferredUntil int64 `json:"preferred_until,omitempty"`
}

// Route is one route that went, or may go, with a container link's
// addresses, with its attributes.
type Route struct {
	IPv6     bool   `json:"ipv6,omitempty"`
	Table    uint32 `json:"table"`
	Dst      string `json:"dst,omitempty"`  // "" = default route
	From     string `json:"from,omitempty"` // source prefix
	Tos      uint8  `json:"tos,omitempty"`
	Protocol uint8  `json:"protocol,omitempty"`
	Scope    uint8  `json:"scope,omitempty"`
	Type     uint8  `json:"type"`
	Flags    uint32 `json:"flags,omitempty"`
	Metric   uint32 `json:"metric,omitempty"`
	Dev      int    `json:"dev,omitempty"` // ifindex; 0 for a multipath route
	Gateway  string `json:"gateway,omitempty"`
	Src      string `json:"src,omitempty"` // preferred source
	Hops     []Hop  `json:"hops,omitempty"`
	// Metrics are the route's RTAX_* metrics by iproute2's names (mtu,
	// advmss, lock, …).
	Metrics map[string]uint32 `json:"metrics,omitempty"`
	CongCtl string            `json:"congctl,omitempty"`
	Pref    uint8             `json:"pref,omitempty"` // IPv6 router preference
	Realm   uint32            `json:"realm,omitempty"`
	// ExpiresAt is when an IPv6 route expires: nanoseconds on
	// CLOCK_MONOTONIC. 0 = never.
	ExpiresAt int64 `json:"expires_at,omitempty"`
}

// Hop is one nexthop of a multipath route.
type Hop struct {
	Dev     int    `json:"dev"`
	Gateway string `json:"gateway,omitempty"`
	Weight  int    `json:"weight,omitempty"`
	Flags   uint8  `json:"flags,omitempty"`
	Realm   uint32 `json:"realm,omitempty"`
}

// Clone returns a deep copy.
func (m Moved) Clone() Moved {
	m.Addrs = slices.Clone(m.Addrs)
	m.Routes = slices.Clone(m.Routes)
	for i, r := range m.Routes {
		m.Routes[i].Hops = slices.Clone(r.Hops)
		m.Routes[i].Metrics = maps.Clone(r.Metrics)
	}
	return m
}

// Endpoint returns the endpoint with index n.
func (r *Record) Endpoint(n int) (Endpoint, bool) {
	i := slices.IndexFunc(r.Endpoints, func(e Endpoint) bool { return e.Index == n })
	if i < 0 {
		return Endpoint{}, false
	}
	return r.Endpoints[i], true
}

// Put adds or replaces the endpoint with e's index, keeping index order.
func (r *Record) Put(e Endpoint) {
	r.Forget(e.Index)
	r.Endpoints = append(r.Endpoints, e)
	slices.SortFunc(r.Endpoints, func(a, b Endpoint) int { return a.Index - b.Index })
}

// Forget drops the endpoint with index n.
func (r *Record) Forget(n int) {
	r.Endpoints = slices.DeleteFunc(r.Endpoints, func(e Endpoint) bool { return e.Index == n })
}

// Clone returns a deep copy.
func (r Record) Clone() Record {
	r.Endpoints = slices.Clone(r.Endpoints)
	for i, e := range r.Endpoints {
		if e.Moved != nil {
			m := e.Moved.Clone()
			r.Endpoints[i].Moved = &m
		}
	}
	return r
}

// Store is the directory of records.
type Store struct {
	dir string
	// cache holds the last record Load decoded per sandbox with the
	// identity of the file it came from: a pass loads its record every
	// time, and a stat that finds the same file costs far less than
	// reading and decoding it again. Save puts what it wrote there
	// (what Load would decode from it); Delete and a set-aside drop the
	// entry; a file changed or replaced by anyone else no longer matches
	// and is read again.
	mu    sync.Mutex
	cache map[string]cachedRecord
}

// cachedRecord is a decoded record and the file it was read from.
type cachedRecord struct {
	file fileID
	rec  Record
}

// fileID tells a file apart from any other or later version of it: Save
// replaces the file by rename, so every version has its own inode, and
// an edit in place changes the modification or change time or the size.
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime syscall.Timespec
}

func fileIDOf(fi os.FileInfo) (fileID, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, false
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}, true
}

func (s *Store) cached(id string, file fileID) (Record, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.cache[id]
	if !ok || c.file != file {
		return Record{}, false
	}
	return c.rec.Clone(), true
}

func (s *Store) remember(id string, file fileID, r Record) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cache[id] = cachedRecord{file: file, rec: r.Clone()}
}

func (s *Store) drop(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.cache, id)
}

// Open creates dir (mode 0700) if needed and refuses one that others can
// read or write: records name namespaces and sockets of every pod, and
// the daemon trusts what it reads there. The directory itself must not be
// a symlink (whoever can re-point it chooses what root reads and writes)
// and must belong to the user tapsync runs as: root in production.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir %s: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return nil, fmt.Errorf("state dir %s: %w", dir, err)
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		to, _ := os.Readlink(dir)
		return nil, fmt.Errorf("state dir %s: is a symlink (to %q); refusing it: set state_dir to a real directory", dir, to)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("state dir %s: not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("state dir %s: owned by uid %d, not by uid %d that tapsync runs as; refusing it: remove it or chown it", dir, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, fmt.Errorf("state dir %s: tighten mode %v to 0700: %w", dir, fi.Mode().Perm(), err)
		}
	}
	return &Store{dir: dir, cache: map[string]cachedRecord{}}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// Sandbox IDs become file names: containerd's ID grammar, nothing that
// could climb out of the directory.
var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// ValidID reports whether id can name a record.
func ValidID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("sandbox id %q: want 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit", id)
	}
	return nil
}

func (s *Store) path(id string) string { return filepath.Join(s.dir, id+".json") }

// Load returns the record of sandbox id; a missing one is a new, empty
// record. A record of an older schema version is migrated to this one
// (and written as this one by the next Save). A record that cannot be
// parsed, or has a schema version this build does not know, is renamed
// to <id>.json.bad-<time> with a log line and an empty record is
// returned, so the caller rebuilds from observation. Under a context from
// ReadOnly the bad record is left where it is.
func (s *Store) Load(ctx context.Context, id string) (Record, error) {
	if err := ValidID(id); err != nil {
		return Record{}, err
	}
	fresh := Record{Version: Version, Sandbox: id}
	p := s.path(id)
	// What the cache holds is told by the path's identity alone (device,
	// inode, size, change and modification times): a stat, where opening,
	// reading the identity and closing was three calls. A record that is
	// not cached, or has changed, is then opened.
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return fresh, nil
	}
	if err == nil {
		if file, ok := fileIDOf(fi); ok {
			if r, ok := s.cached(id, file); ok {
				return r, nil
			}
		}
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return fresh, nil
	}
	if err != nil {
		return Record{}, fmt.Errorf("%w: read record %s: %w", ErrStore, p, err)
	}
	defer f.Close()
	// The identity comes from the open file, so the bytes read below are
	// the version it names even if the file is replaced meanwhile.
	fi, err = f.Stat()
	if err != nil {
		return Record{}, fmt.Errorf("%w: read record %s: %w", ErrStore, p, err)
	}
	file, known := fileIDOf(fi)
	if known {
		if r, ok := s.cached(id, file); ok {
			return r, nil
		}
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return Record{}, fmt.Errorf("%w: read record %s: %w", ErrStore, p, err)
	}
	r, from, err := decode(b)
	why := ""
	if err != nil {
		why = err.Error()
	} else if r.Sandbox != id {
		why = fmt.Sprintf("names sandbox %q", r.Sandbox)
	}
	if why == "" {
		if from != Version {
			zerolog.Ctx(ctx).Info().Str("sandbox", id).Str("record", p).Int("from_version", from).Int("version", Version).
				Msg("record of an older schema migrated")
		}
		if known {
			s.remember(id, file, r)
		}
		return r, nil
	}
	if readOnly(ctx) {
		zerolog.Ctx(ctx).Debug().Str("sandbox", id).Str("record", p).Str("reason", why).
			Msg("record unusable; read-only: left in place, showing a fresh record")
		return fresh, nil
	}
	s.drop(id)
	aside := filepath.Join(s.dir, id+setAsideInfix+time.Now().UTC().Format(setAsideStamp))
	if err := os.Rename(p, aside); err != nil {
		return Record{}, fmt.Errorf("%w: set aside bad record %s (%s): %w", ErrStore, p, why, err)
	}
	zerolog.Ctx(ctx).Warn().Str("sandbox", id).Str("record", p).Str("moved_to", aside).Str("reason", why).
		Msg("record unusable; set aside, rebuilding from what the kernel and QEMU show")
	return fresh, nil
}

// Save replaces the record atomically: temp file in the same directory,
// fsync, rename, fsync of the directory. A crash leaves either the old or
// the new record, never a mix.
func (s *Store) Save(r Record) error {
	if err := ValidID(r.Sandbox); err != nil {
		return err
	}
	r.Version = Version
	r.Updated = time.Now().UTC()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode record of sandbox %s: %w", r.Sandbox, err)
	}
	p := s.path(r.Sandbox)
	s.drop(r.Sandbox)
	file, known, err := s.replace(p, append(b, '\n'))
	if err != nil {
		return fmt.Errorf("%w: write record %s: %w", ErrStore, p, err)
	}
	if err := s.syncDir(); err != nil {
		return err
	}
	if known {
		// The next pass loads what this one saved: from the cache, as
		// long as the file is this one.
		s.remember(r.Sandbox, file, r)
	}
	return nil
}

// replace writes b to a temporary file in the state dir, fsyncs it and
// renames it to p. The temporary file goes straight into the state dir:
// without one named, renameio probes $TMPDIR on every write (a file made
// there and one here, a rename between them, unlinks), and a pass writes
// before each step. It returns the identity of the file now at p as the
// rename left it (the rename changes its ctime), known only when nothing
// wrote to it between the write and that look.
func (s *Store) replace(p string, b []byte) (fileID, bool, error) {
	f, err := renameio.NewPendingFile(p, renameio.WithTempDir(s.dir), renameio.WithPermissions(0o600))
	if err != nil {
		return fileID{}, false, err
	}
	defer f.Cleanup()
	if _, err := f.Write(b); err != nil {
		return fileID{}, false, err
	}
	written, err := f.Stat()
	if err != nil {
		return fileID{}, false, err
	}
	if err := f.CloseAtomicallyReplace(); err != nil {
		return fileID{}, false, err
	}
	// The file at p now: ours while it has our write's inode, size and
	// mtime (another writer's rename or rewrite in between shows).
	fi, err := os.Stat(p)
	if err != nil {
		return fileID{}, false, nil
	}
	before, ok := fileIDOf(written)
	after, ok2 := fileIDOf(fi)
	if !ok || !ok2 || before.dev != after.dev || before.ino != after.ino || before.size != after.size || before.mtime != after.mtime {
		return fileID{}, false, nil
	}
	return after, true, nil
}

// syncDir makes the state dir's entries (a rename, a removal) durable.
// Raw syscalls: an *os.File would register the directory with the
// runtime's poller and unregister it, four more syscalls per write.
func (s *Store) syncDir() error {
	fd, err := unix.Open(s.dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%w: sync state dir %s: %w", ErrStore, s.dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("%w: sync state dir %s: %w", ErrStore, s.dir, err)
	}
	return nil
}

// Delete removes the record of sandbox id; a missing record is success.
func (s *Store) Delete(id string) error {
	if err := ValidID(id); err != nil {
		return err
	}
	s.drop(id)
	if err := os.Remove(s.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: delete record of sandbox %s: %w", ErrStore, id, err)
	}
	return s.syncDir()
}

// List returns the sandbox ids that have a record.
func (s *Store) List() ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("%w: list state dir %s: %w", ErrStore, s.dir, err)
	}
	var ids []string
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if ok && e.Type().IsRegular() && ValidID(id) == nil {
			ids = append(ids, id)
		}
	}
	return ids, nil
}
