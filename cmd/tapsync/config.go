package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/state"
	"github.com/tapsync/tapsync/watcher"
)

// DefaultConfigPath is where `tapsync run` looks for its config file.
const DefaultConfigPath = "/etc/tapsync/config.toml"

// Config is the daemon's configuration: the TOML file, then flags.
type Config struct {
	NetnsDir       string        `toml:"netns_dir"`
	StateDir       string        `toml:"state_dir"`
	ResyncInterval time.Duration `toml:"resync_interval"`
	LogLevel       string        `toml:"log_level"`
	LogFormat      string        `toml:"log_format"`
	MetricsAddress string        `toml:"metrics_address"`
	Workers        int           `toml:"workers"`

	Defaults   Defaults         `toml:"defaults"`
	Containerd ContainerdConfig `toml:"containerd"`
	Discovery  Discovery        `toml:"discovery"`
	Sandboxes  []StaticSandbox  `toml:"sandbox"`
}

// Defaults apply to every sandbox unless it says otherwise.
type Defaults struct {
	Model         string        `toml:"model"`
	Queues        int           `toml:"queues"` // 0: one per vCPU of the VM
	Vhost         string        `toml:"vhost"`
	QMPTimeout    time.Duration `toml:"qmp_timeout"`
	UnplugTimeout time.Duration `toml:"unplug_timeout"`
}

// ContainerdConfig selects the containerd sandboxes to follow.
type ContainerdConfig struct {
	Enabled    bool     `toml:"enabled"`
	Address    string   `toml:"address"`
	Namespaces []string `toml:"namespaces"`
	Runtimes   []string `toml:"runtimes"`
	QMPSocket  string   `toml:"qmp_socket"`
}

// Discovery enables zero-config sources.
type Discovery struct {
	Proc bool `toml:"proc"`
}

// StaticSandbox is a sandbox named in the config file.
type StaticSandbox struct {
	ID     string `toml:"id"`
	Netns  string `toml:"netns"`
	QMP    string `toml:"qmp"`
	Model  string `toml:"model"`
	Queues *int   `toml:"queues"`
}

// Models. Only tcfilter is wired today; the others are refused at start
// rather than accepted and ignored.
var knownModels = []string{"tcfilter", "macvtap", "none"}

const implementedModel = "tcfilter"

// DefaultConfig is what runs when no config file exists.
func DefaultConfig() Config {
	return Config{
		NetnsDir:       "/var/run/netns",
		StateDir:       state.DefaultDir,
		ResyncInterval: 10 * time.Minute,
		LogLevel:       "info",
		LogFormat:      "json",
		MetricsAddress: "127.0.0.1:9464",
		Workers:        4,
		Defaults: Defaults{
			Model:         implementedModel,
			Queues:        1,
			Vhost:         string(datapath.VhostAuto),
			QMPTimeout:    5 * time.Second,
			UnplugTimeout: 10 * time.Second,
		},
		Containerd: ContainerdConfig{
			Enabled:    true,
			Address:    "/run/containerd/containerd.sock",
			Namespaces: []string{"k8s.io"},
			Runtimes:   []string{"io.containerd.kata.v2"},
			QMPSocket:  "/run/vc/vm/{id}/extra-monitor.sock",
		},
		Discovery: Discovery{Proc: true},
	}
}

// LoadConfig reads path over the defaults. A missing file means the
// defaults (when missingOK); an unknown key, a bad value or an
// inconsistent sandbox list is an error naming the key.
func LoadConfig(path string, missingOK bool) (Config, error) {
	cfg := DefaultConfig()
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist) && missingOK:
		return cfg, nil
	case err != nil:
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	md, err := toml.Decode(string(b), &cfg)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return Config{}, fmt.Errorf("config %s: unknown key %s", path, strings.Join(keys, ", "))
	}
	return cfg, nil
}

