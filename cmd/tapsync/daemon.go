package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
	"github.com/tapsync/tapsync/watcher"
)

// daemon wires the event sources into the reconciler.
type daemon struct {
	// cfg is the running config: replaced whole on a reload (SIGHUP),
	// never changed in place. Read it through config().
	cfg atomic.Pointer[Config]
	// reload reads and validates the config file again, flags applied
	// (nil: nothing to reload).
	reload func() (Config, error)
	// scan walks /proc for QEMU processes; only the discovery loop calls it.
	scan func(ctx context.Context) ([]watcher.Sandbox, error)
	// discoveryRequests holds at most one pending /proc walk: requests
	// made while one is pending or running coalesce into it.
	discoveryRequests chan string
	// listed is closed once containerd's first full listing has been
	// registered: the first /proc walk waits for it (at most
	// firstListingWait), so that running VMs are registered under their
	// real ids and not first under guessed ones.
	listed           chan struct{}
	listedOnce       sync.Once
	firstListingWait time.Duration

	store *state.Store
	rec   *reconcile.Reconciler
	queue *reconcile.Queue
	links *watcher.NetlinkWatcher
	m     *metrics
	// failures logs failed passes without flooding (see work).
	failures reconcile.FailureLog

	mu       sync.Mutex
	gone     map[string]bool      // sandboxes to tear down on their next pass
	dropped  map[string]bool      // config sandboxes to unregister on their next pass (gone from the config file)
	podRates map[string]overrides // rate limits pods set by annotation, kept over a reload's new defaults
	inflight map[string]time.Time // passes running now, by start time (for the watchdog)
	pending  map[string]time.Time // first trigger since the sandbox last converged
	// skipped holds the sandboxes a source found and tapsync leaves
	// alone (a confidential handler), with why, for status.
	skipped map[string]watcher.Sandbox
	// relist asks the containerd source for a full listing (SIGHUP and
	// the periodic resync); size 1, pokes coalesce.
	relist chan struct{}
	// pings carry /healthz's questions to the event loop, which closes
	// each channel it receives: a closed one says the loop is alive.
	pings chan chan struct{}
	// ready is closed once the first full resync is done (/readyz);
	// until then firstPasses holds the sandboxes that have had a pass.
	ready       chan struct{}
	readyOnce   sync.Once
	firstPasses map[string]bool

	baseCtx context.Context // carries the logger for events from sources
}

