package state_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/state"
)

// TestLoadMigratesVersion1 loads a record that the previous build
// (schema version 1) wrote for a sandbox in the macvtap model: eth0 with
// an IPv4 and two IPv6 addresses, a default route and two more taken. It
// is migrated, not set aside: nothing of what was taken is lost, and
// what version 1 did not record is what its give-back made.
func TestLoadMigratesVersion1(t *testing.T) {
	s, p, _ := v1Store(t)
	var log bytes.Buffer
	r, err := s.Load(ctxWithLog(&log), "sb1")
	if err != nil {
		t.Fatal(err)
	}
	if aside, _ := filepath.Glob(p + ".bad-*"); len(aside) != 0 {
		t.Fatalf("version 1 record set aside: %v", aside)
	}
	if !strings.Contains(log.String(), `"from_version":1`) {
		t.Errorf("no log line says the record was migrated: %s", log.String())
	}
	want := state.Endpoint{Index: 0, LinkName: "eth0", LinkIfindex: 2, LinkMAC: "02:54:53:00:01:02", Queues: 1,
		Kind: state.KindMacvtap, PlugMTU: 1500, Plugs: 1, Moved: &state.Moved{
			Addrs: []state.Addr{
				{Prefix: "192.168.70.2/24", Broadcast: "192.168.70.255"},
				{Prefix: "fd70::2/64"},
				{Prefix: "fe80::54:53ff:fe00:102/64", Scope: 253},
			},
			Routes: []state.Route{
				{Table: 254, Type: 1, Gateway: "192.168.70.1", Protocol: 3, Dev: 2},
				{Table: 254, Type: 1, Dst: "172.30.0.0/24", Gateway: "192.168.70.1", Protocol: 3, Dev: 2},
				{IPv6: true, Table: 254, Type: 1, Dst: "fd80::/64", Gateway: "fd70::1", Protocol: 3, Dev: 2, Metric: 1024,
					Metrics: map[string]uint32{"mtu": 1300}},
			},
		}}
	if r.Version != state.Version || r.Sandbox != "sb1" || r.Netns != "/var/run/netns/tapsync-rc-aa8582c0" || len(r.Endpoints) != 1 ||
		!reflect.DeepEqual(r.Endpoints[0], want) {
		t.Fatalf("migrated record:\n got %+v\n     %+v\nwant %+v\n     %+v", r, r.Endpoints[0].Moved, want, want.Moved)
	}

	// Saved, it is a record of this version, and loads as it was.
	if err := s.Save(r); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`"version": 2`)) {
		t.Errorf("saved record:\n%s\nwant version 2", b)
	}
	log.Reset()
	back, err := s.Load(ctxWithLog(&log), "sb1")
	if err != nil {
		t.Fatal(err)
	}
	back.Updated, r.Updated = time.Time{}, time.Time{}
	if !reflect.DeepEqual(back, r) || log.Len() != 0 {
		t.Errorf("reloaded %+v, want %+v (log %s)", back, r, log.String())
	}
}

// A read-only load (tapsync plan) migrates in memory and leaves the file
// as it is.
func TestReadOnlyLoadMigratesInMemory(t *testing.T) {
	s, p, old := v1Store(t)
	r, err := s.Load(state.ReadOnly(context.Background()), "sb1")
	if err != nil || len(r.Endpoints) != 1 || r.Endpoints[0].Moved == nil || len(r.Endpoints[0].Moved.Addrs) != 3 {
		t.Fatalf("read-only load = %+v, %v", r, err)
	}
	if now, _ := os.ReadFile(p); !bytes.Equal(now, old) {
		t.Error("a read-only load changed the file")
	}
}

// v1Store is a store holding, as sb1.json at p, the version 1 record old
// (testdata/v1-macvtap.json).
func v1Store(t *testing.T) (s *state.Store, p string, old []byte) {
	t.Helper()
	old, err := os.ReadFile("testdata/v1-macvtap.json")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if s, err = state.Open(dir); err != nil {
		t.Fatal(err)
	}
	p = filepath.Join(dir, "sb1.json")
	if err := os.WriteFile(p, old, 0o600); err != nil {
		t.Fatal(err)
	}
	return s, p, old
}
