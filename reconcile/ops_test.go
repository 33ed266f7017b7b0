package reconcile

import (
	"context"
	"testing"

	"github.com/tapsync/tapsync/reconcile/planner"
)

// TestAppliers: every Op has an entry in appliers, and one outside them
// fails when applied instead of doing nothing.
func TestAppliers(t *testing.T) {
	for o := range planner.NumOps {
		if appliers[o] == nil {
			t.Errorf("%s has no entry in appliers", o)
		}
	}
	if err := applierOf(planner.NumOps)(nil, context.Background(), Action{Op: planner.NumOps}, nil); err == nil {
		t.Errorf("an Op outside appliers applied without error")
	}
}
