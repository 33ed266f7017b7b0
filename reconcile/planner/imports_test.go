package planner

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestImports: the planner reaches neither the kernel, QEMU nor the
// guest, directly or through another package: of this module it imports
// only the records and the value packages, and nothing of netlink, ttrpc,
// qmp or the agent client is in its build.
func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	const module = "github.com/tapsync/tapsync/"
	allowed := []string{module + "state", module + "datapath/hostnet", module + "agent/guestnet", module + "reconcile/planner"}
	forbidden := []string{"github.com/vishvananda/", "github.com/containerd/ttrpc"}
	for _, dep := range strings.Fields(string(out)) {
		ours := strings.HasPrefix(dep, module)
		if (ours && !slices.Contains(allowed, dep)) || slices.ContainsFunc(forbidden, func(f string) bool { return strings.HasPrefix(dep, f) }) {
			t.Errorf("the planner depends on %s", dep)
		}
	}
}
