package reconcile

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/reconcile/planner"
)

// A link that changes while its interface is being configured is
// configured again before the routes step, and that step is settled as
// one of its own: done, it is counted and reported to AfterAction;
// failed, the failure is its endpoint's, and the routes step, which
// needs it, is not sent. The next pass converges.
func TestConfigureAgainSettledAsAStep(t *testing.T) {
	for _, fail := range []bool{false, true} {
		name := map[bool]string{false: "done", true: "failed"}[fail]
		t.Run(name, func(t *testing.T) {
			w := podWorld()
			env := w.env()
			var configured int
			env.AfterAction = func(a Action) {
				if a.Op != planner.OpConfigureGuest {
					return
				}
				configured++
				if configured == 1 { // the planned step is done: the link changes
					w.links[0].Addrs = append(w.links[0].Addrs, netip.MustParsePrefix("10.1.0.6/24"))
					w.guest.halfway = fail
				}
			}
			p := w.plan(guestOn)
			_, out, err := Apply(context.Background(), p, w.rec, w.observed(), env)
			if !fail {
				if err != nil {
					t.Fatal(err)
				}
				if configured != 2 {
					t.Errorf("AfterAction saw %d configure-guest steps; want 2 (planned, then again)", configured)
				}
				if bad := w.checkConverged(1); len(bad) > 0 {
					t.Fatalf("not converged after one pass:\n%s", joinLines(bad))
				}
				return
			}
			if _, ok := out.Failed[0]; !ok || !out.GuestFailed {
				t.Errorf("outcome %+v; want endpoint 0 failed, the guest failed", out)
			}
			if err == nil || !strings.Contains(err.Error(), "not sent: endpoint 0's interface could not be configured again") {
				t.Errorf("error %v; want the routes step not sent, naming endpoint 0", err)
			}
			if routes := w.guest.calls["UpdateRoutes"]; routes != 0 {
				t.Errorf("%d UpdateRoutes calls; want none after its interface failed", routes)
			}
			if !slices.ContainsFunc(p.Actions, func(a Action) bool { return a.Op == planner.OpUpdateGuestRoutes }) {
				t.Fatal("the plan has no routes step: the case tests nothing")
			}
			w.noteGuest(causeAgentFailed)
			mustConvergeGuest(t, w)
		})
	}
}
