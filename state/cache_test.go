package state

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// Load reuses a decoded record only while the file is the one it came
// from: a caller's changes to its copy stay its own, and a file replaced
// or rewritten by anyone else is read again.
func TestLoadCacheFollowsTheFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	r := Record{Sandbox: "sb", Netns: "/run/netns/a"}
	r.Put(Endpoint{Index: 0, LinkName: "eth0", Moved: &Moved{Addrs: []Addr{{Prefix: "10.0.0.2/24"}},
		Routes: []Route{{Table: 254, Metrics: map[string]uint32{"mtu": 1400}, Hops: []Hop{{Dev: 3}}}}}})
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	first, err := s.Load(ctx, "sb")
	if err != nil {
		t.Fatal(err)
	}
	first.Endpoints[0].Moved.Addrs[0].Prefix = "changed by the caller"
	first.Endpoints[0].Moved.Routes[0].Metrics["mtu"] = 9000
	first.Endpoints[0].Moved.Routes[0].Hops[0].Dev = 9
	first.Put(Endpoint{Index: 1})
	again, err := s.Load(ctx, "sb")
	if err != nil {
		t.Fatal(err)
	}
	if m := again.Endpoints[0].Moved; len(again.Endpoints) != 1 || m.Addrs[0].Prefix != "10.0.0.2/24" || m.Routes[0].Metrics["mtu"] != 1400 || m.Routes[0].Hops[0].Dev != 3 {
		t.Fatalf("second load %+v: a caller's changes leaked into the store", again)
	}

	// Another writer (a second Store on the directory, as `tapsync plan`
	// or a restarted daemon has) replaces the file.
	other, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	r.Netns = "/run/netns/b"
	if err := other.Save(r); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Load(ctx, "sb"); err != nil || got.Netns != "/run/netns/b" {
		t.Fatalf("after another store saved: %+v, %v; want netns /run/netns/b", got, err)
	}

	// Rewritten in place with garbage: set aside, fresh record.
	if err := os.WriteFile(filepath.Join(dir, "sb.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Load(ctx, "sb"); err != nil || len(got.Endpoints) != 0 || got.Netns != "" {
		t.Fatalf("after the file was corrupted: %+v, %v; want a fresh record", got, err)
	}

	// Deleted: fresh.
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "sb"); err != nil {
		t.Fatal(err)
	}
	if err := other.Delete("sb"); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Load(ctx, "sb"); err != nil || len(got.Endpoints) != 0 {
		t.Fatalf("after another store deleted it: %+v, %v; want a fresh record", got, err)
	}
}

// Save leaves in the cache what Load would decode from the file it
// wrote, and only while the file is that one.
func TestSaveFillsTheCache(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	r := Record{Sandbox: "sb", Netns: "/run/netns/a", GuestRoutes: "digest"}
	r.Put(Endpoint{Index: 0, LinkName: "eth0", LinkMAC: "02:00:00:00:00:01", Plugs: 2, Moved: &Moved{Addrs: []Addr{{Prefix: "10.0.0.2/24"}},
		Routes: []Route{{Table: 254, Metrics: map[string]uint32{"mtu": 1400}, Hops: []Hop{{Dev: 3}}}}}})
	r.Put(Endpoint{Index: 1, LinkName: "net1", Removing: true})
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	_, cached := s.cache["sb"]
	s.mu.Unlock()
	if !cached {
		t.Fatal("Save left nothing in the cache")
	}
	fromCache, err := s.Load(ctx, "sb")
	if err != nil {
		t.Fatal(err)
	}
	other, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	fromFile, err := other.Load(ctx, "sb")
	if err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal(fromCache)
	b, _ := json.Marshal(fromFile)
	if string(a) != string(b) || !fromCache.Updated.Equal(fromFile.Updated) {
		t.Fatalf("cached after Save:\n%s\ndecoded from the file:\n%s", a, b)
	}

	// Written in place after the Save: read again.
	if err := os.WriteFile(filepath.Join(dir, "sb.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Load(ctx, "sb"); err != nil || len(got.Endpoints) != 0 {
		t.Fatalf("after the saved file was rewritten: %+v, %v; want a fresh record", got, err)
	}
}
