package reconcile

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// The netns index answers as reading every registration would, through
// registrations, unregistrations, passes that read identities again, and
// netns files that appear, vanish and change namespace under their path:
// InNetns and a scan of every sandbox agree on every path after every
// step, and the index holds exactly the identities the registry does.
// The paths spell one namespace several ways (the same name in two
// directories, another name by symlink, a path with ..), so every way the
// comparison can match is exercised without root.
func TestNetnsIndexAgreesWithScan(t *testing.T) {
	root := t.TempDir()
	a, b := filepath.Join(root, "a"), filepath.Join(root, "b")
	for _, d := range []string{a, b} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ours := "/proc/self/ns/net" // a namespace every user can name
	paths := []string{
		filepath.Join(a, "x"), filepath.Join(b, "x"), filepath.Join(a, "y"),
		filepath.Join(b, "z"), filepath.Join(b, "..", "a", "y"), ours,
	}
	// What a path can be made: a netns (a symlink to ours), a placeholder
	// (an empty file), or nothing.
	set := func(p string, what int) {
		if p == ours {
			return
		}
		_ = os.Remove(p)
		switch what {
		case 1:
			if err := os.Symlink(ours, p); err != nil {
				t.Fatal(err)
			}
		case 2:
			if err := os.WriteFile(p, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	scan := func(r *Reconciler, path string) []string {
		want := identify(path)
		r.mu.Lock()
		all := map[string]netnsOf{}
		for id, e := range r.sandboxes {
			all[id] = netnsOf{e.sb.Netns, e.ident}
		}
		r.mu.Unlock()
		return inNetns(all, want)
	}
	sources := []Source{SourceProc, SourceContainerd, SourceConfig}
	for seed := range uint64(20) {
		r := newTestReconciler(t)
		rng := rand.New(rand.NewPCG(seed, 1))
		for _, p := range paths {
			set(p, rng.IntN(3))
		}
		for step := range 200 {
			id := fmt.Sprintf("sb%d", rng.IntN(6))
			var did string
			switch op := rng.IntN(10); {
			case op < 5:
				p := paths[rng.IntN(len(paths))]
				sb := Sandbox{ID: id, Netns: p, QMP: "/run/vc/" + id + "/qmp.sock"}
				if _, err := r.Register(sb, sources[rng.IntN(len(sources))]); err != nil {
					t.Fatal(err)
				}
				did = "register " + id + " at " + p
			case op < 6:
				r.Unregister(id)
				did = "unregister " + id
			case op < 8:
				if sb, _, ok := r.Registered(id); ok {
					r.reidentify(id, sb.Netns, identify(sb.Netns).ns)
				}
				did = "read " + id + " again"
			default:
				p := paths[rng.IntN(len(paths)-1)]
				what := rng.IntN(3)
				set(p, what)
				did = fmt.Sprintf("make %s %d", p, what)
			}
			for _, p := range paths {
				if got, want := r.InNetns(p), scan(r, p); !slices.Equal(got, want) {
					t.Fatalf("seed %d step %d (%s): InNetns(%s) = %v, a scan of every sandbox finds %v", seed, step, did, p, got, want)
				}
			}
			r.mu.Lock()
			if len(r.netnses.of) != len(r.sandboxes) {
				t.Fatalf("seed %d step %d (%s): the index holds %d sandboxes, the registry %d", seed, step, did, len(r.netnses.of), len(r.sandboxes))
			}
			for sid, e := range r.sandboxes {
				if r.netnses.of[sid] != e.ident {
					t.Fatalf("seed %d step %d (%s): sandbox %s indexed as %+v, registered as %+v", seed, step, did, sid, r.netnses.of[sid], e.ident)
				}
			}
			r.mu.Unlock()
		}
	}
}
