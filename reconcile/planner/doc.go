// Package planner decides, for one sandbox, what must be done so that the
// VM mirrors its container links: Compute turns what is observed
// (Observed) and what the record says (state.Record) into an ordered Plan
// of Actions, each with the text that logs and `tapsync plan` show. It is
// pure: the same inputs give the same plan, and applying a plan and
// planning again gives an empty one.
//
// It never reads or changes the host, QEMU, the guest or the disk, and
// imports none of the packages that do (TestImports): reconcile observes,
// applies the plan and records.
package planner
