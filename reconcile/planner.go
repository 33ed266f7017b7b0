package reconcile

import (
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// The planner's names, for reconcile's callers: a plan is package
// planner's, and reconcile observes, applies and records around it.
type (
	Plan          = planner.Plan
	Action        = planner.Action
	Skipped       = planner.Skipped
	Observed      = planner.Observed
	NIC           = planner.NIC
	Options       = planner.Options
	Op            = planner.Op
	GuestState    = planner.GuestState
	GuestRoute    = planner.GuestRoute
	GuestNeighbor = planner.GuestNeighbor
)

// Interworking models (planner.ModelTCFilter, planner.ModelMacvtap).
const (
	ModelTCFilter = planner.ModelTCFilter
	ModelMacvtap  = planner.ModelMacvtap
)

// Compute is planner.Compute.
func Compute(obs Observed, rec state.Record, opts Options) Plan {
	return planner.Compute(obs, rec, opts)
}

// ComputeTeardown is planner.ComputeTeardown.
func ComputeTeardown(obs Observed, rec state.Record, vmGone bool) Plan {
	return planner.ComputeTeardown(obs, rec, vmGone)
}

// DeviceName is planner.DeviceName.
func DeviceName(e state.Endpoint) string { return planner.DeviceName(e) }