func newDaemon(cfg Config) (*daemon, error) {
	store, err := state.Open(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	d := &daemon{
		store: store, rec: reconcile.New(store), queue: reconcile.NewQueue(),
		gone: map[string]bool{}, pending: map[string]time.Time{},
		dropped: map[string]bool{}, podRates: map[string]overrides{}, inflight: map[string]time.Time{},
		skipped: map[string]watcher.Sandbox{}, relist: make(chan struct{}, 1),
		pings: make(chan chan struct{}), ready: make(chan struct{}), firstPasses: map[string]bool{},
		discoveryRequests: make(chan string, 1),
		listed:            make(chan struct{}), firstListingWait: firstListingWait,
	}
	d.cfg.Store(&cfg)
	procs := watcher.NewProcDiscovery(cfg.Discovery.procConfig(), "/proc", cfg.NetnsDir)
	// A process in D state can hold a read of its /proc files
	// indefinitely: discoveryLoop bounds the wait.
	d.scan = procs.Scan
	d.links = watcher.NewNetlinkWatcher(d.handle)
	d.m = newMetrics(d)
	// Every message about a sandbox's links and tc reaches
	// NoteNetlink (handle): the netns may keep its filters.
	d.rec.KeepFilters = true
	d.rec.OnEvent = d.qmpEvent
	d.rec.OnMonitorClosed = d.monitorClosed
	return d, nil
}

// config returns the running config. Restart-only keys (see
// restartOnlyKeys) keep the values the daemon started with.
func (d *daemon) config() *Config { return d.cfg.Load() }

// overrides are a sandbox's own settings over the defaults: a [[sandbox]]
// entry's, or a pod's Kata annotations. Zero values keep the defaults.
type overrides struct {
	Model          string
	RxRate, TxRate *uint64
}

// forgetLocked drops what the daemon keeps of sandbox id between its
// events (a teardown asked, a config drop, a trigger's time, the pod's
// rate annotations); d.mu must be held.
func (d *daemon) forgetLocked(id string) {
	delete(d.gone, id)
	delete(d.dropped, id)
	delete(d.pending, id)
	delete(d.podRates, id)
}

// notePodRates remembers the rate limits a pod's annotations set (a
// reload keeps them over new defaults) and returns them.
func (d *daemon) notePodRates(s watcher.Sandbox) overrides {
	o := overrides{RxRate: s.RxRate, TxRate: s.TxRate}
	d.mu.Lock()
	defer d.mu.Unlock()
	if o.RxRate == nil && o.TxRate == nil {
		delete(d.podRates, s.ID)
	} else {
		d.podRates[s.ID] = o
	}
	return o
}

// sandboxFor builds a reconciler sandbox with the configured defaults.
// agentURL is the sandbox's configured agent URL ({id} is replaced), ""
// when its source knows none.
func (d *daemon) sandboxFor(id, netns, qmpPath string, queues *int, agentURL string, over overrides) reconcile.Sandbox {
	cfg := d.config()
	q := cfg.Defaults.Queues
	if queues != nil {
		q = *queues
	}
	model, rx, tx := cfg.Defaults.Model, *rate(&cfg.Defaults.RxRate), *rate(&cfg.Defaults.TxRate)
	if over.Model != "" {
		model = over.Model
	}
	if over.RxRate != nil {
		rx = *over.RxRate
	}
	if over.TxRate != nil {
		tx = *over.TxRate
	}
	u, off := cfg.agentFor(id, agentURL)
	return reconcile.Sandbox{
		Model: model, RxRate: rx, TxRate: tx,
		ID: id, Netns: netns, QMP: qmpPath, Queues: q,
		Vhost:         datapath.Vhost(cfg.Defaults.Vhost),
		QMPTimeout:    cfg.Defaults.QMPTimeout,
		UnplugTimeout: cfg.Defaults.UnplugTimeout,
		Agent:         u, GuestOff: off, GuestTimeout: cfg.Guest.Timeout,
		Placement:     cfg.Defaults.placement(),
		RepairAdopted: cfg.Defaults.RepairAdopted,
	}
}

// register adds or updates a sandbox named by source src and asks for a
// pass over it. Which source's name and settings win when several name
// one VM is the registry's decision (reconcile.Register).
func (d *daemon) register(ctx context.Context, sb reconcile.Sandbox, src reconcile.Source, why string) {
	log := zerolog.Ctx(ctx).With().Str("sandbox", sb.ID).Str("source", string(src)).Logger()
	reg, err := d.rec.Register(sb, src)
	switch {
	case err != nil:
		log.Error().Err(err).Msg("sandbox refused")
		return
	case reg.Outranked:
		log.Debug().Str("registered_as", reg.ID).Str("registered_by", string(reg.Source)).Str("netns", sb.Netns).
			Msg("this VM is registered by a source that ranks at least as high; its name and settings stay")
		if src != reconcile.SourceProc {
			d.trigger(reg.ID, string(src))
		}
		return
	case reg.Replaced != "":
		// The VM's passes under its old id end here; the new id's first
		// pass takes over its record.
		d.links.Stop(reg.Replaced)
		d.mu.Lock()
		d.forgetLocked(reg.Replaced)
		d.mu.Unlock()
		log.Info().Str("replaced", reg.Replaced).Msg("sandbox now known by this name")
	}
	d.mu.Lock()
	delete(d.gone, sb.ID)
	delete(d.dropped, sb.ID)
	d.mu.Unlock()
	if reg.New {
		log.Info().Str("netns", sb.Netns).Str("qmp", sb.QMP).Str("reason", why).Msg("sandbox registered")
	}
	// Dialled while it waits for a worker: its pass then finds the monitor
	// connected rather than ending to wait for the dial.
	d.rec.Connect(ctx, sb.ID)
	d.trigger(sb.ID, string(src))
}

// kickSources are the triggers that may cut a failing sandbox's backoff
// wait short (once between two scheduled retries, see Queue.Kick): an
// operator asking (control socket, SIGHUP) and QEMU's own events (an
// unplug completed, a reset), none of which a failing pass causes. The
// others wait for the retry: netlink events in particular, which our own
// tap and filter changes cause.
var kickSources = map[string]bool{"control": true, "signal": true, "qmp": true}

// trigger asks for one more pass over sandbox id.
func (d *daemon) trigger(id, source string) {
	d.m.triggered(source)
	d.mu.Lock()
	if _, ok := d.pending[id]; !ok {
		d.pending[id] = time.Now()
	}
	d.mu.Unlock()
	if kickSources[source] {
		d.queue.Kick(id)
		return
	}
	d.queue.Add(id)
}

func (d *daemon) triggerAll(source string) {
	for _, id := range d.rec.Sandboxes() {
		d.trigger(id, source)
	}
}

// handle routes one watcher event. It runs on the sources' goroutines and
// never blocks on a reconcile.
func (d *daemon) handle(e watcher.Event) {
	ctx := func() context.Context { return d.baseCtx }
	src := string(e.Source)
	switch e.Kind {
	case watcher.KindNetns:
		for _, id := range d.rec.InNetns(e.Path) {
			if d.rec.NetnsHeld(id, e.Path) {
				// The netns its last pass observed, still at the path
				// (the netns dir's scan at start, after that pass):
				// nothing new for it.
				continue
			}
			d.trigger(id, src)
		}
		if d.config().Discovery.Proc {
			d.requestDiscovery("netns appeared: " + e.Path)
		}
	case watcher.KindNetnsGone:
		for _, id := range d.rec.InNetns(e.Path) {
			d.rec.ReleaseNetns(id) // held, the namespace would not die
			if _, by, _ := d.rec.Registered(id); by == reconcile.SourceConfig {
				d.trigger(id, src) // waits, quietly, for the netns to come back
				continue
			}
			d.markGone(id)
		}
	case watcher.KindSandbox:
		if e.LinkGone > 0 || e.TCStale != 0 {
			d.rec.NoteNetlink(e.ID, reconcile.Netlink{LinkGone: e.LinkGone, TCStale: e.TCStale})
		}
		d.trigger(e.ID, src)
	case watcher.KindUpsert:
		s := e.Sandbox
		d.mu.Lock()
		delete(d.skipped, s.ID)
		if s.Skip != "" {
			d.skipped[s.ID] = s
		}
		d.mu.Unlock()
		if s.Skip != "" {
			zerolog.Ctx(ctx()).Info().Str("sandbox", s.ID).Str("runtime", s.Runtime).Str("why", s.Skip).Msg("sandbox left alone")
			d.markGone(s.ID) // registered before under another runtime? let go of it
			return
		}
		sb := d.sandboxFor(s.ID, s.Netns, s.QMP, nil, s.AgentURL, d.notePodRates(s))
		if e.Source == watcher.SourceContainerd {
			sb.Monitor, sb.Flavour, sb.Runtime, sb.MonitorNote = s.Protocol, s.Flavour, s.Runtime, s.MonitorNote
			// The monitor is trusted only while root's process in the
			// pod's netns (in the bundle dir, for runtime-rs) serves it.
			netns, bundle := s.Netns, s.Bundle
			sb.CheckQMP = func(c *net.UnixConn) error { return watcher.CheckMonitorPeer(c, netns, bundle) }
		}
		d.register(ctx(), sb, reconcile.Source(e.Source), e.Why)
	case watcher.KindGone:
		d.mu.Lock()
		delete(d.skipped, e.ID)
		d.mu.Unlock()
		d.markGone(e.ID)
	case watcher.KindResyncAll:
		zerolog.Ctx(ctx()).Info().Str("source", src).Str("reason", e.Why).Msg("resyncing every sandbox")
		if e.Listed != nil {
			d.dropUnlisted(ctx(), reconcile.Source(e.Source), e.Listed)
		}
		d.triggerAll(src)
		if e.Source == watcher.SourceContainerd && e.Listed != nil {
			// Its sandboxes were registered as the listing went (a
			// source calls handle in order, on one goroutine).
			d.listedOnce.Do(func() { close(d.listed) })
		}
	}
}

// dropUnlisted tears down the sandboxes of a source that its latest full
// listing no longer contains (they ended while it was unreachable).
func (d *daemon) dropUnlisted(ctx context.Context, source reconcile.Source, listed []string) {
	for _, st := range d.rec.Status() {
		id := st.Sandbox.ID
		if st.Source != source || slices.Contains(listed, id) {
			continue
		}
		zerolog.Ctx(ctx).Info().Str("sandbox", id).Str("source", string(source)).Msg("sandbox no longer listed by its source; tearing down")
		d.markGone(id)
	}
}

// markGone schedules a sandbox's teardown on its own queue key, so it
// never overlaps a reconcile of the same sandbox.
func (d *daemon) markGone(id string) {
	_, src, known := d.rec.Registered(id)
	if !known || src == reconcile.SourceConfig {
		return // config sandboxes stay until the config changes
	}
	d.mu.Lock()
	d.gone[id] = true
	d.mu.Unlock()
	// The pod ended: news no pass of it caused, so its teardown may cut a
	// backoff wait short (Kick: at most once between scheduled retries).
	d.queue.Kick(id)
}

// qmpEvent turns VM events into passes: a completed unplug finishes a
// pending removal, a shutdown is noticed at once.
func (d *daemon) qmpEvent(id string, e qmp.Event) {
	switch e.Name {
	case "DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR", "SHUTDOWN", "RESET":
		d.trigger(id, "qmp")
	}
}

// monitorClosed turns the end of a VM's monitor connection into a pass:
// QEMU exited or closed it, and status says so at once, not at the next
// trigger.
func (d *daemon) monitorClosed(id string) { d.trigger(id, "qmp") }

// hmpUnplugPoll is how often a sandbox reached through a human monitor
// is looked at while a removal waits for the guest (no event says when).
const hmpUnplugPoll = 2 * time.Second

// firstListingWait bounds how long the first /proc walk waits for
// containerd's first listing: a containerd that is down must not keep
// discovery off.
const firstListingWait = 30 * time.Second

// awaitFirstListing waits until containerd's first listing is registered
// (or d.firstListingWait passes): a VM that containerd names is then
// registered under its real id, and /proc discovery only adds the others.
func (d *daemon) awaitFirstListing(ctx context.Context) {
	t := time.NewTimer(d.firstListingWait)
	defer t.Stop()
	select {
	case <-d.listed:
	case <-ctx.Done():
	case <-t.C:
		zerolog.Ctx(ctx).Warn().Dur("waited", d.firstListingWait).
			Msg("containerd has not listed its sandboxes yet; /proc discovery starts without it (a VM found first is renamed when containerd names it)")
	}
}

// discoveryDeadline bounds one /proc walk. A walk normally takes
// milliseconds; one that takes longer is stuck on a process in D state.
const discoveryDeadline = 30 * time.Second

// requestDiscovery asks the discovery loop for a /proc walk. It never
// blocks: a request made while another is pending coalesces into it.
func (d *daemon) requestDiscovery(why string) {
	select {
	case d.discoveryRequests <- why:
	default:
	}
}

// discoveryLoop runs /proc walks, one at a time, off the signal and event
// paths: reading a process's /proc files can block for as long as that
// process is in uninterruptible sleep, and nothing else may wait for it.
// A walk past discoveryDeadline is logged and left to finish in the
// background; no other walk starts until it has, and shutdown never waits
// for it.
func (d *daemon) discoveryLoop(ctx context.Context) {
	log := zerolog.Ctx(ctx)
	type result struct {
		found []watcher.Sandbox
		err   error
	}
	for {
		var why string
		select {
		case <-ctx.Done():
			return
		case why = <-d.discoveryRequests:
		}
		done := make(chan result, 1) // buffered: an abandoned walk still ends
		wctx, cancel := context.WithTimeout(ctx, discoveryDeadline)
		go func() {
			found, err := d.scan(wctx)
			done <- result{found, err}
		}()
		deadline := time.NewTimer(discoveryDeadline)
		var r result
	wait:
		for {
			select {
			case <-ctx.Done():
				cancel()
				deadline.Stop()
				return
			case <-deadline.C:
				log.Warn().Dur("deadline", discoveryDeadline).Str("reason", why).
					Msg("/proc discovery is stuck (a process in uninterruptible sleep?); no new walk until it returns")
			case r = <-done:
				break wait
			}
		}
		cancel()
		deadline.Stop()
		if r.err != nil {
			log.Warn().Err(r.err).Msg("/proc discovery failed")
			continue
		}
		d.registerDiscovered(ctx, r.found, why)
	}
}

// registerDiscovered registers QEMU processes found in watched
// namespaces; a VM already known through containerd or the config keeps
// that name.
func (d *daemon) registerDiscovered(ctx context.Context, found []watcher.Sandbox, why string) {
	for _, s := range found {
		// A VM found through /proc names no agent: host side only. Its
		// QMP socket is trusted only while the QEMU found serves it.
		sb := d.sandboxFor(s.ID, s.Netns, s.QMP, nil, "", overrides{})
		pid := s.PID
		sb.CheckQMP = func(c *net.UnixConn) error { return watcher.CheckQMPPeer(c, pid) }
		d.register(ctx, sb, reconcile.SourceProc, why)
	}
}

// work is the queue's work function: one pass over sandbox id, whose
// outcome is logged (see reconcile.FailureLog) and counted by cause.
func (d *daemon) work(ctx context.Context, id string) error {
	err := d.pass(ctx, id)
	if errors.Is(err, reconcile.ErrConnecting) {
		// Not a pass yet: the dial's end starts it.
		zerolog.Ctx(ctx).Debug().Str("sandbox", id).Err(err).Msg("waiting for the monitor connection")
		return err
	}
	d.mu.Lock()
	if d.firstPasses != nil {
		d.firstPasses[id] = true
	}
	d.mu.Unlock()
	r := d.failures.Note(id, err, time.Now())
	if err != nil {
		d.m.reconcileErrors.WithLabelValues(r.Cause).Inc()
		if r.Failures > 1 {
			d.m.retries.Inc()
		}
	}
	log := zerolog.Ctx(ctx).With().Str("sandbox", id).Logger()
	r.Log(&log, id, err)
	return err
}

// pass is one pass over sandbox id: a hand-over, an unregistration, a
// teardown or a reconcile.
func (d *daemon) pass(ctx context.Context, id string) error {
	d.mu.Lock()
	d.inflight[id] = time.Now()
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		delete(d.inflight, id)
		d.mu.Unlock()
	}()
	// The reconciler and the link watcher label their lines with the
	// sandbox themselves: ctx stays unlabelled for them (a second
	// "sandbox" key would be a duplicate key in each JSON line).
	log := zerolog.Ctx(ctx).With().Str("sandbox", id).Logger()
	d.mu.Lock()
	gone := d.gone[id]
	dropped := d.dropped[id]
	d.mu.Unlock()
	if dropped {
		return d.unregister(log.WithContext(ctx), id)
	}
	if gone {
		d.links.Stop(id)
		err := d.rec.Teardown(ctx, id)
		if err == nil {
			d.mu.Lock()
			d.forgetLocked(id)
			d.mu.Unlock()
			d.queue.Forget(id)
		}
		return err
	}
	sb, _, found := d.rec.Registered(id)
	if !found {
		return nil // unregistered, or now known by another id
	}
	// The netns kept from the last pass, still at the path, needs no
	// inspection.
	if !d.rec.NetnsHeld(id, sb.Netns) {
		if ok, err := watcher.IsNetns(sb.Netns); errors.Is(err, os.ErrNotExist) {
			d.rec.ReleaseNetns(id)
			log.Debug().Str("netns", sb.Netns).Msg("netns does not exist (yet); waiting for it to appear")
			return nil
		} else if !ok {
			d.rec.ReleaseNetns(id)
			return reconcile.WithCause(reconcile.CauseNetns,
				fmt.Errorf("sandbox %s: %s is not a network namespace yet (placeholder before its bind mount?): %v", id, sb.Netns, err))
		}
	}
	watch := d.links.Serial(id)
	if err := d.links.Watch(ctx, id, sb.Netns); err != nil {
		return reconcile.WithCause(reconcile.CauseNetns, fmt.Errorf("sandbox %s: watch links: %w", id, err))
	}
	if d.links.Serial(id) != watch {
		// A watch begun (or replaced) now: changes before it were not
		// heard, and what the netns kept of its filters may predate them.
		d.rec.NoteNetlink(id, reconcile.Netlink{TCStale: watcher.TCStaleAll})
	}
	start := time.Now()
	err := d.rec.Reconcile(ctx, id)
	d.m.reconcileDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		return err
	}
	if st := d.status(id); len(st.Pending) > 0 && st.Sandbox.Monitor == reconcile.MonitorHMP {
		// A human monitor sends no DEVICE_DELETED: look again later.
		time.AfterFunc(hmpUnplugPoll, func() {
			if ctx.Err() == nil {
				d.trigger(id, "hmp-poll")
			}
		})
	}
	d.mu.Lock()
	first, ok := d.pending[id]
	delete(d.pending, id)
	d.mu.Unlock()
	if ok {
		lat := time.Since(first)
		d.m.convergeLatency.Observe(lat.Seconds())
		if st := d.status(id); st.Mutations > 0 {
			log.Info().Int("mutations", st.Mutations).Float64("latency_ms", float64(lat.Microseconds())/1000).Msg("converged")
		}
	}
	return nil
}

