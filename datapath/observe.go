package datapath

// State is what the host side of a sandbox holds right now: the container
// links (desired endpoints), the endpoint taps and every redirect filter.
// Callers diff it against QEMU's view and their records.
type State struct {
	Links     []Link
	Taps      []Tap
	Redirects []Redirect
}

// Observe reads the whole host-side state of the netns. Each part is a
// separate dump, so a link that changes in between shows up on the next
// observation; callers are level-triggered and look again.
func (n *Netns) Observe() (State, error) {
	var (
		s   State
		err error
	)
	if s.Links, err = n.ContainerLinks(); err != nil {
		return State{}, err
	}
	if s.Taps, err = n.Taps(); err != nil {
		return State{}, err
	}
	if s.Redirects, err = n.Redirects(); err != nil {
		return State{}, err
	}
	return s, nil
}
