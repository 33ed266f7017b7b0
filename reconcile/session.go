package reconcile

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile/planner"
	"github.com/tapsync/tapsync/state"
)

// session is one sandbox opened for a pass: its netns, VM and record.
type session struct {
	sb   Sandbox
	host *datapath.Netns
	// changed hands host what was noted of its tc since it last
	// observed (Reconciler.passFiltersChanged); every observation calls it.
	changed func()
	vm      qmpVM
	// forPlan: the session of a plan (Plan), which reads what passes keep
	// between them and changes none of it. hostKept says its netns is the
	// one kept for the passes, and ownAgent is the plan's own agent
	// connection, if it made one (see closeSession).
	forPlan  bool
	hostKept bool
	ownAgent *agent.Client
	rec      state.Record
	obs      Observed
	queues   int // per new endpoint, resolved (see countQueues)
	// taps are the indexes of our taps and macvtaps in the netns, and
	// tapLinks the MACs of its tap and macvtap container links, from the
	// host side of the observation under way (see accounted).
	taps     []int
	tapLinks []net.HardwareAddr
}

// open opens sandbox id for a pass, or for a plan (forPlan; see session).
func (r *Reconciler) open(ctx context.Context, id string, forPlan bool) (*session, error) {
	sb, err := r.sandbox(id)
	if err != nil {
		return nil, err
	}
	host, kept, err := r.openHost(id, sb.Netns)
	if err != nil {
		return nil, fmt.Errorf("sandbox %s: %w", id, err)
	}
	r.reidentify(id, sb.Netns, host.ID())
	if !forPlan {
		// A netns event for this netns from now on is one this pass
		// observes (NetnsHeld).
		r.notePassHost(id, host)
	}
	s := &session{sb: sb, host: host, forPlan: forPlan, hostKept: kept,
		changed: func() { r.passFiltersChanged(id, host) }}
	client := r.passClient
	if forPlan {
		client = r.clientModel
	}
	c, m, err := client(ctx, sb)
	if errors.Is(err, ErrConnecting) {
		r.keepHost(id, host, true) // for the pass the dial's end starts
		return nil, err
	}
	if err != nil {
		r.closeSession(s)
		return nil, err
	}
	s.vm = qmpVM{c: c, unplugWait: sb.UnplugTimeout, placement: sb.Placement, model: m,
		recorded:  func() bool { return len(s.rec.Endpoints) > 0 },
		accounted: func(nics []qmp.NICInfo) bool { return accounted(s.rec, nics, s.taps, s.tapLinks) }}
	if s.rec, err = r.loadRecord(ctx, id); err != nil {
		r.closeSession(s)
		return nil, err
	}
	s.rec.Netns = sb.Netns
	if err := s.observe(ctx); err != nil {
		// Not kept after a failure on the host side (see keepHost).
		s.hostKept = false
		r.closeSession(s)
		return nil, fmt.Errorf("sandbox %s: observe: %w", id, err)
	}
	return s, nil
}

// closeSession closes what session s opened for itself, and gives the netns
// kept for the passes back to them. A pass's session is ended by
// Reconcile itself (keepHost) once open has returned it.
func (r *Reconciler) closeSession(s *session) {
	switch {
	case s.forPlan && s.hostKept:
		r.keepHost(s.sb.ID, s.host, true)
	default:
		r.keepHost(s.sb.ID, s.host, false)
	}
	if s.ownAgent != nil {
		s.ownAgent.Close()
	}
}

// parts is what a pass reads of the netns besides its links, taps,
// redirects and limits: addresses, routes and neighbours only when its
// plan can use them. A guest mirrors all three; the macvtap model moves a
// link's addresses and routes (for a new endpoint, or back from a
// recorded one).
func (s *session) parts() datapath.Parts {
	guest := s.sb.guestOn()
	macvtap := s.sb.Model == ModelMacvtap ||
		slices.ContainsFunc(s.rec.Endpoints, planner.BorrowsLink)
	return datapath.Parts{Addrs: guest || macvtap, Routes: guest || macvtap, Neighbors: guest}
}

// refresh reads the netns's container links again, and the routes and
// neighbours parts asks for, for guest steps sent later in the pass
// (Env.Refresh).
func (s *session) refresh(_ context.Context, parts datapath.Parts) (Observed, error) {
	var (
		o   Observed
		err error
	)
	if o.Links, err = s.host.ContainerLinks(); err != nil {
		return Observed{}, err
	}
	if parts.Routes {
		if o.Routes, err = s.host.Routes(); err != nil {
			return Observed{}, err
		}
	}
	if parts.Neighbors {
		if o.Neighbors, err = s.host.Neighbors(); err != nil {
			return Observed{}, err
		}
	}
	return o, nil
}

