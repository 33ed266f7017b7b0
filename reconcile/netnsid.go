package reconcile

import (
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// netnsID identifies a netns file however its path is spelled.
// /run/netns/x and /var/run/netns/x are one, and so are a bind mount and
// /proc/<pid>/ns/net of the same namespace.
type netnsID struct {
	ns   [2]uint64 // device and inode of the nsfs inode; zero when the path is no netns (yet)
	dir  [2]uint64 // device and inode of the directory holding the path; zero when it cannot be read
	name string    // the last component of the path
	path string    // the cleaned path: the last resort, when not even the directory exists
}

// identify reads the identity of the netns at path. A netns that is gone
// or not mounted yet (an empty placeholder) has no namespace identity;
// it is then known by its place: directory identity and name.
func identify(path string) netnsID {
	id := netnsID{path: filepath.Clean(path)}
	id.name = filepath.Base(id.path) // of the cleaned path, as dir is
	// One O_PATH descriptor for both questions, so that they are about
	// the same inode. Equivalent to: stat -L -c %d:%i P; stat -f -c %T P (nsfs)
	if fd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0); err == nil {
		var st unix.Stat_t
		var fs unix.Statfs_t
		if unix.Fstat(fd, &st) == nil && unix.Fstatfs(fd, &fs) == nil && fs.Type == unix.NSFS_MAGIC {
			id.ns = [2]uint64{st.Dev, st.Ino}
		}
		unix.Close(fd)
	}
	var st unix.Stat_t
	if unix.Stat(filepath.Dir(id.path), &st) == nil {
		id.dir = [2]uint64{st.Dev, st.Ino}
	}
	return id
}

// same reports whether a and b are one netns: the same namespace, or,
// when either has no namespace yet, the same file.
func (a netnsID) same(b netnsID) bool {
	if a.ns != [2]uint64{} && a.ns == b.ns {
		return true
	}
	if a.ns != [2]uint64{} && b.ns != [2]uint64{} {
		return false
	}
	if a.dir != [2]uint64{} && b.dir != [2]uint64{} {
		return a.dir == b.dir && a.name == b.name
	}
	return a.path == b.path
}

// samePlace reports whether a and b are the same path, whatever netns
// is (or was) mounted there.
func (a netnsID) samePlace(b netnsID) bool {
	if a.dir != [2]uint64{} && b.dir != [2]uint64{} {
		return a.dir == b.dir && a.name == b.name
	}
	return a.path == b.path
}

// netnsOf is a registered sandbox's netns path and its identity as last
// read, copied out of the registry to be compared without its lock.
type netnsOf struct {
	path  string
	ident netnsID
}

// netnsesLocked copies the netnsOf of every sandbox but skip that the
// index says can match want; r.mu must be held.
func (r *Reconciler) netnsesLocked(want netnsID, skip string) map[string]netnsOf {
	out := map[string]netnsOf{}
	r.netnses.candidates(want, skip, func(id string) {
		if e := r.sandboxes[id]; e != nil {
			out[id] = netnsOf{e.sb.Netns, e.ident}
		}
	})
	return out
}

// inNetns returns, sorted, the sandboxes among all whose netns is want
// or at want's place.
func inNetns(all map[string]netnsOf, want netnsID) []string {
	var ids []string
	for id, n := range all {
		if have := n.compared(want); have.same(want) || have.samePlace(want) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// compared is the identity to compare with want: the cached one, unless
// it may be out of date for this comparison — no netns was mounted when
// it was read, or it is the same place as want (a netns file can be
// replaced by another at the same path) — then read again.
func (n netnsOf) compared(want netnsID) netnsID {
	if n.ident.ns == [2]uint64{} || n.ident.samePlace(want) || n.ident.ns == want.ns {
		// Read again also before calling two netns one: the kernel reuses
		// the inode number of a dead netns, and a sandbox waiting for its
		// netns to come back still holds the dead one's.
		return identify(n.path)
	}
	return n.ident
}

// netnsIndex finds the registered sandboxes a netns identity can match
// (see compared and same) without reading every registration: those in
// the same namespace, those at a path of the same name (two spellings of
// one place share their last component), and those with no namespace
// known, which are always read again. It is kept under r.mu.
type netnsIndex struct {
	byNs   map[[2]uint64]map[string]bool
	byName map[string]map[string]bool
	noNs   map[string]bool
	of     map[string]netnsID // id → the identity it is indexed under
}

func newNetnsIndex() netnsIndex {
	return netnsIndex{byNs: map[[2]uint64]map[string]bool{}, byName: map[string]map[string]bool{}, noNs: map[string]bool{}, of: map[string]netnsID{}}
}

// set indexes sandbox id under ident, in place of what it was under.
func (x netnsIndex) set(id string, ident netnsID) {
	x.drop(id)
	x.of[id] = ident
	addTo(x.byName, ident.name, id)
	if ident.ns == [2]uint64{} {
		x.noNs[id] = true
	} else {
		addTo(x.byNs, ident.ns, id)
	}
}

// drop forgets sandbox id.
func (x netnsIndex) drop(id string) {
	ident, ok := x.of[id]
	if !ok {
		return
	}
	delete(x.of, id)
	delete(x.noNs, id)
	removeFrom(x.byName, ident.name, id)
	removeFrom(x.byNs, ident.ns, id)
}

// candidates calls fn, perhaps more than once, for every sandbox but
// skip whose identity as compared with want can be the same netns or the
// same place; the others cannot (compared keeps their cached identity,
// whose namespace differs and whose place does).
func (x netnsIndex) candidates(want netnsID, skip string, fn func(id string)) {
	each := func(set map[string]bool) {
		for id := range set {
			if id != skip {
				fn(id)
			}
		}
	}
	each(x.noNs)
	each(x.byName[want.name])
	if want.ns != [2]uint64{} {
		each(x.byNs[want.ns])
	}
}

func addTo[K comparable](m map[K]map[string]bool, k K, id string) {
	if m[k] == nil {
		m[k] = map[string]bool{}
	}
	m[k][id] = true
}

func removeFrom[K comparable](m map[K]map[string]bool, k K, id string) {
	delete(m[k], id)
	if len(m[k]) == 0 {
		delete(m, k)
	}
}
