package state

import (
	"context"
	"path/filepath"
	"testing"
)

// BenchmarkSave is one record write as a pass makes before each step: a
// temporary file, fsync, rename, fsync of the directory. Set TMPDIR to a
// tmpfs to see it as on a node's /run (66 µs here, 150 µs before the
// temporary file went straight into the state dir).
func BenchmarkSave(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "state"))
	if err != nil {
		b.Fatal(err)
	}
	r := Record{Sandbox: "sb1", Netns: "/var/run/netns/sb1"}
	r.Put(Endpoint{Index: 0, LinkName: "eth0", LinkIfindex: 3, LinkMAC: "02:54:53:00:00:01", Queues: 1})
	r.Put(Endpoint{Index: 1, LinkName: "net1", LinkIfindex: 4, LinkMAC: "02:54:53:00:00:02", Queues: 1})
	b.ReportAllocs()
	for b.Loop() {
		if err := s.Save(r); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoadCached is a pass's read of a record it wrote itself, and
// nobody has changed since: the cached copy, once the file's identity is
// known. 2026-12-07, quiet: 12.5–14.6 µs and 7 allocations with an
// open, fstat and close of the file for the identity; 4.1–4.8 µs and 5
// with one stat of the path.
func BenchmarkLoadCached(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "state"))
	if err != nil {
		b.Fatal(err)
	}
	r := Record{Sandbox: "sb1", Netns: "/var/run/netns/sb1"}
	r.Put(Endpoint{Index: 0, LinkName: "eth0", LinkIfindex: 3, LinkMAC: "02:54:53:00:00:01", Queues: 1})
	if err := s.Save(r); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Load(ctx, "sb1"); err != nil {
			b.Fatal(err)
		}
	}
}
