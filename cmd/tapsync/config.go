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
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile"
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
	Guest      GuestConfig      `toml:"guest"`
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
	// Hotplug is where NICs go: "bridge" (PCI bridge slots, from the
	// top), "root-port" (empty PCIe root ports, which Kata keeps for VFIO
	// with hot_plug_vfio = "root-port") or "any".
	Hotplug string `toml:"hotplug"`
	// ReservedSlots [from, to] are bridge (and pc pci.0) slots never taken.
	ReservedSlots []int `toml:"reserved_slots"`
	// RepairAdopted lets tapsync repair the broken redirect of a NIC Kata
	// wired itself; off, it is only reported.
	RepairAdopted bool `toml:"repair_adopted"`
	// RxRate and TxRate limit each endpoint's traffic into and out of the
	// VM, in bits per second (Kata's rx/tx_rate_limiter_max_rate); 0:
	// unlimited. A pod's Kata annotations override them.
	RxRate int64 `toml:"rx_rate"`
	TxRate int64 `toml:"tx_rate"`
}

// placement is the hot-plug placement of the defaults (validated).
func (d Defaults) placement() qmp.Placement {
	h, _ := qmp.ParseHotplug(d.Hotplug)
	p := qmp.Placement{Hotplug: h}
	if len(d.ReservedSlots) == 2 {
		p.Reserved = qmp.SlotRange{From: d.ReservedSlots[0], To: d.ReservedSlots[1]}
	}
	return p
}

// GuestConfig is the guest side: who configures the guest's interfaces.
type GuestConfig struct {
	// Agent is "kata" (the Kata agent in the VM, over ttrpc) or "none"
	// (tapsync only wires the host side and the NIC).
	Agent   string        `toml:"agent"`
	Timeout time.Duration `toml:"timeout"` // per agent call
}

// Guest agents.
const (
	GuestAgentKata = "kata"
	GuestAgentNone = "none"
)

// ContainerdConfig selects the containerd sandboxes to follow, and says
// where each Kata runtime keeps a sandbox's monitor and agent.
type ContainerdConfig struct {
	Enabled    bool     `toml:"enabled"`
	Address    string   `toml:"address"`
	Namespaces []string `toml:"namespaces"`
	// Runtimes are patterns of the runtime names whose sandboxes are VMs
	// (* matches any run of characters); SkipRuntimes are left alone
	// even so, shown in status (Kata's confidential handlers).
	Runtimes     []string `toml:"runtimes"`
	SkipRuntimes []string `toml:"skip_runtimes"`
	// WrapperSocket is the QMP socket tapsync-qemu (the QEMU wrapper
	// install-kata installs) adds to every Kata VM: preferred to the
	// runtimes' debug monitors whenever it exists.
	WrapperSocket string `toml:"wrapper_socket"`
	// QMPSocket and AgentURL are the Go runtime's ({id} is the sandbox
	// id): its QMP extra monitor and its agent. AgentURL empty: no
	// guest side for its sandboxes.
	QMPSocket string `toml:"qmp_socket"`
	AgentURL  string `toml:"agent_url"`
	// RsDir is runtime-rs's per-sandbox dir (its existence says a
	// sandbox is runtime-rs's), RsMonitor its HMP debug monitor relative
	// to the bundle dir (QEMU's cwd), RsAgentURL its agent; BundleDirs
	// where containerd makes bundle dirs ({namespace}, {id}).
	RsDir      string   `toml:"rs_dir"`
	RsMonitor  string   `toml:"rs_monitor"`
	RsAgentURL string   `toml:"rs_agent_url"`
	BundleDirs []string `toml:"bundle_dirs"`
}

// watcherConfig is the containerd source's configuration.
func (c *Config) watcherConfig(relist <-chan struct{}) watcher.ContainerdConfig {
	cd := c.Containerd
	skip := cd.SkipRuntimes
	if skip == nil {
		skip = []string{} // none: an empty list in the file means skip nothing
	}
	return watcher.ContainerdConfig{
		Address: cd.Address, Namespaces: cd.Namespaces, Runtimes: cd.Runtimes, SkipRuntimes: skip,
		Kata: watcher.KataLayout{Wrapper: cd.WrapperSocket, GoMonitor: cd.QMPSocket, GoAgentURL: cd.AgentURL,
			RsDir: cd.RsDir, RsMonitor: cd.RsMonitor, RsAgentURL: cd.RsAgentURL, BundleDirs: cd.BundleDirs},
		NetnsDir: c.NetnsDir, Relist: relist,
	}
}

