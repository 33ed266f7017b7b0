// Command tapsync keeps the NICs of VM-isolated pods wired: it watches
// each sandbox network namespace and hot-plugs, replaces and removes the
// matching NICs of the sandbox's QEMU guest. `tapsync run` is the node
// daemon; the other commands inspect or nudge a running daemon.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "tapsync:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	var configPath, stateDir string
	root := &cobra.Command{
		Use:   "tapsync",
		Short: "Keep VM-isolated pods' NICs wired into their QEMU guests",
		Long: `tapsync watches the network namespaces of VM-isolated pods (Kata-style
sandboxes) and keeps each QEMU guest's NICs in step with the NICs that the
runtime and CNI put into the namespace: a tap per container link, tc
redirects both ways, and a virtio-net device hot-plugged over QMP.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&configPath, "config", DefaultConfigPath, "config file (TOML); missing means defaults")
	root.PersistentFlags().StringVar(&stateDir, "state-dir", "", "state directory holding records and the control socket (default: from the config, /run/tapsync)")

	// client opens the control socket named by the flags or the config.
	client := func() (*controlClient, error) {
		dir := stateDir
		if dir == "" {
			cfg, err := LoadConfig(configPath, true)
			if err != nil {
				return nil, err
			}
			dir = cfg.StateDir
		}
		return newControlClient(controlSocketPath(dir)), nil
	}
	root.AddCommand(newRunCmd(&configPath, &stateDir), newStatusCmd(client), newPlanCmd(client), newResyncCmd(client),
		newCheckCmd(&configPath), newInstallKataCmd(&configPath), newUninstallKataCmd(), &cobra.Command{
			Use:   "version",
			Short: "Print the version",
			Args:  cobra.NoArgs,
			Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), "tapsync", version) },
		})
	return root
}

func newRunCmd(configPath, stateDir *string) *cobra.Command {
	var f struct {
		netnsDir, logLevel, logFormat, metrics string
		resync                                 time.Duration
		containerd                             bool
		containerdAddr                         string
		workers                                int
	}
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the node daemon",
		Long: `Run the node daemon. It reads the config file (flags override it), then
follows the netns directory, netlink link changes in every sandbox netns,
containerd's sandbox containers, QEMU processes found in /proc, QMP events,
SIGHUP (reload the config file, then resync everything) and a periodic
resync. SIGTERM or SIGINT stop it without touching any endpoint: VMs keep
their network while it is down. One daemon runs per state directory.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, statErr := os.Stat(*configPath)
			explicit := cmd.Flags().Changed("config")
			// load reads the config file with the flags over it; SIGHUP
			// calls it again.
			load := func() (Config, error) {
				cfg, err := LoadConfig(*configPath, !explicit)
				if err != nil {
					return Config{}, err
				}
				fl := cmd.Flags()
				set := func(name string, apply func()) {
					if fl.Changed(name) {
						apply()
					}
				}
				set("netns-dir", func() { cfg.NetnsDir = f.netnsDir })
				set("log-level", func() { cfg.LogLevel = f.logLevel })
				set("log-format", func() { cfg.LogFormat = f.logFormat })
				set("metrics-address", func() { cfg.MetricsAddress = f.metrics })
				set("resync-interval", func() { cfg.ResyncInterval = f.resync })
				set("containerd", func() { cfg.Containerd.Enabled = f.containerd })
				set("containerd-address", func() { cfg.Containerd.Address = f.containerdAddr })
				set("workers", func() { cfg.Workers = f.workers })
				if *stateDir != "" {
					cfg.StateDir = *stateDir
				}
				if err := cfg.Validate(); err != nil {
					return Config{}, fmt.Errorf("config %s refused:\n%w", *configPath, err)
				}
				return cfg, nil
			}
			cfg, err := load()
			if err != nil {
				return fmt.Errorf("%w\nnothing started", err)
			}
			log := newLogger(cfg, cmd.ErrOrStderr())
			if statErr != nil {
				log.Info().Str("config", *configPath).Msg("no config file; running with defaults and flags")
			}
			d, err := newDaemon(cfg)
			if err != nil {
				return err
			}
			d.reload = load
			return d.run(log.WithContext(context.Background()))
		},
	}
	fl := cmd.Flags()
	def := DefaultConfig()
	fl.StringVar(&f.netnsDir, "netns-dir", def.NetnsDir, "directory of named network namespaces to watch")
	fl.StringVar(&f.logLevel, "log-level", def.LogLevel, "trace, debug, info, warn or error")
	fl.StringVar(&f.logFormat, "log-format", def.LogFormat, "json or console")
	fl.StringVar(&f.metrics, "metrics-address", def.MetricsAddress, "host:port for Prometheus /metrics; empty disables")
	fl.DurationVar(&f.resync, "resync-interval", def.ResyncInterval, "full resync period (jittered ±10%)")
	fl.BoolVar(&f.containerd, "containerd", def.Containerd.Enabled, "follow containerd's sandbox containers")
	fl.StringVar(&f.containerdAddr, "containerd-address", def.Containerd.Address, "containerd socket")
	fl.IntVar(&f.workers, "workers", def.Workers, "sandboxes reconciled in parallel")
	return cmd
}

