package watcher

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	apievents "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/api/services/tasks/v1"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/rs/zerolog"
)

// ContainerdConfig says which containerd to watch and which of its
// sandboxes are Kata VMs. Zero fields take the defaults.
type ContainerdConfig struct {
	Address    string   // default /run/containerd/containerd.sock
	Namespaces []string // default ["k8s.io"]
	// Runtimes are patterns (path.Match) of the runtime names whose
	// sandboxes are VMs; default DefaultRuntimes. SkipRuntimes are left
	// alone even so, reported with Sandbox.Skip; nil: DefaultSkipRuntimes.
	Runtimes, SkipRuntimes []string
	// Kata says where each Kata runtime keeps a sandbox's monitor and
	// agent address.
	Kata KataLayout
	// NetnsDir is where a sandbox's netns must be bound (see CheckNetns);
	// default /var/run/netns, where CRI puts them.
	NetnsDir string
	// Relist, when not nil, asks for a full listing again (the daemon's
	// SIGHUP and periodic resync): a Sandbox Store record made without a
	// CRI event is found by it.
	Relist <-chan struct{}
	// StorePoll is how often the Sandbox Store is listed again while
	// CRI's event stream is unavailable (the bounded fallback); default
	// 10 s.
	StorePoll time.Duration
}

const (
	defaultContainerdAddress = "/run/containerd/containerd.sock"
	defaultNetnsDir          = "/var/run/netns"
	defaultStorePoll         = 10 * time.Second

	// criContainerType is the OCI annotation the CRI plugin puts on every
	// container of a pod: "sandbox" for the pod's sandbox container,
	// "container" for its app containers. Under Kata the app containers
	// run inside the sandbox's VM: only the sandbox is a sandbox to us.
	criContainerType = "io.kubernetes.cri.container-type"

	ctrBackoffMin = 100 * time.Millisecond
	ctrBackoffMax = 10 * time.Second
	// ctrCallTimeout bounds each containerd call, so that a hung
	// containerd ends the session (and we reconnect) instead of
	// stalling the source.
	ctrCallTimeout = 10 * time.Second
	// ctrDialTimeout bounds one connection attempt. containerd's dialer
	// polls for a missing socket every 10 ms within it, so a containerd
	// coming back is usually noticed by the attempt in progress.
	ctrDialTimeout = 2 * time.Second
)

// ctrTopics are the containerd event topics that start or end a sandbox.
var ctrTopics = []string{"/tasks/start", "/tasks/exit", "/tasks/delete", "/containers/delete"}

func (c ContainerdConfig) withDefaults() ContainerdConfig {
	if c.Address == "" {
		c.Address = defaultContainerdAddress
	}
	if len(c.Namespaces) == 0 {
		c.Namespaces = []string{"k8s.io"}
	}
	if len(c.Runtimes) == 0 {
		c.Runtimes = DefaultRuntimes
	}
	if c.SkipRuntimes == nil {
		c.SkipRuntimes = DefaultSkipRuntimes
	}
	c.Kata = c.Kata.withDefaults()
	if c.StorePoll <= 0 {
		c.StorePoll = defaultStorePoll
	}
	if c.NetnsDir == "" {
		c.NetnsDir = defaultNetnsDir
	}
	return c
}

