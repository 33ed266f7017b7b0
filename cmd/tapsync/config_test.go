package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/watcher"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// The shipped example documents every key with its default value.
func TestExampleConfigShowsTheDefaults(t *testing.T) {
	cfg, err := LoadConfig("../../deploy/config.toml", false)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if def := DefaultConfig(); !reflect.DeepEqual(cfg, def) {
		t.Errorf("deploy/config.toml differs from the defaults:\n got %+v\nwant %+v", cfg, def)
	}
}

func TestMissingConfigMeansDefaults(t *testing.T) {
	cfg, err := LoadConfig(filepath.Join(t.TempDir(), "none.toml"), true)
	if err != nil || !reflect.DeepEqual(cfg, DefaultConfig()) {
		t.Fatalf("LoadConfig(missing) = %+v, %v", cfg, err)
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "none.toml"), false); err == nil {
		t.Error("an explicitly named missing config was accepted")
	}
}

func TestConfigRefused(t *testing.T) {
	for _, tc := range []struct{ name, body, want string }{
		{"unknown key", "netns_dirr = \"/x\"\n", "unknown key netns_dirr"},
		{"unknown nested key", "[defaults]\nqueue = 2\n", "unknown key defaults.queue"},
		{"bad duration", "resync_interval = \"soon\"\n", "resync_interval"},
		{"bad log level", "log_level = \"loud\"\n", "log_level"},
		{"bad metrics address", "metrics_address = \"9464\"\n", "metrics_address"},
		{"unimplemented model", "[defaults]\nmodel = \"none\"\n", "not implemented"},
		{"rate below a byte", "[defaults]\nrx_rate = 7\n", "defaults.rx_rate"},
		{"negative rate", "[defaults]\ntx_rate = -1\n", "tx_rate"},
		{"sandbox rate below a byte", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\ntx_rate = 1\n", `sandbox "a".tx_rate`},
		{"unknown model", "[defaults]\nmodel = \"bridge\"\n", "defaults.model"},
		{"bad vhost", "[defaults]\nvhost = \"maybe\"\n", "defaults.vhost"},
		{"qmp template without id", "[containerd]\nqmp_socket = \"/run/vc/qmp.sock\"\n", "containerd.qmp_socket"},
		{"netns outside netns_dir", "[[sandbox]]\nid = \"a\"\nnetns = \"/tmp/a\"\nqmp = \"/run/a.sock\"\n", `sandbox "a".netns`},
		{"netns escaping netns_dir", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/../a\"\nqmp = \"/run/a.sock\"\n", `sandbox "a".netns`},
		{"duplicate id", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\n" +
			"[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/b\"\nqmp = \"/run/b.sock\"\n", "duplicate sandbox id"},
		{"shared netns", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\n" +
			"[[sandbox]]\nid = \"b\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/b.sock\"\n", `already the netns of sandbox "a"`},
		{"shared qmp socket", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\n" +
			"[[sandbox]]\nid = \"b\"\nnetns = \"/var/run/netns/b\"\nqmp = \"/run/a.sock\"\n", `already the QMP socket of sandbox "a"`},
		{"unplug timeout too long", "[defaults]\nunplug_timeout = \"1h\"\n", "defaults.unplug_timeout"},
		{"bad id", "[[sandbox]]\nid = \"../x\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\n", "sandbox \"../x\".id"},
		{"relative qmp", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"a.sock\"\n", `sandbox "a".qmp`},
		{"garbage", "this is not toml", "config"},
		{"unknown guest agent", "[guest]\nagent = \"ssh\"\n", "guest.agent"},
		{"guest timeout", "[guest]\ntimeout = \"0s\"\n", "guest.timeout"},
		{"agent url scheme", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\nagent_url = \"http://x\"\n", `sandbox "a".agent_url`},
		{"agent url without port", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\nagent_url = \"vsock://3\"\n", `sandbox "a".agent_url`},
		{"containerd agent template without id", "[containerd]\nagent_url = \"kata-shim:///run/vc/sbs/x/shim-monitor.sock\"\n", "containerd.agent_url"},
		{"containerd agent template scheme", "[containerd]\nagent_url = \"tcp://{id}:1024\"\n", "containerd.agent_url"},
		{"runtime-rs agent template without id", "[containerd]\nrs_agent_url = \"kata-shim:///run/kata/x/shim-monitor.sock\"\n", "containerd.rs_agent_url"},
		{"malformed runtime pattern", "[containerd]\nruntimes = [\"io.containerd.kata-[.v2\"]\n", "containerd.runtimes"},
		{"malformed skip pattern", "[containerd]\nskip_runtimes = [\"[\"]\n", "containerd.skip_runtimes"},
		{"runtime-rs monitor with a dir", "[containerd]\nrs_monitor = \"../debug-monitor.sock\"\n", "containerd.rs_monitor"},
		{"runtime-rs dir without id", "[containerd]\nrs_dir = \"/run/kata\"\n", "containerd.rs_dir"},
		{"bundle dir without id", "[containerd]\nbundle_dirs = [\"/run/containerd/{namespace}\"]\n", "containerd.bundle_dirs"},
		{"no bundle dirs", "[containerd]\nbundle_dirs = []\n", "containerd.bundle_dirs"},
		{"unknown monitor protocol", "[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\nmonitor = \"telnet\"\n", `sandbox "a".monitor`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, tc.body)
			cfg, err := LoadConfig(p, false)
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestConfigAccepted(t *testing.T) {
	p := writeConfig(t, `
netns_dir = "/var/run/netns"
[defaults]
queues = 0
[containerd]
enabled = false
[[sandbox]]
id = "vm1"
netns = "/var/run/netns/vm1"
qmp = "/run/vm1/qmp.sock"
queues = 2
agent_url = "vsock://1234:1024"
[[sandbox]]
id = "vm2"
netns = "/var/run/netns/vm2"
qmp = "/run/vm2/qmp.sock"
agent_url = "hvsock:///run/vc/vm2/kata.hvsock:1024"
`)
	cfg, err := LoadConfig(p, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(cfg.Sandboxes) != 2 || *cfg.Sandboxes[0].Queues != 2 || cfg.Defaults.Queues != 0 || cfg.Containerd.Enabled {
		t.Errorf("config = %+v", cfg)
	}
	if u, off := cfg.agentFor("vm1", cfg.Sandboxes[0].AgentURL); u.String() != "vsock://1234:1024" || off != "" {
		t.Errorf("agent of vm1 = %v (off: %q)", u, off)
	}
	if _, off := cfg.agentFor("vm3", ""); !strings.Contains(off, "no agent_url") {
		t.Errorf("a sandbox without agent_url: off = %q", off)
	}
	cfg.Guest.Agent = GuestAgentNone
	if _, off := cfg.agentFor("vm1", cfg.Sandboxes[0].AgentURL); !strings.Contains(off, `agent = "none"`) {
		t.Errorf("[guest] agent = none: off = %q", off)
	}
	def := DefaultConfig()
	if u, _ := def.agentFor("abc", def.Containerd.AgentURL); u.String() != "kata-shim:///run/vc/sbs/abc/shim-monitor.sock" {
		t.Errorf("containerd sandbox abc: agent %v", u)
	}
}

// TestModelAndRates: the macvtap model and rate limits reach the sandbox,
// [[sandbox]] over [defaults], a pod's annotations over both.
func TestModelAndRates(t *testing.T) {
	p := writeConfig(t, "[defaults]\nmodel = \"macvtap\"\nrx_rate = 8000000\ntx_rate = 4000000\n"+
		"[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\nmodel = \"tcfilter\"\ntx_rate = 0\n")
	cfg, err := LoadConfig(p, false)
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		t.Fatal(err)
	}
	d := testDaemon(t)
	d.cfg.Store(&cfg)
	s := cfg.Sandboxes[0]
	sb := d.sandboxFor(s.ID, s.Netns, s.QMP, nil, "", overrides{Model: s.Model, RxRate: rate(s.RxRate), TxRate: rate(s.TxRate)})
	if sb.Model != "tcfilter" || sb.RxRate != 8000000 || sb.TxRate != 0 {
		t.Errorf("config sandbox: model %q rx %d tx %d, want tcfilter, 8000000, 0", sb.Model, sb.RxRate, sb.TxRate)
	}
	rx := uint64(1000000)
	sb = d.sandboxFor("pod", "/var/run/netns/p", "/run/p.sock", nil, "", d.notePodRates(watcher.Sandbox{ID: "pod", RxRate: &rx}))
	if sb.Model != "macvtap" || sb.RxRate != 1000000 || sb.TxRate != 4000000 {
		t.Errorf("pod: model %q rx %d tx %d, want macvtap, 1000000 (annotation), 4000000", sb.Model, sb.RxRate, sb.TxRate)
	}
}