// logTimeFormat stamps log lines to the millisecond: a pass takes a
// millisecond or so, and its steps are told apart only at that grain.
const logTimeFormat = "2006-01-02T15:04:05.000Z07:00"

func newLogger(cfg Config, out interface{ Write([]byte) (int, error) }) zerolog.Logger {
	zerolog.TimeFieldFormat = logTimeFormat
	level, _ := zerolog.ParseLevel(cfg.LogLevel)
	w := out
	if cfg.LogFormat == "console" {
		f, isFile := out.(*os.File)
		color := isFile && isatty.IsTerminal(f.Fd())
		w = zerolog.ConsoleWriter{Out: out, TimeFormat: logTimeFormat, NoColor: !color}
	}
	return zerolog.New(w).Level(level).With().Timestamp().Logger()
}

func newStatusCmd(client func() (*controlClient, error)) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show sandboxes, their endpoints, last reconcile and pending removals",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			st, err := c.status()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(out, st)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printStatus(out interface{ Write([]byte) (int, error) }, st []statusJSON) {
	if len(st) == 0 {
		fmt.Fprintln(out, "no sandboxes")
		return
	}
	for _, s := range st {
		last := "never"
		if s.LastReconcile != nil {
			last = s.LastReconcile.Format(time.RFC3339)
		}
		result := "ok"
		if s.LastError != "" {
			result = "error: " + s.LastError
		}
		if s.LeftAlone != "" {
			fmt.Fprintf(out, "sandbox %s (from %s, %s)\n  netns %s\n  left alone: %s\n", s.ID, s.Source, s.Runtime, s.Netns, s.LeftAlone)
			continue
		}
		runtime := ""
		if s.Flavour != "" {
			runtime = fmt.Sprintf(", %s, %s", s.Flavour, s.Runtime)
		}
		fmt.Fprintf(out, "sandbox %s (from %s%s)\n  netns %s\n  %-5s %s\n  last reconcile %s: %s\n", s.ID, s.Source, runtime, s.Netns, s.Monitor, s.QMP, last, result)
		if s.MonitorNote != "" {
			fmt.Fprintf(out, "  monitor note: %s\n", s.MonitorNote)
		}
		if s.Retries > 0 {
			fmt.Fprintf(out, "  retries %d\n", s.Retries)
		}
		switch {
		case s.Guest != "":
			fmt.Fprintf(out, "  guest %s\n", s.Guest)
		case s.Agent != "":
			fmt.Fprintf(out, "  guest agent %s\n", s.Agent)
		}
		tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  INDEX\tTAP\tLINK\tMAC\tQUEUES\tSTATE\tGUEST")
		for _, e := range s.Endpoints {
			state, guest := "wired", e.Guest
			if e.Removing {
				state = "removal pending"
			}
			if guest == "" {
				guest = "-"
			}
			fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%d\t%s\t%s\n", e.Index, e.Tap, e.Link, e.MAC, e.Queues, state, guest)
		}
		tw.Flush()
		for _, k := range s.Skipped {
			what := "not wired"
			switch {
			case k.Broken:
				what = "adopted, BROKEN"
			case k.Adopted:
				what = "adopted"
			}
			fmt.Fprintf(out, "  %s: %s (%s): %s\n", what, k.Link, k.Kind, k.Reason)
		}
		if len(s.Held) > 0 {
			fmt.Fprintf(out, "  plugs held until the NICs they replace leave the VM: endpoints %v\n", s.Held)
		}
		for _, n := range s.Notes {
			fmt.Fprintf(out, "  note: %s\n", n)
		}
	}
}

func newPlanCmd(client func() (*controlClient, error)) *cobra.Command {
	return &cobra.Command{
		Use:   "plan [SANDBOX]",
		Short: "Show what a reconcile would do now, without doing it",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			path := "/v1/plan"
			if len(args) == 1 {
				path += "?sandbox=" + args[0]
			}
			var plans []planJSON
			if err := c.do("GET", path, &plans); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			for _, p := range plans {
				switch {
				case p.Error != "":
					fmt.Fprintf(out, "sandbox %s: cannot plan: %s\n", p.Sandbox, p.Error)
				case len(p.Actions) == 0:
					fmt.Fprintf(out, "sandbox %s: converged, nothing to do\n", p.Sandbox)
				default:
					fmt.Fprintf(out, "sandbox %s:\n", p.Sandbox)
					for i, a := range p.Actions {
						fmt.Fprintf(out, "  %2d. %s\n", i+1, a)
					}
				}
				for _, k := range p.Skipped {
					fmt.Fprintf(out, "      skip %s: %s\n", k.Link, k.Reason)
				}
			}
			return nil
		},
	}
}

func newResyncCmd(client func() (*controlClient, error)) *cobra.Command {
	return &cobra.Command{
		Use:   "resync [SANDBOX]",
		Short: "Reconcile one sandbox, or all, now (like SIGHUP)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			path := "/v1/resync"
			if len(args) == 1 {
				path += "?sandbox=" + args[0]
			}
			var r resyncJSON
			if err := c.do("POST", path, &r); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "resync requested for %s\n", strings.Join(r.Triggered, ", "))
			return nil
		},
	}
}
