package state_test

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/tapsync/tapsync/state"
)

// FuzzLoad feeds arbitrary bytes as a record. Load never panics and never
// fails on content: it returns the record, or a fresh one after setting
// the file aside. A record it accepts survives Save and Load unchanged.
func FuzzLoad(f *testing.F) {
	for _, seed := range []string{
		`{"version":1,"sandbox":"sb","netns":"/var/run/netns/sb","endpoints":[{"index":0,"link_name":"eth0","link_ifindex":3,"link_mac":"02:00:00:00:00:03","queues":1}]}`,
		`{"version":1,"sandbox":"sb","endpoints":[{"index":2,"removing":true,"unplug_requested":true,"burned":true,"guest":"x"}],"guest_routes":"r"}`,
		`{"version":1,"sandbox":"sb","endpoints":null}`,
		`{"version":99,"sandbox":"sb"}`,
		`{"version":1,"sandbox":"other"}`,
		`{"version":1,"sandbox":"sb","endpoints":{"a":1}}`,
		`{"version":1,"sandbox":"sb","endpoints":[{"index":-1}],"updated":"not a time"}`,
		`{"version":1e400}`,
		`[]`, `null`, ``, "\x00\xff", `{"version":1,"sandbox":"sb"`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		s, err := state.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, "sb.json")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		r, err := s.Load(ctx, "sb")
		if err != nil {
			t.Fatalf("Load of content %q = %v; content must never be an error", data, err)
		}
		if r.Sandbox != "sb" || r.Version != state.Version {
			t.Fatalf("Load = %+v, want a record of sandbox sb, version %d", r, state.Version)
		}
		aside, _ := filepath.Glob(p + ".bad-*")
		_, statErr := os.Stat(p)
		switch {
		case len(aside) == 1 && os.IsNotExist(statErr):
			if len(r.Endpoints) != 0 {
				t.Fatalf("record set aside but Load returned endpoints %+v", r.Endpoints)
			}
		case len(aside) == 0 && statErr == nil:
			// Accepted: it must round-trip.
			if err := s.Save(r); err != nil {
				t.Fatalf("Save of an accepted record: %v", err)
			}
			back, err := s.Load(ctx, "sb")
			if err != nil {
				t.Fatal(err)
			}
			back.Updated, r.Updated = time.Time{}, time.Time{} // Save stamps its own time
			if !reflect.DeepEqual(normal(back), normal(r)) {
				t.Fatalf("round trip changed the record:\n got %+v\nwant %+v", back, r)
			}
		default:
			ents, _ := os.ReadDir(dir)
			t.Fatalf("after Load: record present=%v, set aside %v (dir %v); want exactly one of them", statErr == nil, aside, ents)
		}
	})
}

// normal makes an empty endpoint list and a missing one compare equal
// (JSON null and [] both load as no endpoints).
func normal(r state.Record) state.Record {
	if len(r.Endpoints) == 0 {
		r.Endpoints = nil
	}
	r.Updated = r.Updated.UTC()
	return r
}