// WatchContainerd reports the sandbox containers of containerd at
// cfg.Address: a container of one of cfg.Runtimes, in one of
// cfg.Namespaces, that is not a CRI app container and joins a network
// namespace by path.
//
// That path comes from the container's OCI spec, which the pod's creator
// controls. A sandbox is reported only when the path is a network
// namespace bound directly in cfg.NetnsDir (reported as
// <NetnsDir>/<name>, see CheckNetns) or the /proc/<pid>/ns/net of the
// container's own task, and never the host's network namespace. A
// container refused for its netns is logged once (per reason) at warn
// level with its id and why, and not reported.
//
// On every (re)connect it first subscribes, then emits KindUpsert for each
// such container whose task is running (or paused), then KindResyncAll:
// containerd does not replay events, so the Upserts of one connection,
// closed by its ResyncAll, are the whole containerd picture at that moment.
// After that, /tasks/start emits KindUpsert, and /tasks/exit,
// /tasks/delete (of the init process) and /containers/delete emit KindGone.
// Duplicates are possible and harmless by the contract of Kind.
//
// Losing containerd is not an error: WatchContainerd reconnects with
// exponential backoff (100 ms to 10 s) for as long as ctx lives, and
// returns nil when ctx ends. It returns an error only for a bad cfg.
func WatchContainerd(ctx context.Context, cfg ContainerdConfig, sink Sink) error {
	cfg = cfg.withDefaults()
	if err := cfg.Kata.Validate(); err != nil {
		return fmt.Errorf("containerd source: %w", err)
	}
	if err := ValidRuntimePatterns(append(slices.Clone(cfg.Runtimes), cfg.SkipRuntimes...)); err != nil {
		return fmt.Errorf("containerd source: %w", err)
	}
	log := zerolog.Ctx(ctx).With().Str("source", string(SourceContainerd)).Str("address", cfg.Address).Logger()
	w := newCtrWatcher(cfg, sink, &log)

	backoff := ctrBackoffMin
	failures := 0
	for {
		began := time.Now()
		connected, err := w.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if connected {
			failures = 0
			// Start over only after a session that held for a while:
			// a containerd that lists but drops every subscription
			// must not make us relist ten times a second.
			if time.Since(began) >= ctrBackoffMax {
				backoff = ctrBackoffMin
			}
		}
		failures++
		// Warn about a lost connection and about the first failed
		// attempt, not about every retry of a long outage.
		ev := log.Debug()
		if failures == 1 {
			ev = log.Warn()
		}
		ev.Err(err).Dur("retry_in", backoff).Msg("containerd unavailable; reconnecting")

		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, ctrBackoffMax)
	}
}

// ListContainerd returns the sandboxes that WatchContainerd would report
// for containerd at cfg.Address right now (running sandbox containers of
// cfg.Runtimes whose netns passes CheckNetns), with their QMP socket from
// cfg.QMPSocket, for `tapsync check`. Refused netns are logged through
// ctx's logger, as the watcher logs them.
func ListContainerd(ctx context.Context, cfg ContainerdConfig) ([]Sandbox, error) {
	cfg = cfg.withDefaults()
	log := zerolog.Ctx(ctx).With().Str("source", string(SourceContainerd)).Str("address", cfg.Address).Logger()
	var found []Sandbox
	sink := func(e Event) {
		if e.Kind == KindUpsert {
			found = append(found, e.Sandbox)
		}
	}
	w := newCtrWatcher(cfg, sink, &log)
	cli, err := client.New(cfg.Address, client.WithTimeout(ctrDialTimeout))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", cfg.Address, err)
	}
	defer cli.Close()
	if _, err := w.list(ctx, cli); err != nil {
		return nil, err
	}
	return found, nil
}

// ctrKey names a container: IDs are unique only within a namespace.
type ctrKey struct{ ns, id string }

type ctrWatcher struct {
	cfg  ContainerdConfig
	sink Sink
	log  *zerolog.Logger
	// known holds the sandbox containers seen since the last (re)connect
	// (running or not), so that their Gone is emitted even when the
	// container can no longer be loaded. Only the session goroutine
	// touches it.
	known map[ctrKey]bool
	// rejected holds the sandbox containers refused for their netns,
	// with the reason last logged, across reconnects (so that each is
	// logged once); pruned by listings and container deletes. Only the
	// session goroutine touches it.
	rejected map[ctrKey]string
	// live holds the sandboxes reported by KindUpsert and not since by
	// KindGone; quiet, during a relist, the ones not to report again.
	// Only the session goroutine touches them.
	live, quiet map[ctrKey]bool
	// noStore: containerd has no Sandbox Store (before 1.7).
	noStore bool
}

func newCtrWatcher(cfg ContainerdConfig, sink Sink, log *zerolog.Logger) *ctrWatcher {
	return &ctrWatcher{cfg: cfg, sink: sink, log: log, known: map[ctrKey]bool{}, rejected: map[ctrKey]string{}, live: map[ctrKey]bool{}}
}

// goneEvent reports sandbox key gone.
func (w *ctrWatcher) goneEvent(key ctrKey, why string) {
	delete(w.live, key)
	w.sink(Event{Kind: KindGone, Source: SourceContainerd, Why: why, ID: key.id})
}