func (s *session) observe(ctx context.Context) error {
	if s.changed != nil {
		s.changed()
	}
	hs, err := s.host.Observe(s.parts())
	if err != nil {
		return err
	}
	s.taps = s.taps[:0]
	for _, t := range hs.Taps {
		s.taps = append(s.taps, t.Index)
	}
	for _, m := range hs.Macvtaps {
		if m.Index >= 0 {
			s.taps = append(s.taps, m.Index)
		}
	}
	s.tapLinks = s.tapLinks[:0]
	for _, l := range hs.Links {
		if l.Kind == "tap" || l.Kind == "macvtap" {
			s.tapLinks = append(s.tapLinks, l.MAC)
		}
	}
	m := s.vm.model
	var fromModel bool
	if s.forPlan {
		fromModel = m != nil && m.usable() && kataSeen(m, hs.KataLinks)
	} else {
		if m != nil && m.kataChanged(hs.KataLinks) {
			m.drop(causeKata)
		}
		fromModel = m != nil && m.usable()
		if m != nil && !fromModel {
			zerolog.Ctx(ctx).Debug().Str("cause", string(m.outdated())).Msg("reading the VM through QMP: the model of it is outdated")
		}
	}
	nics, netdevs, err := s.nics(ctx, fromModel)
	if err != nil {
		return err
	}
	s.obs = Observed{Links: hs.Links, Taps: hs.Taps, Macvtaps: hs.Macvtaps, RateLimits: hs.RateLimits, KataLinks: hs.KataLinks,
		Redirects: hs.Redirects, Routes: hs.Routes,
		Neighbors: hs.Neighbors, NICs: nics, Netdevs: netdevs}
	if fromModel && len(hs.KataLinks) > 0 && !Compute(s.obs, s.rec, s.options()).Empty() {
		// Kata may have plugged what the plan is about to act on.
		if !s.forPlan {
			m.drop(causeKata)
		}
		if s.obs.NICs, s.obs.Netdevs, err = s.nics(ctx, false); err != nil {
			return err
		}
	}
	return s.countQueues(ctx)
}

// nics reads the VM's NICs and our netdevs. A pass reads them through the
// model (see qmpVM.NICs). A plan reads the model only when fromModel and
// it is fresh, else QEMU directly: what it reads is not installed in the
// model, nor does it take the model's first reading or a verify due.
func (s *session) nics(ctx context.Context, fromModel bool) ([]NIC, []int, error) {
	if !s.forPlan {
		return s.vm.NICs(ctx)
	}
	if fromModel {
		if infos, netdevs, ok := s.vm.model.fresh(); ok {
			return nicsOf(infos), netdevs, nil
		}
	}
	vm, err := s.vm.c.ReadVM(ctx)
	if err != nil {
		return nil, nil, err
	}
	return nicsOf(vm.NICs), netdevIndexes(vm.Netdevs), nil
}

// kataSeen says whether links are the Kata links model m saw at the last
// pass, recording nothing: kataChanged asked of a model holding only that
// memory. A plan that recorded them would hide Kata's hot-plug from the
// next pass.
func kataSeen(m *vmModel, links []datapath.Link) bool {
	m.mu.Lock()
	probe := vmModel{kataLinks: m.kataLinks}
	m.mu.Unlock()
	return !probe.kataChanged(links)
}

func (s *session) options() Options {
	return Options{Queues: s.queues, Guest: s.sb.guestOn(), RepairAdopted: s.sb.RepairAdopted,
		Model: s.sb.Model, RxRate: s.sb.RxRate, TxRate: s.sb.TxRate}
}

// readFully reads the VM fully when the model is partial (the
// connection's first reading only verified the record; see
// vmModel.observe) and the pass's plan acts: plugging needs the VM's free
// slots, the guest its NICs' PCI paths. The observation then holds the
// full reading's NICs. It says whether it read.
func (s *session) readFully(ctx context.Context, plan func() Plan) (bool, error) {
	if s.forPlan || !s.vm.model.needsFullReading() || plan().Empty() {
		return false, nil
	}
	nics, netdevs, ok, err := s.vm.model.complete(ctx)
	if err != nil {
		return true, err
	}
	if !ok {
		return true, s.observe(ctx) // the model changed meanwhile: all again
	}
	s.obs.NICs, s.obs.Netdevs = nicsOf(nics), netdevs
	return true, nil
}