// Discovery enables zero-config sources.
type Discovery struct {
	// Proc finds QEMUs by walking /proc: off by default, since any pod can
	// fake an argv; when on, only the binaries, users and QMP directory
	// below are trusted, and the QMP socket's listener must be that QEMU.
	Proc         bool     `toml:"proc"`
	QEMUBinaries []string `toml:"qemu_binaries"`
	QMPDir       string   `toml:"qmp_dir"`
	QEMUUIDs     []uint32 `toml:"qemu_uids"` // non-root users QEMU may run as
}

// procConfig is the /proc discovery's trust settings.
func (d Discovery) procConfig() watcher.ProcConfig {
	return watcher.ProcConfig{Binaries: d.QEMUBinaries, QMPDir: d.QMPDir, UIDs: d.QEMUUIDs}
}

// StaticSandbox is a sandbox named in the config file.
type StaticSandbox struct {
	ID    string `toml:"id"`
	Netns string `toml:"netns"`
	QMP   string `toml:"qmp"`
	// Monitor is the protocol the qmp socket speaks: "qmp" (default) or
	// "hmp" (QEMU's human monitor, -monitor unix:…).
	Monitor string `toml:"monitor"`
	Model   string `toml:"model"`
	Queues  *int   `toml:"queues"`
	RxRate  *int64 `toml:"rx_rate"`
	TxRate  *int64 `toml:"tx_rate"`
	// AgentURL is the guest agent: vsock://CID:PORT, hvsock://PATH:PORT,
	// unix://PATH or kata-shim://PATH. Empty: no guest side.
	AgentURL string `toml:"agent_url"`
}

// Models. "none" (a tap passed through) is what a container link of kind
// tap gets in any model; as a model of its own it is refused at start
// rather than accepted and ignored.
var (
	knownModels       = []string{reconcile.ModelTCFilter, reconcile.ModelMacvtap, "none"}
	implementedModels = []string{reconcile.ModelTCFilter, reconcile.ModelMacvtap}
)

