package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/tapsync/tapsync/agent"
	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
	"github.com/tapsync/tapsync/watcher"
)

// checkResult is one line of `tapsync check`.
type checkResult struct {
	level string // ok, warn, fail
	what  string
	todo  string
}

func newCheckCmd(configPath *string) *cobra.Command {
	var sandbox string
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Report what this node lacks to run tapsync, with what to do",
		Long: `Check this node: root, kernel support (veth, multiqueue taps, ingress qdisc,
u32, mirred), /dev/net/tun, /dev/vhost-net, the netns and state directories,
containerd (and what Kata must be configured with), the guest side, and the
QMP sockets and guest agents of configured sandboxes. With --sandbox ID it
also reports where that sandbox's VM can still take hot-plugged NICs (asked
through the running daemon, which holds the VM's QMP socket). Exits non-zero
when something required is missing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := LoadConfig(*configPath, !cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			results := runChecks(cmd.Context(), cfg)
			if sandbox != "" {
				results = append(results, checkCapacity(cfg, sandbox))
			}
			failed := 0
			for _, r := range results {
				fmt.Fprintf(cmd.OutOrStdout(), "%-4s  %s\n", r.level, r.what)
				if r.todo != "" {
					fmt.Fprintf(cmd.OutOrStdout(), "      → %s\n", r.todo)
				}
				if r.level == "FAIL" {
					failed++
				}
			}
			if failed > 0 {
				return fmt.Errorf("%d check(s) failed", failed)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&sandbox, "sandbox", "", "also report the free hot-plug capacity of this sandbox's VM")
	return cmd
}

// checkCapacity asks the daemon where sandbox id's VM can still take NICs.
func checkCapacity(cfg Config, id string) checkResult {
	c, err := newControlClient(controlSocketPath(cfg.StateDir)).capacity(id)
	switch {
	case err != nil:
		return checkResult{"FAIL", fmt.Sprintf("sandbox %s: hot-plug capacity: %v", id, err), "run `tapsync run` (it holds the VM's QMP socket) and name a sandbox `tapsync status` lists"}
	case c.Free == 0:
		return checkResult{"FAIL", fmt.Sprintf("sandbox %s: no free hot-plug place: %s", id, c.Summary),
			"start the VM with more bridge slots (Kata: more pci-bridge) or change [defaults] hotplug / reserved_slots"}
	}
	return checkResult{"ok", fmt.Sprintf("sandbox %s: hot-plug capacity %s", id, c.Summary), ""}
}

func runChecks(ctx context.Context, cfg Config) []checkResult {
	var out []checkResult
	add := func(level, what, todo string) { out = append(out, checkResult{level, what, todo}) }
	if err := cfg.Validate(); err != nil {
		add("FAIL", "config: "+err.Error(), "fix the config file")
	} else {
		add("ok", "config is valid", "")
	}
	if os.Geteuid() != 0 {
		add("FAIL", "not running as root", "run tapsync as root (it creates taps and tc filters in pod namespaces)")
		return out
	}
	add("ok", "running as root", "")
	if f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0); err != nil {
		add("FAIL", "/dev/net/tun: "+err.Error(), "load the tun module (modprobe tun) or create the device node")
	} else {
		f.Close()
		add("ok", "/dev/net/tun opens", "")
	}
	if err := datapath.ProbeKernel(); err != nil {
		add("FAIL", "kernel: "+err.Error(), "load the named module (modprobe veth sch_ingress cls_u32 act_mirred) or use a kernel with it")
	} else {
		add("ok", "kernel: veth, multiqueue vnet_hdr tap, ingress qdisc, u32, mirred redirect", "")
	}
	if _, err := os.Stat(datapath.VhostNetPath); err != nil {
		level := "warn"
		if cfg.Defaults.Vhost == string(datapath.VhostOn) {
			level = "FAIL"
		}
		add(level, datapath.VhostNetPath+" is missing: NICs use QEMU's slower userspace backend", "modprobe vhost_net")
	} else {
		add("ok", datapath.VhostNetPath+" exists", "")
	}
	if fi, err := os.Stat(cfg.NetnsDir); err != nil || !fi.IsDir() {
		add("warn", fmt.Sprintf("netns_dir %s does not exist yet", cfg.NetnsDir), "it appears with the first named netns; tapsync waits for it")
	} else {
		add("ok", "netns_dir "+cfg.NetnsDir+" exists", "")
	}
	// The same checks `tapsync run` makes: a real directory, root's, 0700.
	if _, err := state.Open(cfg.StateDir); err != nil {
		add("FAIL", err.Error(), "make state_dir a directory owned by root, not a symlink (it should be on tmpfs, e.g. /run/tapsync)")
	} else {
		add("ok", "state_dir "+cfg.StateDir+" is usable", "")
	}
	if cd := cfg.Containerd; cd.Enabled {
		c, err := net.DialTimeout("unix", cd.Address, 2*time.Second)
		if err != nil {
			add("FAIL", "containerd at "+cd.Address+": "+err.Error(), "start containerd, set [containerd] address, or set enabled = false")
		} else {
			c.Close()
			add("ok", "containerd reachable at "+cd.Address, "")
		}
		out = append(out, checkKataInstall(cfg, DefaultKataDirs, DefaultWrapperPath)...)
		out = append(out, checkContainerdSandboxes(ctx, cfg)...)
	}
	switch {
	case cfg.Guest.Agent == GuestAgentNone:
		add("warn", `[guest] agent = "none": hot-plugged NICs reach the guest unconfigured (no address, routes or MTU)`,
			`set [guest] agent = "kata" so the Kata agent configures them`)
	case cfg.Containerd.Enabled && (cfg.Containerd.AgentURL == "" || cfg.Containerd.RsAgentURL == ""):
		add("warn", "[containerd] agent_url or rs_agent_url is empty: the Go runtime's or runtime-rs's sandboxes get no guest configuration",
			fmt.Sprintf("set agent_url = %q and rs_agent_url = %q", watcher.DefaultGoAgentURL, watcher.DefaultRsAgentURL))
	}
	for _, s := range cfg.Sandboxes {
		if ok, _ := watcher.IsNetns(s.Netns); !ok {
			add("warn", fmt.Sprintf("sandbox %s: %s is not a network namespace (yet)", s.ID, s.Netns), "tapsync waits for it to appear")
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		dial := qmp.Dial
		if s.Monitor == reconcile.MonitorHMP {
			dial = qmp.DialHMP
		}
		c, err := dial(cctx, s.QMP, qmp.Options{Timeout: 2 * time.Second})
		cancel()
		switch {
		case errors.Is(err, qmp.ErrNoGreeting):
			holder, todo := "another client", "make sure no other tool holds this monitor; Kata's own monitor is taken by Kata (use its extra monitor socket)"
			if _, err := newControlClient(controlSocketPath(cfg.StateDir)).status(); err == nil {
				holder, todo = "probably the running tapsync daemon", ""
			}
			add("warn", fmt.Sprintf("sandbox %s: QMP socket %s is busy, held by %s", s.ID, s.QMP, holder), todo)
		case err != nil:
			add("FAIL", fmt.Sprintf("sandbox %s: QMP socket %s: %v", s.ID, s.QMP, err), "start the VM with -qmp unix:"+s.QMP+",server=on,wait=off")
		default:
			c.Close()
			add("ok", fmt.Sprintf("sandbox %s: QMP socket %s answers", s.ID, s.QMP), "")
		}
		out = append(out, checkAgent(ctx, cfg, s))
	}
	return out
}

// kataMonitorTodo is what a Kata runtime of flavour needs to serve a
// monitor tapsync can reach.
func kataMonitorTodo(flavour string) string {
	kind := "qmp"
	if flavour == watcher.FlavourRs {
		kind = "hmp"
	}
	return fmt.Sprintf(`run tapsync install-kata: Kata then starts QEMU through tapsync-qemu, which gives it a monitor of tapsync's own (no debug mode); `+
		`or, for debugging only, in a drop-in file in the config.d/ directory beside this handler's Kata configuration.toml: `+
		`[hypervisor.qemu] enable_debug = true and extra_monitor_socket = %q (new sandboxes get either; running ones keep their VM as it was started)`, kind)
}