func (d *daemon) status(id string) reconcile.Status {
	st, _ := d.rec.StatusOf(id)
	return st
}

// run is `tapsync run`: it returns nil after a clean SIGTERM/SIGINT.
func (d *daemon) run(ctx context.Context) error {
	// Signals are caught from the start: SIGHUP's default action would
	// kill a daemon still starting.
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(signals)
	return d.serve(ctx, signals)
}

// serve runs the daemon until SIGTERM or SIGINT arrives on signals.
// Nothing it does on this goroutine waits for a kernel, QEMU or /proc:
// a stop is handled at once, whatever the sources and passes are doing.
func (d *daemon) serve(ctx context.Context, signals <-chan os.Signal) error {
	log := zerolog.Ctx(ctx)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	d.baseCtx = ctx
	cfg := d.config()

	// One daemon per state dir, decided before the control socket or any
	// record is touched.
	lock, err := d.store.Lock()
	if err != nil {
		return fmt.Errorf("%w; not starting a second daemon on state dir %s", err, d.store.Dir())
	}
	defer lock.Close()

	// A pass never waits for a monitor's greeting: a sandbox without a
	// connection has it dialled in the background (from its registration
	// on), and a pass that finds the dial under way ends; the dial's end
	// starts its next pass. Hung QEMUs then hold no worker.
	d.rec.OnDialDone = func(id string) { d.trigger(id, "qmp-dial") }
	for _, s := range cfg.Sandboxes {
		sb := d.sandboxFor(s.ID, s.Netns, s.QMP, s.Queues, s.AgentURL, overrides{Model: s.Model, RxRate: rate(s.RxRate), TxRate: rate(s.TxRate)})
		sb.Monitor = s.Monitor
		d.register(ctx, sb, reconcile.SourceConfig, "in config file")
	}
	d.collectGarbage(ctx)

	ctl, err := d.serveControl(ctx)
	if err != nil {
		return err
	}
	defer ctl.Close()
	if cfg.MetricsAddress != "" {
		srv := &http.Server{Addr: cfg.MetricsAddress, Handler: d.metricsHandler(), ReadHeaderTimeout: 5 * time.Second}
		ln, err := net.Listen("tcp", cfg.MetricsAddress)
		if err != nil {
			return fmt.Errorf("metrics_address %s: %w", cfg.MetricsAddress, err)
		}
		go srv.Serve(ln)
		defer srv.Close()
		log.Info().Str("address", ln.Addr().String()).Msg("serving metrics on /metrics")
	}

	var wg sync.WaitGroup
	source := func(name string, f func() error) {
		wg.Go(func() {
			if err := f(); err != nil && ctx.Err() == nil {
				log.Error().Err(err).Str("source", name).Msg("event source stopped; sandboxes are still resynced periodically")
			}
		})
	}
	source("netns-dir", func() error { return d.watchNetnsDir(ctx) })
	if cfg.Containerd.Enabled {
		source("containerd", func() error {
			return watcher.WatchContainerd(ctx, cfg.watcherConfig(d.relist), d.handle)
		})
	}
	if cfg.Discovery.Proc {
		wg.Go(func() {
			if cfg.Containerd.Enabled {
				d.awaitFirstListing(ctx)
			}
			d.discoveryLoop(ctx)
		})
		d.requestDiscovery("startup scan")
	}
	wg.Go(func() { d.queue.Run(ctx, cfg.Workers, d.work) })

	sddaemon.SdNotify(false, sddaemon.SdNotifyReady)
	if iv, err := sddaemon.SdWatchdogEnabled(false); err == nil && iv > 0 {
		wg.Go(func() { d.watchdog(ctx, iv) })
	}
	resync := time.NewTimer(jitter(cfg.ResyncInterval))
	defer resync.Stop()
	log.Info().Strs("sandboxes", d.rec.Sandboxes()).Str("netns_dir", cfg.NetnsDir).Bool("containerd", cfg.Containerd.Enabled).
		Bool("proc_discovery", cfg.Discovery.Proc).Str("control", controlSocketPath(cfg.StateDir)).Msg("tapsync running")

	stop := func(why string) error {
		log.Info().Str("signal", why).Msg("stopping: endpoints stay wired while tapsync is down")
		sddaemon.SdNotify(false, sddaemon.SdNotifyStopping)
		cancel()
		wg.Wait()
		d.links.StopAll()
		d.rec.Close()
		return nil
	}
	go d.awaitReady(ctx, cfg.Containerd.Enabled)
	for {
		select {
		case <-ctx.Done():
			return stop("context canceled")
		case p := <-d.pings:
			close(p)
		case sig := <-signals:
			if sig == syscall.SIGHUP {
				d.reloadConfig(ctx)
				log.Info().Str("reason", "SIGHUP").Msg("resyncing every sandbox")
				d.triggerAll("signal")
				d.askRelist()
				continue
			}
			return stop(sig.String())
		case <-resync.C:
			log.Debug().Str("reason", "periodic resync").Msg("resyncing every sandbox")
			// The safety net: these passes read each VM from QEMU rather
			// than from the model our commands and its events keep.
			d.rec.VerifyAll()
			d.triggerAll("resync")
			d.askRelist()
			if cfg.Discovery.Proc {
				d.requestDiscovery("periodic resync")
			}
			d.collectGarbage(ctx)
			resync.Reset(jitter(d.config().ResyncInterval))
		}
	}
}

