package state_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tapsync/tapsync/state"
)

// A second holder of one state dir is refused with the first one's pid;
// once the first lets go, the dir can be taken again.
func TestLockIsExclusive(t *testing.T) {
	s, err := state.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	first, err := s.Lock()
	if err != nil {
		t.Fatal(err)
	}
	// flock belongs to the open file, so a second open in this process
	// conflicts just as another daemon's would.
	_, err = s.Lock()
	if !errors.Is(err, state.ErrLocked) || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) {
		t.Fatalf("second Lock = %v, want ErrLocked naming pid %d", err, os.Getpid())
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := s.Lock()
	if err != nil {
		t.Fatalf("Lock after Close = %v", err)
	}
	again.Close()
	if ids, _ := s.List(); len(ids) != 0 {
		t.Errorf("List = %v: the lock file must not look like a record", ids)
	}
}

func TestOpenRefusesSymlink(t *testing.T) {
	real := filepath.Join(t.TempDir(), "real")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if _, err := state.Open(link); err == nil || !strings.Contains(err.Error(), "symlink") || !strings.Contains(err.Error(), link) {
		t.Errorf("Open(symlink) = %v, want a refusal naming it as a symlink", err)
	}
}

func TestOpenRefusesForeignOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a directory to another user (run the tests as root)")
	}
	dir := filepath.Join(t.TempDir(), "foreign")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := state.Open(dir); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Errorf("Open(dir of uid 65534) = %v, want a refusal naming the owner", err)
	}
}

// Set-aside records older than the cutoff go, younger ones and files this
// package did not name stay.
func TestCollectSetAside(t *testing.T) {
	dir := t.TempDir()
	s, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	stamp := func(at time.Time) string { return at.Format("20060102T150405.000000000") }
	files := map[string]bool{ // name → want it kept
		"old.json.bad-" + stamp(now.Add(-25*time.Hour)):  false,
		"old.json.bad-" + stamp(now.Add(-48*time.Hour)):  false,
		"new.json.bad-" + stamp(now.Add(-1*time.Hour)):   true,
		"odd.json.bad-yesterday":                         true,
		"sb.json":                                        true,
		"notes.txt":                                      true,
		"..json.bad-" + stamp(now.Add(-100*time.Hour)):   true, // not a valid id: not ours
		"sb2.json.bad-" + stamp(now.Add(-24*time.Hour)):  true, // exactly at the cutoff
		"sb3.json.bad-" + stamp(now.Add(-240*time.Hour)): false,
	}
	for name := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("{}"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var log bytes.Buffer
	gone, err := s.CollectSetAside(ctxWithLog(&log), now.Add(-state.KeepSetAside))
	if err != nil {
		t.Fatal(err)
	}
	for name, keep := range files {
		_, statErr := os.Stat(filepath.Join(dir, name))
		if kept := statErr == nil; kept != keep {
			t.Errorf("%s: kept=%v, want %v", name, kept, keep)
		}
		if !keep && !slices.Contains(gone, name) {
			t.Errorf("%s deleted but not returned in %v", name, gone)
		}
		if !keep && !strings.Contains(log.String(), name) {
			t.Errorf("no log line names %s: %s", name, log.String())
		}
	}
	if len(gone) != 3 {
		t.Errorf("gone = %v, want 3 files", gone)
	}
	// Idempotent: nothing left to collect.
	if again, err := s.CollectSetAside(context.Background(), now.Add(-state.KeepSetAside)); err != nil || len(again) != 0 {
		t.Errorf("second collection = %v, %v", again, err)
	}
}

// A record set aside by Load is collected once it is old enough.
func TestSetAsideRecordIsCollected(t *testing.T) {
	dir := t.TempDir()
	s, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "sb.json"), []byte("junk"), 0o600)
	if _, err := s.Load(context.Background(), "sb"); err != nil {
		t.Fatal(err)
	}
	if gone, _ := s.CollectSetAside(context.Background(), time.Now().Add(-state.KeepSetAside)); len(gone) != 0 {
		t.Errorf("a fresh set-aside record was collected: %v", gone)
	}
	gone, err := s.CollectSetAside(context.Background(), time.Now().Add(time.Minute))
	if err != nil || len(gone) != 1 || !strings.HasPrefix(gone[0], "sb.json.bad-") {
		t.Errorf("collection = %v, %v; want the set-aside record", gone, err)
	}
}

// Under ReadOnly a bad record is reported fresh and left in place.
func TestReadOnlyLoadLeavesBadRecord(t *testing.T) {
	dir := t.TempDir()
	s, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "sb.json")
	os.WriteFile(p, []byte("junk"), 0o600)
	before, _ := os.ReadDir(dir)
	r, err := s.Load(state.ReadOnly(context.Background()), "sb")
	if err != nil || r.Sandbox != "sb" || len(r.Endpoints) != 0 {
		t.Fatalf("read-only Load = %+v, %v; want a fresh record", r, err)
	}
	after, _ := os.ReadDir(dir)
	if len(before) != len(after) {
		t.Errorf("directory changed under a read-only Load: %v → %v", before, after)
	}
	if b, _ := os.ReadFile(p); string(b) != "junk" {
		t.Errorf("bad record changed: %q", b)
	}
}