// session connects, subscribes, lists and then follows events until the
// subscription fails or ctx ends. connected reports whether the listing
// succeeded, i.e. containerd was really there.
func (w *ctrWatcher) session(ctx context.Context) (connected bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the subscription's goroutine

	// A fresh client per session: the gRPC connection is dialled on the
	// first call, so reconnecting is paced by our backoff and not by
	// gRPC's own.
	cli, err := client.New(w.cfg.Address, client.WithTimeout(ctrDialTimeout))
	if err != nil {
		return false, fmt.Errorf("containerd at %s: %w", w.cfg.Address, err)
	}
	defer cli.Close()

	// Subscribe before listing, so that nothing that happens after the
	// listing is missed. (The subscription is registered by containerd
	// a moment after Subscribe returns; the window is microseconds, and
	// the daemon's periodic resync covers it.)
	var filters []string
	for _, ns := range w.cfg.Namespaces {
		for _, topic := range ctrTopics {
			// Equivalent to: ctr events 'namespace=="k8s.io",topic=="/tasks/start"' ...
			filters = append(filters, fmt.Sprintf("namespace==%s,topic==%s", strconv.Quote(ns), strconv.Quote(topic)))
		}
	}
	envelopes, errs := cli.EventService().Subscribe(ctx, filters...)

	listed, err := w.list(ctx, cli)
	if err != nil {
		return false, err
	}
	w.log.Info().Strs("namespaces", w.cfg.Namespaces).Strs("runtimes", w.cfg.Runtimes).Bool("sandbox_store", !w.noStore).Msg("containerd connected")
	w.sink(Event{Kind: KindResyncAll, Source: SourceContainerd, Why: "containerd (re)connected", Listed: listed})

	// Pods of the shim sandboxer publish no containerd event: follow
	// CRI's stream, and while it is down list the Sandbox Store every
	// StorePoll instead.
	cri := make(chan criEvent, 64)
	criDone := make(chan error, 1)
	criUp := false
	startCRI := func() {
		if w.noStore || !slices.Contains(w.cfg.Namespaces, criNamespace) || criUp {
			return
		}
		criUp = true
		go func() {
			_, err := followCRI(ctx, w.cfg.Address, cri)
			criDone <- err
		}()
	}
	startCRI()
	pollTicker := time.NewTicker(w.cfg.StorePoll)
	pollTicker.Stop()
	defer pollTicker.Stop()
	var poll <-chan time.Time // nil while the stream runs
	criWarned := false

	for {
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case err, ok := <-errs:
			if !ok || err == nil {
				err = errors.New("event stream closed")
			}
			return true, fmt.Errorf("events from containerd at %s: %w", w.cfg.Address, err)
		case env := <-envelopes:
			if err := w.handle(ctx, cli, env); err != nil {
				return true, err
			}
		case ev := <-cri:
			if err := w.storeChanged(ctx, cli, criNamespace, ev.id, criEventWhy(ev.kind)); err != nil {
				return true, err
			}
		case err := <-criDone:
			criUp = false
			if ctx.Err() != nil {
				return true, ctx.Err()
			}
			ev := w.log.Debug()
			if !criWarned {
				ev, criWarned = w.log.Warn(), true
			}
			ev.Err(err).Dur("poll", w.cfg.StorePoll).Msg("CRI's event stream is unavailable: listing the Sandbox Store periodically instead")
			if poll == nil {
				pollTicker.Reset(w.cfg.StorePoll)
				poll = pollTicker.C
			}
		case <-poll:
			if err := w.relist(ctx, cli); err != nil {
				return true, err
			}
			startCRI() // try the stream again
			if criUp {
				pollTicker.Stop()
				poll = nil
			}
		case <-w.cfg.Relist:
			if err := w.relist(ctx, cli); err != nil {
				return true, err
			}
		}
	}
}

// relist lists containerd again, reporting only what changed since: new
// sandboxes (KindUpsert) and the ones no longer listed (KindGone).
func (w *ctrWatcher) relist(ctx context.Context, cli *client.Client) error {
	prev := w.live
	w.live, w.quiet = map[ctrKey]bool{}, prev
	defer func() { w.quiet = nil }()
	if _, err := w.list(ctx, cli); err != nil {
		w.live = prev
		return err
	}
	for k := range prev {
		if !w.live[k] {
			w.log.Debug().Str("namespace", k.ns).Str("sandbox", k.id).Msg("sandbox gone: no longer listed")
			w.goneEvent(k, "no longer listed by containerd")
		}
	}
	return nil
}