// collectGarbage deletes the records of sandboxes that are gone, and
// set-aside records older than state.KeepSetAside.
func (d *daemon) collectGarbage(ctx context.Context) {
	log := zerolog.Ctx(ctx)
	if gone, err := d.rec.CollectGarbage(ctx); err != nil {
		log.Warn().Err(err).Msg("record garbage collection failed")
	} else {
		d.m.gcRecords.Add(float64(len(gone)))
	}
	if _, err := d.store.CollectSetAside(ctx, time.Now().Add(-state.KeepSetAside)); err != nil {
		log.Warn().Err(err).Msg("set-aside record collection failed")
	}
}

// stuckPass is how long one pass may run before the daemon counts as
// wedged. Every QMP command and unplug wait has its own deadline (at most
// 1 min and 5 min by config), so only a deadlock gets this far.
const stuckPass = 30 * time.Minute

// stuck names a sandbox whose pass has run for longer than stuckPass, or
// is "".
func (d *daemon) stuck() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, start := range d.inflight {
		if time.Since(start) > stuckPass {
			return id
		}
	}
	return ""
}

// alive says whether the daemon is alive: its event loop answers within
// wait and no pass is stuck (/healthz; the watchdog's test).
func (d *daemon) alive(wait time.Duration) error {
	p := make(chan struct{})
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case d.pings <- p:
	case <-t.C:
		return fmt.Errorf("the event loop did not answer within %v", wait)
	}
	<-p
	if id := d.stuck(); id != "" {
		return fmt.Errorf("the pass of sandbox %s has run for more than %v", id, stuckPass)
	}
	return nil
}

