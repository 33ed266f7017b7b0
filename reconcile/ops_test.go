package reconcile

import "testing"

// TestOpSpecs: every Op is declared in opSpecs, under a name of its own,
// with how it reads and how it is applied; a call to the agent changes
// the guest.
func TestOpSpecs(t *testing.T) {
	seen := map[string]Op{}
	for o := range numOps {
		s := opSpecs[o]
		if s.name == "" || s.text == nil || s.apply == nil {
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
