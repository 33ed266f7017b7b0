package reconcile

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/state"
)

func TestCollectGarbage(t *testing.T) {
	dir := t.TempDir()
	store, err := state.Open(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	alive := filepath.Join(dir, "netns-alive") // stands in for a bind-mounted netns file
	if err := os.WriteFile(alive, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for id, netns := range map[string]string{
		"gone":       filepath.Join(dir, "netns-gone"),
		"alive":      alive,
		"registered": filepath.Join(dir, "netns-gone-too"),
	} {
		if err := store.Save(state.Record{Sandbox: id, Netns: netns, Endpoints: []state.Endpoint{{Index: 0}}}); err != nil {
			t.Fatal(err)
		}
	}
	r := New(store)
	if _, err := r.Register(Sandbox{ID: "registered", Netns: filepath.Join(dir, "netns-gone-too"), QMP: "/nonexistent.sock"}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	gone, err := r.CollectGarbage(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(gone, []string{"gone"}) {
		t.Errorf("collected %v, want [gone]", gone)
	}
	ids, _ := store.List()
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"alive", "registered"}) {
		t.Errorf("records left %v, want alive and registered (a registered sandbox waits for its netns)", ids)
	}
}

// A pass reads addresses, routes and neighbours only when its plan can use them: a
// dump costs as much as the kernel's own work for a link's removal.
func TestObservedParts(t *testing.T) {
	guest := agent.URL{Scheme: "unix", Path: "/run/agent.sock"}
	macvtapRec := state.Record{Endpoints: []state.Endpoint{{Index: 0, Kind: state.KindMacvtap}}}
	for _, tc := range []struct {
		name string
		sb   Sandbox
		rec  state.Record
		want datapath.Parts
	}{
		{"host side only, tcfilter", Sandbox{}, state.Record{Endpoints: []state.Endpoint{{Index: 0}}}, datapath.Parts{}},
		{"guest side", Sandbox{Agent: guest}, state.Record{}, datapath.All},
		{"macvtap model", Sandbox{Model: ModelMacvtap}, state.Record{}, datapath.Parts{Addrs: true, Routes: true}},
		{"a macvtap endpoint recorded, model now tcfilter", Sandbox{}, macvtapRec, datapath.Parts{Addrs: true, Routes: true}},
	} {
		s := &session{sb: tc.sb, rec: tc.rec}
		if got := s.parts(); got != tc.want {
			t.Errorf("%s: parts %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

// withRuntime runs f on sandbox id's runtime (nil when id is not
// registered) under r.mu.
func withRuntime(r *Reconciler, id string, f func(rt *sandboxRuntime)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r.sandboxes[id])
}
