package main

import (
	"context"
	"reflect"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/watcher"
)

// restartOnlyKeys are the config keys a reload does not change: they are
// bound at start (a directory watched and locked, a listening socket,
// the worker pool, the sources started, the logger).
var restartOnlyKeys = []struct {
	key   string
	field func(*Config) any
	keep  func(next, running *Config)
}{
	{"state_dir", func(c *Config) any { return c.StateDir }, func(n, r *Config) { n.StateDir = r.StateDir }},
	{"netns_dir", func(c *Config) any { return c.NetnsDir }, func(n, r *Config) { n.NetnsDir = r.NetnsDir }},
	{"metrics_address", func(c *Config) any { return c.MetricsAddress }, func(n, r *Config) { n.MetricsAddress = r.MetricsAddress }},
	{"workers", func(c *Config) any { return c.Workers }, func(n, r *Config) { n.Workers = r.Workers }},
	{"log_level", func(c *Config) any { return c.LogLevel }, func(n, r *Config) { n.LogLevel = r.LogLevel }},
	{"log_format", func(c *Config) any { return c.LogFormat }, func(n, r *Config) { n.LogFormat = r.LogFormat }},
	{"containerd", func(c *Config) any { return c.Containerd }, func(n, r *Config) { n.Containerd = r.Containerd }},
	{"discovery", func(c *Config) any { return c.Discovery }, func(n, r *Config) { n.Discovery = r.Discovery }},
}

// keepRestartOnly copies the restart-only keys of running into next and
// returns the ones whose values differed.
func keepRestartOnly(next, running *Config) []string {
	var changed []string
	for _, k := range restartOnlyKeys {
		if !reflect.DeepEqual(k.field(next), k.field(running)) {
			changed = append(changed, k.key)
		}
		k.keep(next, running)
	}
	return changed
}

// reloadConfig is SIGHUP's first half (the second is a resync of every
// sandbox): read the config file again and, when it is valid, make it the
// running one. [[sandbox]] entries that are gone are unregistered, new
// ones registered, changed ones updated; every other sandbox takes the
// new defaults. A config that does not load or validate changes nothing.
func (d *daemon) reloadConfig(ctx context.Context) {
	log := zerolog.Ctx(ctx)
	if d.reload == nil {
		return
	}
	next, err := d.reload()
	if err != nil {
		log.Error().Err(err).Msg("config reload refused; the running config stays")
		return
	}
	running := d.config()
	if changed := keepRestartOnly(&next, running); len(changed) > 0 {
		log.Warn().Strs("keys", changed).Msg("config keys changed that only take effect at restart; their running values stay")
	}
	d.cfg.Store(&next)

	inFile := map[string]bool{}
	for _, s := range next.Sandboxes {
		inFile[s.ID] = true
	}
	var drop []string
	for _, st := range d.rec.Status() {
		if id := st.Sandbox.ID; st.Source == reconcile.SourceConfig && !inFile[id] {
			drop = append(drop, id)
			d.mu.Lock()
			d.dropped[id] = true
			d.mu.Unlock()
			// The pass of id unregisters it: never while a pass runs on it,
			// and not after a failing sandbox's backoff (Kick).
			d.queue.Kick(id)
		}
	}
	for _, s := range next.Sandboxes {
		sb := d.sandboxFor(s.ID, s.Netns, s.QMP, s.Queues, s.AgentURL, overrides{Model: s.Model, RxRate: rate(s.RxRate), TxRate: rate(s.TxRate)})
		sb.Monitor = s.Monitor
		st := d.status(s.ID)
		if old := st.Sandbox; old.ID != "" && st.Source == reconcile.SourceConfig && old.Equal(sb) {
			continue // unchanged: the resync that follows the reload passes over it, once
		} else if old.ID != "" {
			log.Info().Str("sandbox", s.ID).Str("netns", sb.Netns).Str("qmp", sb.QMP).Msg("sandbox updated from the config file")
		}
		d.register(ctx, sb, reconcile.SourceConfig, "in config file (reloaded)")
	}
	for _, st := range d.rec.Status() {
		agentURL := ""
		switch st.Source {
		case reconcile.SourceConfig:
			continue
		case reconcile.SourceContainerd:
			agentURL = next.Containerd.AgentURL
			if st.Sandbox.Flavour == watcher.FlavourRs {
				agentURL = next.Containerd.RsAgentURL
			}
		}
		d.mu.Lock()
		pod := d.podRates[st.Sandbox.ID]
		d.mu.Unlock()
		sb := d.sandboxFor(st.Sandbox.ID, st.Sandbox.Netns, st.Sandbox.QMP, nil, agentURL, pod)
		// Its monitor and who may serve it do not change.
		sb.CheckQMP, sb.Monitor, sb.Flavour, sb.Runtime, sb.MonitorNote = st.Sandbox.CheckQMP, st.Sandbox.Monitor, st.Sandbox.Flavour, st.Sandbox.Runtime, st.Sandbox.MonitorNote
		if _, err := d.rec.Register(sb, st.Source); err != nil {
			log.Error().Err(err).Str("sandbox", sb.ID).Msg("sandbox refused with the reloaded defaults")
		}
	}
	log.Info().Int("sandboxes_in_file", len(next.Sandboxes)).Strs("unregistered", drop).Msg("config reloaded")
}

// unregister stops managing config sandbox id, gone from the config file.
// Its endpoints stay as they are, like when tapsync stops: a sandbox
// dropped from the file by mistake keeps its network. Its record stays
// too, so the sandbox is picked up where it was if it comes back; record
// garbage collection deletes it once the netns is gone.
func (d *daemon) unregister(ctx context.Context, id string) error {
	d.links.Stop(id)
	d.rec.Unregister(id)
	d.queue.Forget(id)
	d.mu.Lock()
	d.forgetLocked(id)
	d.mu.Unlock()
	zerolog.Ctx(ctx).Info().Msg("sandbox unregistered: no longer in the config file; its endpoints stay as they are")
	return nil
}
