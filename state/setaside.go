package state

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// A record that cannot be read is renamed to <id>.json.bad-<UTC time>.
// The time in the name is when it was set aside: the file's own mtime is
// when it was last written, and rename keeps that.
const (
	setAsideInfix = ".json.bad-"
	setAsideStamp = "20060102T150405.000000000"
)

// KeepSetAside is how long a set-aside record is kept. It is evidence for
// an operator (what a crash or an older build left behind), not state:
// nothing reads it back, so after a day it only fills the tmpfs.
const KeepSetAside = 24 * time.Hour

// CollectSetAside deletes the set-aside records that were set aside
// before cutoff, logging each, and returns their file names. Files whose
// names this package did not make are left alone.
func (s *Store) CollectSetAside(ctx context.Context, cutoff time.Time) ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("%w: list state dir %s: %w", ErrStore, s.dir, err)
	}
	var gone []string
	var errs []error
	for _, e := range ents {
		id, stamp, ok := strings.Cut(e.Name(), setAsideInfix)
		if !ok || !e.Type().IsRegular() || ValidID(id) != nil {
			continue
		}
		at, err := time.Parse(setAsideStamp, stamp)
		if err != nil || !at.Before(cutoff) {
			continue
		}
		p := filepath.Join(s.dir, e.Name())
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("%w: delete set-aside record %s: %w", ErrStore, p, err))
			continue
		}
		zerolog.Ctx(ctx).Info().Str("sandbox", id).Str("record", p).Time("set_aside_at", at).
			Msg("set-aside record deleted: older than the time such records are kept")
		gone = append(gone, e.Name())
	}
	return gone, errors.Join(errs...)
}

type readOnlyKey struct{}

// ReadOnly returns a context under which Load changes nothing on disk: a
// bad record is reported as a fresh one but not set aside. It is for
// callers that only look (`tapsync plan`).
func ReadOnly(ctx context.Context) context.Context {
	return context.WithValue(ctx, readOnlyKey{}, true)
}

func readOnly(ctx context.Context) bool {
	v, _ := ctx.Value(readOnlyKey{}).(bool)
	return v
}