// list emits KindUpsert for every live sandbox in every namespace and
// remembers all sandbox containers, live or not.
func (w *ctrWatcher) list(ctx context.Context, cli *client.Client) (listed []string, err error) {
	listed = []string{} // non-nil: an authoritative (possibly empty) listing
	clear(w.known)
	present := map[ctrKey]bool{}
	for _, ns := range w.cfg.Namespaces {
		nctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), ctrCallTimeout)
		// Equivalent to: ctr -n k8s.io containers ls
		// (runtime names are matched here: they are patterns)
		recs, err := cli.ContainerService().List(nctx)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("list containers of containerd at %s in namespace %s: %w", w.cfg.Address, ns, err)
		}
		for _, rec := range recs {
			if !MatchRuntime(w.cfg.Runtimes, rec.Runtime.Name) {
				continue
			}
			present[ctrKey{ns, rec.ID}] = true
			sb, skip := w.sandboxOf(ns, rec)
			if skip.why != "" {
				w.logSkip(ns, rec.ID, skip)
				continue
			}
			live, pid, err := w.taskLive(ctx, cli, ns, rec.ID)
			if err != nil {
				return nil, err
			}
			if !live {
				w.known[ctrKey{ns, rec.ID}] = true
				continue
			}
			sb, ok := w.admit(ns, sb, pid)
			if !ok {
				continue
			}
			listed = append(listed, sb.ID)
			w.upsert(ns, sb, "running at (re)connect")
		}
		more, err := w.listStore(ctx, cli, ns, present)
		if err != nil {
			return nil, err
		}
		listed = append(listed, more...)
	}
	for k := range w.rejected {
		if !present[k] {
			delete(w.rejected, k)
		}
	}
	return listed, nil
}

// taskLive reports whether the container's task runs (or is paused: its
// VM still exists), and its pid.
func (w *ctrWatcher) taskLive(ctx context.Context, cli *client.Client, ns, id string) (live bool, pid uint32, err error) {
	nctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), ctrCallTimeout)
	defer cancel()
	resp, err := cli.TaskService().Get(nctx, &tasks.GetRequest{ContainerID: id})
	if err != nil {
		if errdefs.IsNotFound(err) { // created, never started, or already deleted
			return false, 0, nil
		}
		return false, 0, fmt.Errorf("get task %s of containerd at %s in namespace %s: %w", id, w.cfg.Address, ns, err)
	}
	// Only positive evidence ends a sandbox: containerd reports UNKNOWN
	// when a (slow) shim does not answer, and tearing down a live VM's
	// taps would cut its network.
	switch resp.GetProcess().GetStatus() {
	case task.Status_STOPPED, task.Status_CREATED:
		return false, 0, nil
	}
	return true, resp.GetProcess().GetPid(), nil
}

// handle turns one event into at most one Event. An error means
// containerd could not be asked and ends the session: the reconnect's
// listing then repairs whatever this event would have told.
func (w *ctrWatcher) handle(ctx context.Context, cli *client.Client, env *events.Envelope) error {
	if env == nil || env.Event == nil || !slices.Contains(w.cfg.Namespaces, env.Namespace) {
		return nil
	}
	v, err := typeurl.UnmarshalAny(env.Event)
	if err != nil {
		w.log.Debug().Err(err).Str("namespace", env.Namespace).Str("topic", env.Topic).Msg("undecodable containerd event")
		return nil
	}
	ns := env.Namespace
	switch e := v.(type) {
	case *apievents.TaskStart:
		return w.started(ctx, cli, ns, e.ContainerID, e.Pid)
	case *apievents.TaskExit:
		// ID names the process: the container's ID for its init
		// process, the exec ID for an exec'd one (which ends nothing).
		if e.ID != "" && e.ID != e.ContainerID {
			return nil
		}
		return w.gone(ctx, cli, ns, e.ContainerID, "task exited", false)
	case *apievents.TaskDelete:
		if e.ID != "" && e.ID != e.ContainerID { // set only for exec'd processes, by some shims
			return nil
		}
		return w.gone(ctx, cli, ns, e.ContainerID, "task deleted", false)
	case *apievents.ContainerDelete:
		return w.gone(ctx, cli, ns, e.ID, "container deleted", true)
	}
	return nil
}