// awaitReady closes d.ready once the first full resync is done: the
// first containerd listing registered (or given up on after
// firstListingWait; none when containerd is off), and every sandbox
// registered then has had a pass.
func (d *daemon) awaitReady(ctx context.Context, containerd bool) {
	if containerd {
		t := time.NewTimer(d.firstListingWait)
		select {
		case <-d.listed:
		case <-ctx.Done():
		case <-t.C: // a containerd that is down must not keep us unready
		}
		t.Stop()
	}
	ids := d.rec.Sandboxes()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		ids = slices.DeleteFunc(ids, func(id string) bool {
			_, _, registered := d.rec.Registered(id)
			return !registered
		})
		d.mu.Lock()
		ids = slices.DeleteFunc(ids, func(id string) bool { return d.firstPasses[id] })
		if len(ids) == 0 {
			d.firstPasses = nil
		}
		d.mu.Unlock()
		if len(ids) == 0 {
			d.readyOnce.Do(func() { close(d.ready) })
			zerolog.Ctx(ctx).Info().Msg("ready: the first full resync is done")
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// watchdog pings systemd at half its interval, on its own goroutine (a
// slow notify socket must never stall signal handling), unless a pass has
// been running for longer than stuckPass: then systemd restarts us.
func (d *daemon) watchdog(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if stuck := d.stuck(); stuck == "" {
			sddaemon.SdNotify(false, sddaemon.SdNotifyWatchdog)
		} else {
			zerolog.Ctx(ctx).Error().Str("sandbox", stuck).Dur("running_for", stuckPass).Msg("a reconcile pass is stuck; withholding the watchdog so that systemd restarts tapsync")
		}
	}
}

// watchNetnsDir follows the netns directory for the daemon's life. The
// directory may not exist yet on a fresh node (ip netns and CNI create it
// with the first namespace), or be removed: wait for it and watch again.
func (d *daemon) watchNetnsDir(ctx context.Context) error {
	log := zerolog.Ctx(ctx)
	wait := 100 * time.Millisecond
	for {
		err := watcher.WatchNetnsDir(ctx, d.config().NetnsDir, d.handle)
		if ctx.Err() != nil {
			return nil
		}
		log.Warn().Err(err).Str("netns_dir", d.config().NetnsDir).Dur("retry_in", wait).Msg("cannot watch the netns directory; retrying")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, 30*time.Second)
		d.triggerAll(string(watcher.SourceNetnsDir)) // changes may have been missed
	}
}

// askRelist asks the containerd source to list again; it never blocks.
func (d *daemon) askRelist() {
	select {
	case d.relist <- struct{}{}:
	default:
	}
}

// jitter spreads periodic resyncs of many nodes by ±10%.
func jitter(d time.Duration) time.Duration {
	return d - d/10 + time.Duration(rand.Int64N(int64(d/5)+1))
}