const defaultModel = reconcile.ModelTCFilter

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
			Model:         defaultModel,
			Queues:        1,
			Vhost:         string(datapath.VhostAuto),
			QMPTimeout:    5 * time.Second,
			UnplugTimeout: 10 * time.Second,
			Hotplug:       string(qmp.HotplugBridge),
		},
		Guest: GuestConfig{Agent: GuestAgentKata, Timeout: 5 * time.Second},
		Containerd: ContainerdConfig{
			Enabled:       true,
			Address:       "/run/containerd/containerd.sock",
			Namespaces:    []string{"k8s.io"},
			Runtimes:      slices.Clone(watcher.DefaultRuntimes),
			SkipRuntimes:  slices.Clone(watcher.DefaultSkipRuntimes),
			WrapperSocket: watcher.DefaultWrapper,
			QMPSocket:     watcher.DefaultGoMonitor,
			AgentURL:      watcher.DefaultGoAgentURL,
			RsDir:         watcher.DefaultRsDir,
			RsMonitor:     watcher.DefaultRsMonitor,
			RsAgentURL:    watcher.DefaultRsAgentURL,
			BundleDirs:    slices.Clone(watcher.DefaultBundleDirs),
		},
		Discovery: Discovery{Proc: false, QEMUBinaries: slices.Clone(watcher.DefaultQEMUBinaries), QMPDir: watcher.DefaultQMPDir},
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
		case !slices.Contains(implementedModels, m):
			bad(key, "interworking model %q is not implemented (use %s; a container link that is a tap is passed through in any model)",
				m, strings.Join(implementedModels, " or "))
		}
	}
	checkModel("defaults.model", d.Model)
	checkRate := func(key string, r int64) {
		switch {
		case r < 0:
			bad(key, "%d is negative (bits per second; 0: unlimited)", r)
		case r > 0 && r < 8:
			bad(key, "%d bit/s is below one byte per second (0: unlimited)", r)
		}
	}
	checkRate("defaults.rx_rate", d.RxRate)
	checkRate("defaults.tx_rate", d.TxRate)
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
	if _, err := qmp.ParseHotplug(d.Hotplug); err != nil || d.Hotplug == "" {
		bad("defaults.hotplug", "%q is not bridge, root-port or any", d.Hotplug)
	}
	switch r := d.ReservedSlots; {
	case len(r) == 0:
	case len(r) != 2 || r[0] < 1 || r[1] > 31 || r[0] > r[1]:
		bad("defaults.reserved_slots", "%v is not [from, to] with 1 <= from <= to <= 31", r)
	}
	if disc := c.Discovery; disc.Proc {
		if len(disc.QEMUBinaries) == 0 {
			bad("discovery.qemu_binaries", "empty: name the QEMU binaries to trust")
		}
		for _, b := range disc.QEMUBinaries {
			if !filepath.IsAbs(b) {
				bad("discovery.qemu_binaries", "%q is not an absolute path", b)
			}
		}
		if !filepath.IsAbs(disc.QMPDir) {
			bad("discovery.qmp_dir", "%q is not an absolute path", disc.QMPDir)
		}
	}
	switch c.Guest.Agent {
	case GuestAgentKata, GuestAgentNone:
	default:
		bad("guest.agent", "%q is not %s or %s", c.Guest.Agent, GuestAgentKata, GuestAgentNone)
	}
	if c.Guest.Timeout <= 0 || c.Guest.Timeout > time.Minute {
		bad("guest.timeout", "%v is outside (0, 1m]", c.Guest.Timeout)
	}
	for _, kv := range [][2]string{{"containerd.agent_url", c.Containerd.AgentURL}, {"containerd.rs_agent_url", c.Containerd.RsAgentURL}} {
		key, u := kv[0], kv[1]
		if !c.Containerd.Enabled || u == "" {
			continue
		}
		if !strings.Contains(u, "{id}") {
			bad(key, "%q must contain {id}", u)
		} else if _, err := agent.ParseURL(strings.ReplaceAll(u, "{id}", "sandbox")); err != nil {
			bad(key, "%v", err)
		}
	}
	if cd := c.Containerd; cd.Enabled {
		if cd.Address == "" {
			bad("containerd.address", "empty")
		}
		if len(cd.Namespaces) == 0 {
			bad("containerd.namespaces", "empty: name at least one containerd namespace")
		}
		if len(cd.Runtimes) == 0 {
			bad("containerd.runtimes", "empty: name at least one sandbox runtime (patterns: io.containerd.kata-*.v2)")
		}
		if err := watcher.ValidRuntimePatterns(cd.Runtimes); err != nil {
			bad("containerd.runtimes", "%v", err)
		}
		if err := watcher.ValidRuntimePatterns(cd.SkipRuntimes); err != nil {
			bad("containerd.skip_runtimes", "%v", err)
		}
		if !strings.Contains(cd.QMPSocket, "{id}") || !filepath.IsAbs(cd.QMPSocket) {
			bad("containerd.qmp_socket", "%q must be an absolute path template containing {id}", cd.QMPSocket)
		}
		if !strings.Contains(cd.WrapperSocket, "{id}") || !filepath.IsAbs(cd.WrapperSocket) {
			bad("containerd.wrapper_socket", "%q must be an absolute path template containing {id}", cd.WrapperSocket)
		}
		if !strings.Contains(cd.RsDir, "{id}") || !filepath.IsAbs(cd.RsDir) {
			bad("containerd.rs_dir", "%q must be an absolute path template containing {id}", cd.RsDir)
		}
		if cd.RsMonitor == "" || cd.RsMonitor != filepath.Base(cd.RsMonitor) || cd.RsMonitor == ".." {
			bad("containerd.rs_monitor", "%q must be a file name (it is relative to the bundle dir)", cd.RsMonitor)
		}
		if len(cd.BundleDirs) == 0 {
			bad("containerd.bundle_dirs", "empty: name where containerd makes bundle dirs")
		}
		for _, b := range cd.BundleDirs {
			if !strings.Contains(b, "{id}") || !filepath.IsAbs(b) {
				bad("containerd.bundle_dirs", "%q must be an absolute path template containing {id}", b)
			}
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
		switch s.Monitor {
		case "", reconcile.MonitorQMP, reconcile.MonitorHMP:
		default:
			bad(key+".monitor", "%q is not qmp or hmp", s.Monitor)
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
		if s.RxRate != nil {
			checkRate(key+".rx_rate", *s.RxRate)
		}
		if s.TxRate != nil {
			checkRate(key+".tx_rate", *s.TxRate)
		}
		if s.Queues != nil && (*s.Queues < 0 || *s.Queues > datapath.MaxQueues) {
			bad(key+".queues", "%d is outside 0..%d", *s.Queues, datapath.MaxQueues)
		}
		if s.AgentURL != "" {
			if _, err := agent.ParseURL(s.AgentURL); err != nil {
				bad(key+".agent_url", "%v", err)
			}
		}
	}
	return errors.Join(errs...)
}

// agentFor says where sandbox id's agent is, given its configured URL
// (a [[sandbox]] agent_url, or the containerd template with {id}
// replaced): the URL, or why the guest side is off.
func (c *Config) agentFor(id, configured string) (agent.URL, string) {
	if c.Guest.Agent == GuestAgentNone {
		return agent.URL{}, "[guest] agent = \"none\""
	}
	if configured == "" {
		return agent.URL{}, "no agent_url for this sandbox"
	}
	u, err := agent.ParseURL(strings.ReplaceAll(configured, "{id}", id))
	if err != nil { // validated at load; an id can still make a bad path
		return agent.URL{}, err.Error()
	}
	return u, ""
}

// rate converts a validated configured rate.
func rate(r *int64) *uint64 {
	if r == nil {
		return nil
	}
	u := uint64(max(*r, 0))
	return &u
}