// checkContainerdSandboxes reports, for each running Kata sandbox of
// containerd, the runtime flavour, whether its monitor exists and
// answers, and whether its agent does; and the sandboxes left alone.
func checkContainerdSandboxes(ctx context.Context, cfg Config) []checkResult {
	cd := cfg.Containerd
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	sbs, err := watcher.ListContainerd(lctx, cfg.watcherConfig(nil))
	cancel()
	if err != nil {
		return []checkResult{{"FAIL", "list containerd's sandboxes: " + err.Error(), "start containerd, set [containerd] address, or set enabled = false"}}
	}
	if len(sbs) == 0 {
		return []checkResult{{"info", fmt.Sprintf("no running sandbox of runtimes %v", cd.Runtimes),
			"Kata sandboxes need a monitor tapsync can reach: Go runtime: " + kataMonitorTodo(watcher.FlavourGo) + "; runtime-rs: " + kataMonitorTodo(watcher.FlavourRs)}}
	}
	daemonUp := false
	if _, err := newControlClient(controlSocketPath(cfg.StateDir)).status(); err == nil {
		daemonUp = true
	}
	var out []checkResult
	for _, sb := range sbs {
		if sb.Skip != "" {
			out = append(out, checkResult{"info", fmt.Sprintf("sandbox %s (%s): left alone: %s", sb.ID, sb.Runtime, sb.Skip), ""})
			continue
		}
		out = append(out, checkResult{"info", fmt.Sprintf("sandbox %s: %s (%s), netns %s", sb.ID, sb.Flavour, sb.Runtime, sb.Netns), ""})
		if sb.MonitorNote != "" {
			out = append(out, checkResult{"info", fmt.Sprintf("sandbox %s: %s", sb.ID, sb.MonitorNote), ""})
		}
		out = append(out, monitorResult(sb, probeMonitor(ctx, sb), daemonUp))
		out = append(out, checkSandboxAgent(ctx, cfg, sb.ID, sb.AgentURL, "[containerd] agent_url / rs_agent_url"))
	}
	return out
}

