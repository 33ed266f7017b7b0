package planner

import (
	"fmt"
	"slices"
	"strings"

	"github.com/tapsync/tapsync/datapath/hostnet"
	"github.com/tapsync/tapsync/state"
)

// adoption is how the runtime's own wiring of a container link stands.
type adoption struct {
	nic     *int         // index in v.foreign of the VM's NIC for the link; nil if none
	tap     hostnet.Link // the runtime's tap or macvtap for it (Ifindex 0: unknown)
	missing []string     // what traffic lacks; empty: intact
	repair  bool         // redirects between the link and tap would mend it
}

// runtimeWiring says whether the runtime wired container link l (ok), in
// either of Kata's models, and how that wiring stands; taken are foreign
// NICs already matched to other links. A VM NIC with l's MAC is enough to
// call l wired; whether Kata's redirects are intact decides only whether
// the link is reported broken.
func (v view) runtimeWiring(l hostnet.Link, taken map[int]bool) (adoption, bool) {
	for _, k := range v.kata {
		if k.Kind != "macvtap" || k.Parent != l.Ifindex {
			continue
		}
		a := adoption{tap: k}
		if n := v.foreignNIC(k.MAC, taken); n >= 0 {
			a.nic = &n
		} else {
			a.missing = append(a.missing, fmt.Sprintf("a VM NIC with MAC %s for Kata's macvtap %s", k.MAC, k.Name))
		}
		return a, true
	}
	n := v.foreignNIC(l.MAC, taken)
	if n < 0 {
		return adoption{}, false
	}
	a := adoption{nic: &n}
	var taps []hostnet.Link
	for _, k := range v.kata {
		if k.Kind == "tap" {
			taps = append(taps, k)
		}
	}
	for _, k := range taps {
		if v.redirected(l.Ifindex, k.Ifindex) && v.redirected(k.Ifindex, l.Ifindex) {
			a.tap = k
			return a, true
		}
	}
	// Which of Kata's taps feeds the NIC? One joined to l in either
	// direction; else the only one whose redirects lead nowhere (its
	// link was re-created).
	var cands []hostnet.Link
	for _, k := range taps {
		if v.redirected(l.Ifindex, k.Ifindex) || v.redirected(k.Ifindex, l.Ifindex) {
			cands = append(cands, k)
		}
	}
	if len(cands) == 0 {
		for _, k := range taps {
			if !slices.ContainsFunc(v.redirs, func(r hostnet.Redirect) bool { return r.From == k.Ifindex && v.exists(r.To) }) {
				cands = append(cands, k)
			}
		}
	}
	switch len(cands) {
	case 0:
		a.missing = append(a.missing, fmt.Sprintf("a tap<N>_kata of the runtime's joined to %s", l.Name))
	case 1:
		a.tap, a.repair = cands[0], true
		if !v.redirected(l.Ifindex, a.tap.Ifindex) {
			a.missing = append(a.missing, fmt.Sprintf("redirect %s→%s", l.Name, a.tap.Name))
		}
		if !v.redirected(a.tap.Ifindex, l.Ifindex) {
			a.missing = append(a.missing, fmt.Sprintf("redirect %s→%s", a.tap.Name, l.Name))
		}
	default:
		names := make([]string, len(cands))
		for i, k := range cands {
			names[i] = k.Name
		}
		a.missing = append(a.missing, fmt.Sprintf("a redirect from %s to one of the runtime's taps (%s: cannot tell which)", l.Name, strings.Join(names, ", ")))
	}
	return a, true
}

// adopt reports link l as the runtime's and, when allowed and possible,
// plans the repair of its redirects.
func adopt(v view, l hostnet.Link, a adoption, repairOK bool, p *Plan) Skipped {
	dev := "no VM NIC"
	if a.nic != nil {
		dev = fmt.Sprintf("VM device %q", v.foreign[*a.nic].ID)
	}
	tap := "no tap"
	if a.tap.Ifindex != 0 {
		tap = a.tap.Name
	}
	if len(a.missing) == 0 {
		by := "the runtime"
		if v.ownedRedirect(l.Ifindex, a.tap.Ifindex) || v.ownedRedirect(a.tap.Ifindex, l.Ifindex) {
			by = "the runtime, redirects repaired by tapsync"
		}
		return Skipped{Link: l, Adopted: true, Reason: fmt.Sprintf("wired by %s (%s, %s); adopted", by, tap, dev)}
	}
	s := Skipped{Link: l, Adopted: true, Broken: true,
		Reason: fmt.Sprintf("wired by the runtime (%s, %s) but broken: missing %s", tap, dev, strings.Join(a.missing, ", "))}
	switch {
	case !a.repair:
		s.Reason += "; tapsync cannot repair this"
	case !repairOK:
		s.Reason += "; set repair_adopted = true to let tapsync repair it"
	default:
		s.Reason += "; repairing"
		e := state.Endpoint{Index: sandboxWide.Index, LinkName: l.Name, LinkIfindex: l.Ifindex, LinkMAC: l.MAC.String()}
		p.Actions = append(p.Actions, Action{Op: OpRepairAdopted, Endpoint: e, KataTap: a.tap, Reason: "missing " + strings.Join(a.missing, ", ")})
	}
	return s
}
