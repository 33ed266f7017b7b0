package state_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/state"
)

func ctxWithLog(buf *bytes.Buffer) context.Context {
	l := zerolog.New(buf)
	return l.WithContext(context.Background())
}

func TestSaveLoadRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode %v, want 0700", fi.Mode().Perm())
	}
	ctx := context.Background()
	r, err := s.Load(ctx, "sb1")
	if err != nil || len(r.Endpoints) != 0 || r.Sandbox != "sb1" {
		t.Fatalf("Load of a new sandbox = %+v, %v", r, err)
	}
	r.Netns = "/var/run/netns/sb1"
	r.Put(state.Endpoint{Index: 2, LinkName: "net1", LinkIfindex: 7, LinkMAC: "02:00:00:00:00:07", Queues: 2})
	r.Put(state.Endpoint{Index: 0, LinkName: "eth0", LinkIfindex: 3, LinkMAC: "02:00:00:00:00:03", Queues: 1, Removing: true})
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load(ctx, "sb1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Netns != r.Netns || len(got.Endpoints) != 2 || got.Endpoints[0].Index != 0 || !got.Endpoints[0].Removing ||
		got.Endpoints[1] != r.Endpoints[1] || got.Version != state.Version {
		t.Errorf("round trip = %+v, want %+v", got, r)
	}
	if fi, _ := os.Stat(filepath.Join(dir, "sb1.json")); fi.Mode().Perm() != 0o600 {
		t.Errorf("record mode %v, want 0600", fi.Mode().Perm())
	}
	ids, err := s.List()
	if err != nil || len(ids) != 1 || ids[0] != "sb1" {
		t.Errorf("List = %v, %v", ids, err)
	}
	for range 2 {
		if err := s.Delete("sb1"); err != nil {
			t.Fatal(err)
		}
	}
	if ids, _ := s.List(); len(ids) != 0 {
		t.Errorf("List after Delete = %v", ids)
	}
}

func TestBadRecordsAreSetAside(t *testing.T) {
	for name, content := range map[string]string{
		"garbage":      "\x00\x01 not json {{{",
		"truncated":    `{"version":1,"sandbox":"sb","endpoints":[{"index":`,
		"future":       `{"version":99,"sandbox":"sb","endpoints":[]}`,
		"wrong owner":  `{"version":1,"sandbox":"other","endpoints":[]}`,
		"wrong schema": `{"version":1,"sandbox":"sb","endpoints":{"a":1}}`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := state.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "sb.json"), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			var log bytes.Buffer
			r, err := s.Load(ctxWithLog(&log), "sb")
			if err != nil {
				t.Fatalf("Load = %v, want a fresh record", err)
			}
			if r.Sandbox != "sb" || len(r.Endpoints) != 0 || r.Version != state.Version {
				t.Errorf("record = %+v, want a fresh one", r)
			}
			if !strings.Contains(log.String(), "set aside") || !strings.Contains(log.String(), `"sandbox":"sb"`) {
				t.Errorf("log = %s, want a line saying the record was set aside", log.String())
			}
			matches, _ := filepath.Glob(filepath.Join(dir, "sb.json.bad-*"))
			if len(matches) != 1 {
				t.Fatalf("set-aside files = %v, want one", matches)
			}
			if b, _ := os.ReadFile(matches[0]); string(b) != content {
				t.Errorf("set-aside content changed")
			}
			if ids, _ := s.List(); len(ids) != 0 {
				t.Errorf("List = %v, want the bad record not listed", ids)
			}
			// The rebuilt record saves cleanly over the old name.
			if err := s.Save(r); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestInvalidIDs(t *testing.T) {
	s, err := state.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", "../etc/passwd", "a/b", ".hidden", strings.Repeat("x", 129)} {
		if _, err := s.Load(context.Background(), id); err == nil {
			t.Errorf("Load(%q) succeeded", id)
		}
		if err := s.Save(state.Record{Sandbox: id}); err == nil {
			t.Errorf("Save(%q) succeeded", id)
		}
	}
}

func TestOpenTightensLooseDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "loose")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := state.Open(dir); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("mode %v, want 0700", fi.Mode().Perm())
	}
	f := filepath.Join(t.TempDir(), "file")
	os.WriteFile(f, nil, 0o600)
	if _, err := state.Open(f); err == nil || !strings.Contains(err.Error(), f) {
		t.Errorf("Open(file) = %v, want an error naming it", err)
	}
}