// started handles /tasks/start: the container is read again, so a stale
// start of a container deleted meanwhile emits nothing.
func (w *ctrWatcher) started(ctx context.Context, cli *client.Client, ns, id string, pid uint32) error {
	rec, found, err := w.get(ctx, cli, ns, id)
	if err != nil || !found {
		return err
	}
	sb, skip := w.sandboxOf(ns, rec)
	if skip.why != "" {
		w.logSkip(ns, id, skip)
		return nil
	}
	sb, ok := w.admit(ns, sb, pid)
	if !ok {
		return nil
	}
	w.upsert(ns, sb, "task started")
	return nil
}

// admit vets the netns of sandbox sb, whose task is pid: it returns the
// sandbox with the netns path to use, or false when the netns is refused
// (logged once per reason). A sandbox accepted before and refused now is
// reported gone.
func (w *ctrWatcher) admit(ns string, sb Sandbox, pid uint32) (Sandbox, bool) {
	key := ctrKey{ns, sb.ID}
	netns, err := w.vetNetns(sb.Netns, pid)
	if err == nil {
		delete(w.rejected, key)
		w.known[key] = true
		sb.Netns = netns
		return sb, true
	}
	why := err.Error()
	if w.rejected[key] != why {
		w.rejected[key] = why
		w.log.Warn().Str("namespace", ns).Str("sandbox", sb.ID).Str("netns", sb.Netns).Str("why", why).
			Msg("sandbox refused: its network namespace is not one we may wire")
	}
	if w.known[key] {
		delete(w.known, key)
		w.goneEvent(key, "netns refused: "+why)
	}
	return Sandbox{}, false
}

// vetNetns returns the path to use for a netns path from an OCI spec, or
// why it is refused.
func (w *ctrWatcher) vetNetns(path string, pid uint32) (string, error) {
	if strings.HasPrefix(filepath.Clean(path), "/proc/") {
		if err := checkTaskNetns(path, pid); err != nil {
			return "", err
		}
		return path, nil
	}
	return CheckNetns(w.cfg.NetnsDir, path)
}

// gone handles the end of a task or container. Gone is emitted for a
// sandbox we know, or one that still loads as a sandbox; a container
// that loads as something else, or is unknown and gone, is not ours.
func (w *ctrWatcher) gone(ctx context.Context, cli *client.Client, ns, id, why string, forget bool) error {
	key := ctrKey{ns, id}
	sandbox := w.known[key]
	_, refused := w.rejected[key]
	if forget {
		delete(w.known, key)
		delete(w.rejected, key)
	}
	if !sandbox && !forget && !refused {
		rec, found, err := w.get(ctx, cli, ns, id)
		if err != nil {
			return err
		}
		if found {
			_, skip := w.sandboxOf(ns, rec)
			sandbox = skip.why == ""
		}
	}
	if !sandbox {
		return nil
	}
	w.log.Debug().Str("namespace", ns).Str("sandbox", id).Str("why", why).Msg("sandbox gone")
	w.goneEvent(key, why)
	return nil
}

// get loads a container record; found is false when it no longer exists.
func (w *ctrWatcher) get(ctx context.Context, cli *client.Client, ns, id string) (rec containers.Container, found bool, err error) {
	nctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), ctrCallTimeout)
	defer cancel()
	rec, err = cli.ContainerService().Get(nctx, id)
	if errdefs.IsNotFound(err) {
		return rec, false, nil
	}
	if err != nil {
		return rec, false, fmt.Errorf("get container %s of containerd at %s in namespace %s: %w", id, w.cfg.Address, ns, err)
	}
	return rec, true, nil
}

// logSkip logs why a container is not taken as a sandbox: loudly when it
// is of a watched runtime and meant to be one (its netns cannot be named),
// quietly for the everyday other containers.
//
// A loud one is logged once per reason (relisting does not repeat it).
func (w *ctrWatcher) logSkip(ns, id string, s skipReason) {
	ev := w.log.Debug()
	if s.loud {
		key := ctrKey{ns, id}
		if w.rejected[key] == s.why {
			return
		}
		w.rejected[key] = s.why
		ev = w.log.Warn()
	}
	ev.Str("namespace", ns).Str("sandbox", id).Str("why", s.why).Msg("skipped: not a sandbox we can wire")
}

