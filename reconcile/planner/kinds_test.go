package planner

import (
	"net"
	"testing"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// TestKindTypes: every endpoint kind a record can hold has a type of its
// own, found by kindOf, and a new link gets the kind its link kind and
// the model call for, whatever the order of kinds.
func TestKindTypes(t *testing.T) {
	seen := map[string]bool{}
	for _, k := range kinds {
		if seen[k.name()] {
			t.Errorf("kind %q is listed twice in kinds", k.name())
		}
		seen[k.name()] = true
	}
	for _, kind := range []string{state.KindTap, state.KindMacvtap, state.KindTapLink, state.KindMacvtapLink} {
		k := kindOf(state.Endpoint{Kind: kind})
		if _, unknown := k.(unknownKind); unknown || k.name() != kind {
			t.Errorf("kindOf(%q) = %T named %q, want the kind's own type", kind, k, k.name())
		}
	}
	if k := kindOf(state.Endpoint{Kind: "from-a-newer-tapsync"}); k.name() != "from-a-newer-tapsync" {
		t.Errorf("an unknown kind reads as %q", k.name())
	}
	for _, c := range []struct{ link, model, want string }{
		{"tap", ModelTCFilter, state.KindTapLink},
		{"tap", ModelMacvtap, state.KindTapLink},
		{"macvtap", ModelTCFilter, state.KindMacvtapLink},
		{"macvtap", ModelMacvtap, state.KindMacvtapLink},
		{"veth", ModelTCFilter, state.KindTap},
		{"veth", ModelMacvtap, state.KindMacvtap},
		{"vlan", ModelMacvtap, state.KindMacvtap},
		{"ipvlan", ModelMacvtap, state.KindTap},
	} {
		l := hostnet.Link{Name: "l", Kind: c.link, MAC: net.HardwareAddr{0x02, 0x54, 0x53, 0, 0, 1}}
		if got := kindFor(l, c.model); got != c.want {
			t.Errorf("kindFor(%s link, model %s) = %q, want %q", c.link, c.model, got, c.want)
		}
	}
}

// TestRateNotesNameKindsWithoutASite: a kind without a site for a limit
// that is asked for is named in the plan's notes.
func TestRateNotesNameKindsWithoutASite(t *testing.T) {
	l := hostnet.Link{Name: "eth0", Ifindex: 3, Kind: "veth", MAC: net.HardwareAddr{0x02, 0x54, 0x53, 0, 0, 1}, MTU: 1500}
	if len(rateNotes([]wiredLink{{link: l, endpoint: state.Endpoint{Kind: "vhost-user"}}}, Options{RxRate: 8})) != 1 {
		t.Error("a kind without a site for the rx limit is not named")
	}
}