// Validate checks the whole configuration; every problem is reported, each
// naming its key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if !filepath.IsAbs(c.NetnsDir) {
		bad("netns_dir", "%q is not an absolute path", c.NetnsDir)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("state_dir", "%q is not an absolute path", c.StateDir)
	}
	if c.ResyncInterval < time.Second {
		bad("resync_interval", "%v is below the 1s minimum", c.ResyncInterval)
	}
	if _, err := zerolog.ParseLevel(c.LogLevel); err != nil || c.LogLevel == "" {
		bad("log_level", "%q is not one of trace, debug, info, warn, error", c.LogLevel)
	}
	if c.LogFormat != "json" && c.LogFormat != "console" {
		bad("log_format", "%q is not json or console", c.LogFormat)
	}
	if c.MetricsAddress != "" {
		if _, _, err := net.SplitHostPort(c.MetricsAddress); err != nil {
			bad("metrics_address", "%q is not host:port (empty disables metrics): %v", c.MetricsAddress, err)
		}
	}
	if c.Workers < 1 || c.Workers > 256 {
		bad("workers", "%d is outside 1..256", c.Workers)
	}
	d := c.Defaults
	checkModel := func(key, m string) {
		switch {
		case !slices.Contains(knownModels, m):
			bad(key, "%q is not one of %s", m, strings.Join(knownModels, ", "))
		case m != implementedModel:
			bad(key, "interworking model %q is not implemented yet (use %s)", m, implementedModel)
		}
	}
	checkModel("defaults.model", d.Model)
	if d.Queues < 0 || d.Queues > datapath.MaxQueues {
		bad("defaults.queues", "%d is outside 0..%d (0: one per vCPU)", d.Queues, datapath.MaxQueues)
	}
	switch datapath.Vhost(d.Vhost) {
	case datapath.VhostAuto, datapath.VhostOn, datapath.VhostOff:
	default:
		bad("defaults.vhost", "%q is not auto, on or off", d.Vhost)
	}
	// Upper bounds: a worker waits this long per command or unplug.
	if d.QMPTimeout <= 0 || d.QMPTimeout > time.Minute {
		bad("defaults.qmp_timeout", "%v is outside (0, 1m]", d.QMPTimeout)
	}
	if d.UnplugTimeout <= 0 || d.UnplugTimeout > 5*time.Minute {
		bad("defaults.unplug_timeout", "%v is outside (0, 5m]", d.UnplugTimeout)
	}
	if cd := c.Containerd; cd.Enabled {
		if cd.Address == "" {
			bad("containerd.address", "empty")
		}
		if len(cd.Namespaces) == 0 {
			bad("containerd.namespaces", "empty: name at least one containerd namespace")
		}
		if len(cd.Runtimes) == 0 {
			bad("containerd.runtimes", "empty: name at least one sandbox runtime")
		}
		if !strings.Contains(cd.QMPSocket, "{id}") || !filepath.IsAbs(cd.QMPSocket) {
			bad("containerd.qmp_socket", "%q must be an absolute path template containing {id}", cd.QMPSocket)
		}
	}
	seen := map[string]bool{}
	netnsOf, qmpOf := map[string]string{}, map[string]string{}
	for i, s := range c.Sandboxes {
		key := fmt.Sprintf("sandbox[%d]", i)
		if s.ID != "" {
			key = fmt.Sprintf("sandbox %q", s.ID)
		}
		if err := state.ValidID(s.ID); err != nil {
			bad(key+".id", "%v", err)
		} else if seen[s.ID] {
			bad(key+".id", "duplicate sandbox id")
		}
		seen[s.ID] = true
		if err := watcher.InDir(c.NetnsDir, s.Netns); err != nil {
			bad(key+".netns", "%v", err)
		}
		if !filepath.IsAbs(s.QMP) {
			bad(key+".qmp", "%q is not an absolute path", s.QMP)
		}
		if other, dup := netnsOf[s.Netns]; dup {
			bad(key+".netns", "%s is already the netns of sandbox %q", s.Netns, other)
		}
		if other, dup := qmpOf[s.QMP]; dup {
			bad(key+".qmp", "%s is already the QMP socket of sandbox %q (a socket serves one client)", s.QMP, other)
		}
		netnsOf[s.Netns], qmpOf[s.QMP] = s.ID, s.ID
		if s.Model != "" {
			checkModel(key+".model", s.Model)
		}
		if s.Queues != nil && (*s.Queues < 0 || *s.Queues > datapath.MaxQueues) {
			bad(key+".queues", "%d is outside 0..%d", *s.Queues, datapath.MaxQueues)
		}
	}
	return errors.Join(errs...)
}