// probeMonitor dials a sandbox's monitor once, as the daemon would
// (checking who serves it), and hangs up.
func probeMonitor(ctx context.Context, sb watcher.Sandbox) error {
	if _, err := os.Stat(sb.QMP); err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	dial := qmp.Dial
	if sb.Protocol == watcher.ProtoHMP {
		dial = qmp.DialHMP
	}
	c, err := dial(cctx, sb.QMP, qmp.Options{Timeout: 2 * time.Second,
		CheckConn: func(c *net.UnixConn) error { return watcher.CheckMonitorPeer(c, sb.Netns, sb.Bundle) }})
	if err == nil {
		c.Close()
	}
	return err
}

// monitorResult says what a probe of sandbox sb's monitor found, and what
// to do about it. daemonUp: a tapsync daemon answers on its control
// socket (and so probably holds the monitor).
func monitorResult(sb watcher.Sandbox, probe error, daemonUp bool) checkResult {
	id, path, proto := sb.ID, sb.QMP, strings.ToUpper(sb.Protocol)
	if proto == "" {
		proto = "QMP"
	}
	todo := kataMonitorTodo(sb.Flavour)
	switch {
	case probe == nil:
		return checkResult{"ok", fmt.Sprintf("sandbox %s: %s monitor %s answers", id, proto, path), ""}
	case errors.Is(probe, fs.ErrNotExist):
		return checkResult{"FAIL", fmt.Sprintf("sandbox %s: no %s monitor at %s: its VM serves none", id, proto, path), todo}
	case errors.Is(probe, qmp.ErrNoGreeting) && daemonUp:
		return checkResult{"ok", fmt.Sprintf("sandbox %s: %s monitor %s is held, probably by the running tapsync daemon", id, proto, path), ""}
	case errors.Is(probe, qmp.ErrNoGreeting):
		return checkResult{"warn", fmt.Sprintf("sandbox %s: %s monitor %s is busy, held by another client", id, proto, path),
			"make sure no other tool holds this monitor; Kata's own qmp.sock is taken by Kata"}
	case errors.Is(probe, syscall.ECONNREFUSED):
		return checkResult{"FAIL", fmt.Sprintf("sandbox %s: %s monitor %s refuses connections: nobody serves it (QEMU exited?)", id, proto, path), todo}
	}
	return checkResult{"FAIL", fmt.Sprintf("sandbox %s: %s monitor %s: %v", id, proto, path, probe), "check that the socket is this sandbox's QEMU's monitor; " + todo}
}

// checkAgent says whether a configured sandbox's guest agent answers a
// health check.
func checkAgent(ctx context.Context, cfg Config, s StaticSandbox) checkResult {
	return checkSandboxAgent(ctx, cfg, s.ID, s.AgentURL, "agent_url on the sandbox")
}

// checkSandboxAgent says whether sandbox id's guest agent, at its
// configured URL (a template with {id}), answers a health check; key
// names the setting.
func checkSandboxAgent(ctx context.Context, cfg Config, id, configured, key string) checkResult {
	u, off := cfg.agentFor(id, configured)
	if off != "" {
		return checkResult{"warn", fmt.Sprintf("sandbox %s: guest side off: %s", id, off), "set " + key + " to have its guest interfaces configured"}
	}
	cctx, cancel := context.WithTimeout(ctx, cfg.Guest.Timeout)
	defer cancel()
	c, err := agent.Dial(cctx, u, cfg.Guest.Timeout)
	if err == nil {
		err = c.Check(cctx)
		u = c.URL()
		c.Close()
	}
	if err != nil {
		return checkResult{"FAIL", fmt.Sprintf("sandbox %s: guest agent at %s: %v", id, u, err), "start the VM's agent, or fix " + key}
	}
	return checkResult{"ok", fmt.Sprintf("sandbox %s: guest agent at %s answers", id, u), ""}
}
