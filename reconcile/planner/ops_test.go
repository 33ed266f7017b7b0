package planner

import "testing"

// TestOpSpecs: every Op is declared in opSpecs, under a name of its own,
// with how it reads; a call to the agent changes the guest.
func TestOpSpecs(t *testing.T) {
	seen := map[string]Op{}
	for o := range NumOps {
		s := opSpecs[o]
		if s.name == "" || s.text == nil {
			t.Errorf("Op %d has no complete entry in opSpecs: %+v", o, s)
			continue
		}
		if prev, ok := seen[s.name]; ok {
			t.Errorf("Ops %d and %d are both named %q", prev, o, s.name)
		}
		seen[s.name] = o
		if s.guestward && !s.mutates {
			t.Errorf("%s calls the agent but is not counted as a mutation", s.name)
		}
	}
}