func (w *ctrWatcher) upsert(ns string, sb Sandbox, why string) {
	key := ctrKey{ns, sb.ID}
	w.live[key] = true
	if w.quiet[key] {
		return
	}
	w.log.Debug().Str("namespace", ns).Str("sandbox", sb.ID).Str("netns", sb.Netns).Str("why", why).Msg("sandbox found")
	w.sink(Event{Kind: KindUpsert, Source: SourceContainerd, Why: why, Sandbox: sb})
}

// skipReason says why a container is not a sandbox; the zero value means
// it is one. loud marks a container of a watched runtime that looks meant
// to be a sandbox but cannot be wired.
type skipReason struct {
	why  string
	loud bool
}

// Kata's per-pod rate limits, in bit/s (0: unlimited): rx into the VM,
// tx out of it.
const (
	KataRxRateAnnotation = "io.katacontainers.config.hypervisor.rx_rate_limiter_max_rate"
	KataTxRateAnnotation = "io.katacontainers.config.hypervisor.tx_rate_limiter_max_rate"
)

// rateAnnotation reads a rate annotation of container id: nil when it is
// absent or not a non-negative integer (then the configured rate holds,
// and the log says why the pod's was refused).
func (w *ctrWatcher) rateAnnotation(id string, annotations map[string]string, key string) *uint64 {
	v, ok := annotations[key]
	if !ok {
		return nil
	}
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
	if err != nil {
		if w.log != nil {
			w.log.Warn().Str("container", id).Str("annotation", key).Str("value", v).
				Msg("rate annotation refused: not a non-negative integer of bits per second; the configured rate applies")
		}
		return nil
	}
	return &n
}

// sandboxOf returns the sandbox a container record describes, or why it
// is not one.
func (w *ctrWatcher) sandboxOf(ns string, rec containers.Container) (Sandbox, skipReason) {
	if !MatchRuntime(w.cfg.Runtimes, rec.Runtime.Name) {
		return Sandbox{}, skipReason{why: fmt.Sprintf("runtime %q is not watched", rec.Runtime.Name)}
	}
	if rec.Spec == nil {
		return Sandbox{}, skipReason{why: "container has no OCI spec", loud: true}
	}
	var spec specs.Spec
	if err := typeurl.UnmarshalTo(rec.Spec, &spec); err != nil {
		return Sandbox{}, skipReason{why: fmt.Sprintf("undecodable OCI spec: %v", err), loud: true}
	}
	if t, ok := spec.Annotations[criContainerType]; ok && t != "sandbox" {
		return Sandbox{}, skipReason{why: fmt.Sprintf("CRI %s container, not the pod's sandbox", t)}
	}
	if spec.Linux == nil {
		return Sandbox{}, skipReason{why: "OCI spec has no linux section", loud: true}
	}
	for _, n := range spec.Linux.Namespaces {
		if n.Type != specs.NetworkNamespace {
			continue
		}
		if n.Path == "" {
			// The runtime makes a private netns nobody can name by
			// path: there is nothing for us to watch.
			return Sandbox{}, skipReason{why: "private network namespace without a path", loud: true}
		}
		sb := w.kataSandbox(ns, rec.ID, rec.Runtime.Name, n.Path)
		sb.RxRate = w.rateAnnotation(rec.ID, spec.Annotations, KataRxRateAnnotation)
		sb.TxRate = w.rateAnnotation(rec.ID, spec.Annotations, KataTxRateAnnotation)
		return sb, skipReason{}
	}
	return Sandbox{}, skipReason{why: "no network namespace in the OCI spec (host network)", loud: true}
}

// kataSandbox is sandbox id of runtime in namespace ns, with netns, its
// monitor and agent where its Kata runtime keeps them, or marked Skip
// when its runtime is one to leave alone.
func (w *ctrWatcher) kataSandbox(ns, id, runtime, netns string) Sandbox {
	k := w.cfg.Kata.Resolve(ns, id, runtime)
	sb := Sandbox{ID: id, Netns: netns, QMP: k.Monitor, Protocol: k.Protocol, Runtime: runtime, Flavour: k.Flavour, Bundle: k.Bundle, AgentURL: k.AgentURL,
		Wrapped: k.Wrapped, MonitorNote: k.WrapperNote}
	if MatchRuntime(w.cfg.SkipRuntimes, runtime) {
		sb.Skip = fmt.Sprintf("runtime %s is a confidential handler: its agent policy denies UpdateInterface and UpdateRoutes, so a NIC plugged in would stay unconfigured (containerd skip_runtimes)", runtime)
	}
	return sb
}
