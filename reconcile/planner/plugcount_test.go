package planner

import (
	"testing"

	"github.com/tapsync/tapsync/state"
)

// A plug of an endpoint new to the record is counted by that endpoint's
// record step in the same plan; a plug of a recorded endpoint is not (the
// plug step counts it, in a write of its own). A plug with no record step
// before it is left alone: Compute never plans one (an endpoint new to
// the record is recorded before anything is made for it).
func TestCountPlugsInRecordSteps(t *testing.T) {
	p := Plan{Actions: []Action{
		{Op: OpRecord, Endpoint: state.Endpoint{Index: 0}},
		{Op: OpCreateTap, Endpoint: state.Endpoint{Index: 0}, MTU: 1450},
		{Op: OpPlugNIC, Endpoint: state.Endpoint{Index: 0}, MTU: 1450},
		{Op: OpRecord, Endpoint: state.Endpoint{Index: 1, Plugs: 3}}, // recorded: a rename
		{Op: OpPlugNIC, Endpoint: state.Endpoint{Index: 1, Plugs: 3}, MTU: 9000},
		{Op: OpPlugNIC, Endpoint: state.Endpoint{Index: 2}, MTU: 1500}, // its record step comes after
		{Op: OpRecord, Endpoint: state.Endpoint{Index: 2}},
	}}
	countPlugsInRecordSteps(&p, map[int]bool{1: true})
	type got struct {
		plugs, mtu int
		counted    bool
	}
	for i, want := range []got{{1, 1450, false}, {0, 0, false}, {0, 0, true}, {3, 0, false}, {3, 0, false}, {0, 0, false}, {0, 0, false}} {
		a := p.Actions[i]
		if g := (got{a.Endpoint.Plugs, a.Endpoint.PlugMTU, a.PlugCounted}); g != want {
			t.Errorf("step %d (%s/%d): plugs %d, plug MTU %d, counted %v; want %+v", i, a.Op, a.Endpoint.Index, g.plugs, g.mtu, g.counted, want)
		}
	}
}
