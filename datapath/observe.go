package datapath

// State is what the host side of a sandbox holds right now: the container
// links (desired endpoints) with their addresses, the endpoint taps, every
// redirect filter, and the routes and permanent neighbours a guest must
// mirror. Callers diff it against QEMU's and the guest's view and their
// records.
type State struct {
	Links []Link
	Taps  []Tap
	// Macvtaps are our endpoint macvtaps (tsm<N>, macvtap model); each
	// carries its guest's MAC while its container link (Parent) carries
	// HostMAC.
	Macvtaps []Macvtap
	// KataLinks are Kata's taps and macvtaps (tap<N>_kata): how the
	// runtime wired the links it adopted.
	KataLinks []Link
	Redirects []Redirect
	// Routes of the main table, both families, unicast only, not proto
	// kernel (RTPROT_KERNEL): the routes a CNI plugin or admin added.
	Routes []Route
	// RateLimits are our limits: HTBs on egresses (tsn<N>, container
	// links) and links' ingresses through our ifbs tsi<N>.
	RateLimits []RateLimitOn
	// Neighbors are the permanent (NUD_PERMANENT) entries only, both
	// families.
	Neighbors []Neighbor
}

// Parts selects what Observe reads besides the links, taps, redirects and
// rate limits it always reads: a dump costs as much as the kernel's work
// for a whole removal, so a caller that cannot use a part leaves it out.
type Parts struct {
	Addrs     bool // the Addrs of State.Links
	Routes    bool // State.Routes
	Neighbors bool // State.Neighbors
}

// All is every part.
var All = Parts{Addrs: true, Routes: true, Neighbors: true}

// Observe reads the host-side state of the netns: every part but those
// p leaves out (left empty in the State). Each part is a separate dump
// (one per kind of object, but for ingress filters, which the kernel
// dumps one link at a time: one per link, see ingressParent; and
// the qdiscs, dumped only when a link's root qdisc calls for it), so a link
// that changes in between shows up on the next observation; callers are
// level-triggered and look again.
func (n *Netns) Observe(p Parts) (State, error) {
	var (
		s   State
		err error
	)
	// Equivalent to: ip -n <netns> link show, once for the whole
	// observation.
	if n.obs, err = n.dumpObservation(); err != nil {
		return State{}, err
	}
	defer func() { n.obs = nil }()
	n.seen.prune(n.obs.links)
	if s.Links, err = n.containerLinks(p.Addrs); err != nil {
		return State{}, err
	}
	if s.Taps, err = n.Taps(); err != nil {
		return State{}, err
	}
	if s.Macvtaps, err = n.Macvtaps(); err != nil {
		return State{}, err
	}
	if s.KataLinks, err = n.KataLinks(); err != nil {
		return State{}, err
	}
	if s.Redirects, err = n.Redirects(); err != nil {
		return State{}, err
	}
	if p.Routes {
		if s.Routes, err = n.Routes(); err != nil {
			return State{}, err
		}
	}
	if s.RateLimits, err = n.RateLimits(); err != nil {
		return State{}, err
	}
	if p.Neighbors {
		if s.Neighbors, err = n.Neighbors(); err != nil {
			return State{}, err
		}
	}
	return s, nil
}
