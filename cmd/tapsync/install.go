package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/google/renameio/v2"
	"github.com/spf13/cobra"
	"github.com/tapsync/tapsync/watcher"
)

// Installing the QEMU wrapper on a Kata node: a drop-in in the config.d/
// directory beside each Kata QEMU configuration points
// [hypervisor.qemu] path at tapsync-qemu, which execs the real QEMU with
// one more QMP monitor, tapsync's own: no debug mode needed.

// DefaultKataDirs are where Kata's configurations live: kata-deploy's
// tree (runtimes/<shim>/, runtime-rs/runtimes/<shim>/,
// custom-runtimes/<handler>/), then a packaged install's.
var DefaultKataDirs = []string{"/opt/kata/share/defaults/kata-containers", "/etc/kata-containers", "/usr/share/defaults/kata-containers"}

// DefaultWrapperPath is where install-kata puts tapsync-qemu.
const DefaultWrapperPath = "/opt/tapsync/bin/tapsync-qemu"

// dropInName is install-kata's drop-in; dropInMark its first line, by
// which uninstall-kata knows the file is ours.
const (
	dropInName = "60-tapsync.toml"
	dropInMark = "# Written by `tapsync install-kata`; `tapsync uninstall-kata` removes it."
)

// kataConfig is one Kata configuration file found on the node.
type kataConfig struct {
	path string // .../configuration-<shim>.toml
	shim string // qemu, qemu-runtime-rs, …
	// qemu is its effective [hypervisor.qemu] path, drop-ins applied
	// (ours aside); "" when it has no [hypervisor.qemu] section.
	qemu string
	// inForce: with every drop-in applied, ours included, path is the
	// wrapper.
	inForce bool
}

func (k kataConfig) dropIn() string {
	return filepath.Join(filepath.Dir(k.path), "config.d", dropInName)
}

// findKataConfigs lists the Kata configurations under dirs, each read
// with its drop-ins. wrapper is the wrapper's path, to tell whether our
// drop-in is in force.
func findKataConfigs(dirs []string, wrapper string) ([]kataConfig, error) {
	var found []kataConfig
	seen := map[string]bool{}
	for _, dir := range dirs {
		var paths []string
		for _, pat := range []string{"configuration*.toml", "runtimes/*/configuration-*.toml", "runtime-rs/runtimes/*/configuration-*.toml", "custom-runtimes/*/configuration-*.toml"} {
			m, _ := filepath.Glob(filepath.Join(dir, pat)) // only ErrBadPattern, and the patterns are ours
			paths = append(paths, m...)
		}
		for _, p := range paths {
			real, err := filepath.EvalSymlinks(p)
			if err != nil || seen[real] {
				continue // a dangling link, or one to a configuration listed already
			}
			seen[real] = true
			k, err := readKataConfig(p, wrapper)
			if err != nil {
				return nil, err
			}
			found = append(found, k)
		}
	}
	return found, nil
}

// readKataConfig reads configuration path and its drop-ins.
func readKataConfig(path, wrapper string) (kataConfig, error) {
	shim := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(path), "configuration"), ".toml")
	shim = strings.TrimPrefix(shim, "-")
	if shim == "" {
		shim = filepath.Base(filepath.Dir(path))
	}
	k := kataConfig{path: path, shim: shim}
	files := []string{path}
	dropIns, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "config.d", "*.toml"))
	sort.Strings(dropIns) // Kata applies them in lexical order
	files = append(files, dropIns...)
	section, withOurs := false, ""
	for _, f := range files {
		var doc struct {
			Hypervisor map[string]map[string]any `toml:"hypervisor"`
		}
		if _, err := toml.DecodeFile(f, &doc); err != nil {
			return kataConfig{}, fmt.Errorf("Kata configuration %s: %w", f, err)
		}
		q, ok := doc.Hypervisor["qemu"]
		if !ok {
			continue
		}
		section = true
		p, ok := q["path"].(string)
		if !ok {
			continue
		}
		withOurs = p
		if filepath.Base(f) != dropInName {
			k.qemu = p
		}
	}
	if !section {
		k.qemu = ""
	}
	k.inForce = section && withOurs == wrapper
	return k, nil
}

// installPlan is what install-kata would write, and why it leaves the
// rest alone.
type installPlan struct {
	write map[string][]byte // path → content
	mode  map[string]fs.FileMode
	notes []string // configurations left alone, and why
}

// planInstall decides install-kata's files: the wrapper (copied from
// from), its conf (the real QEMU, the socket dir) and a drop-in per QEMU
// configuration that is not a confidential handler's.
//
// root is where the node's file system is (a DaemonSet's init container
// sees the host's under a mount): files are written under it, while what
// they say (the wrapper's path, the real QEMU, the socket dir) is as Kata
// on the host sees it.
func planInstall(cfg Config, configs []kataConfig, wrapper, from, root string) (installPlan, error) {
	p := installPlan{write: map[string][]byte{}, mode: map[string]fs.FileMode{}}
	var qemus []string
	var targets []kataConfig
	for _, k := range configs {
		runtime := "io.containerd.kata-" + k.shim + ".v2"
		switch {
		case k.qemu == "":
			p.notes = append(p.notes, fmt.Sprintf("left alone %s: not a QEMU configuration (no [hypervisor.qemu])", k.path))
		case watcher.MatchRuntime(cfg.Containerd.SkipRuntimes, runtime):
			p.notes = append(p.notes, fmt.Sprintf("left alone %s: %s is a confidential handler (containerd skip_runtimes)", k.path, runtime))
		case k.qemu == wrapper:
			p.notes = append(p.notes, fmt.Sprintf("left alone %s: a drop-in other than ours already points its QEMU at %s", k.path, wrapper))
		default:
			targets = append(targets, k)
			if !slices.Contains(qemus, k.qemu) {
				qemus = append(qemus, k.qemu)
			}
		}
	}
	if len(targets) == 0 {
		return p, errors.New("no Kata QEMU configuration to install into (looked for configuration*.toml and runtimes/*/, runtime-rs/runtimes/*/, custom-runtimes/*/ under the Kata dirs)")
	}
	if len(qemus) > 1 {
		return p, fmt.Errorf("the Kata configurations name different QEMUs (%s); tapsync-qemu execs one: install into the configurations of one of them with --kata-dir", strings.Join(qemus, ", "))
	}
	sockDir, err := wrapperSocketDir(cfg.Containerd.WrapperSocket)
	if err != nil {
		return p, err
	}
	bin, err := os.ReadFile(from)
	if err != nil {
		return p, fmt.Errorf("read the wrapper to install: %w (build it with make build: bin/tapsync-qemu, or name it with --from)", err)
	}
	onHost := func(path string) string { return filepath.Join(root, path) }
	p.write[onHost(wrapper)], p.mode[onHost(wrapper)] = bin, 0o755
	p.write[onHost(wrapper)+".conf"] = fmt.Appendf(nil, "%s\n# The QEMU Kata's configurations named, and where tapsync-qemu binds each VM's monitor.\nqemu = %s\ndir = %s\n", dropInMark, qemus[0], sockDir)
	p.mode[onHost(wrapper)+".conf"] = 0o644
	for _, k := range targets {
		p.write[k.dropIn()] = fmt.Appendf(nil, "%s\n# Kata starts QEMU through tapsync-qemu, which execs %s with one more QMP\n# monitor, tapsync's own (%s): no debug mode needed.\n[hypervisor.qemu]\npath = %q\n",
			dropInMark, qemus[0], cfg.Containerd.WrapperSocket, wrapper)
		p.mode[k.dropIn()] = 0o644
	}
	return p, nil
}

// wrapperSocketDir is the directory of the wrapper socket template, which
// must be <dir>/{id}.sock: the wrapper names sockets so.
func wrapperSocketDir(tmpl string) (string, error) {
	if filepath.Base(tmpl) != "{id}.sock" || strings.Contains(filepath.Dir(tmpl), "{") {
		return "", fmt.Errorf("containerd.wrapper_socket %q: tapsync-qemu binds <dir>/{id}.sock; the template must have that shape", tmpl)
	}
	return filepath.Dir(tmpl), nil
}

// writeIfChanged writes content to path atomically unless it is there
// already, and says which.
func writeIfChanged(path string, content []byte, mode fs.FileMode) (changed bool, err error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, content) {
		if fi, err := os.Stat(path); err == nil && fi.Mode().Perm() == mode {
			return false, nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	return true, renameio.WriteFile(path, content, mode)
}

func newInstallKataCmd(configPath *string) *cobra.Command {
	var dirs []string
	var wrapper, from, root string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "install-kata",
		Short: "Make Kata start QEMU through tapsync-qemu: a monitor of tapsync's own, no debug mode",
		Long: `Install tapsync-qemu and point Kata's QEMU at it: the wrapper is copied to
--wrapper with its conf (the real QEMU Kata's configurations name, and the
directory of [containerd] wrapper_socket), and a drop-in config.d/` + dropInName + `
is written beside each Kata QEMU configuration (kata-deploy's runtimes/<shim>/,
runtime-rs/runtimes/<shim>/ and custom-runtimes/<handler>/; or a packaged
configuration.toml) that is not a confidential handler's. New VMs start
through the wrapper; running ones keep their QEMU. Idempotent: files that
are already right are left as they are. Every change is printed; a
configuration it does not recognise (no [hypervisor.qemu]) is left alone.
tapsync uninstall-kata undoes it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := LoadConfig(*configPath, !cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			if from == "" {
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				from = filepath.Join(filepath.Dir(exe), "tapsync-qemu")
			}
			configs, err := findKataConfigs(underRoot(root, dirs), wrapper)
			if err != nil {
				return err
			}
			p, err := planInstall(cfg, configs, wrapper, from, root)
			out := cmd.OutOrStdout()
			for _, n := range p.notes {
				fmt.Fprintln(out, n)
			}
			if err != nil {
				return err
			}
			return applyInstall(out, p, dryRun)
		},
	}
	cmd.Flags().StringSliceVar(&dirs, "kata-dir", DefaultKataDirs, "directories holding Kata's configurations")
	cmd.Flags().StringVar(&wrapper, "wrapper", DefaultWrapperPath, "where to install tapsync-qemu (Kata's [hypervisor.qemu] path)")
	cmd.Flags().StringVar(&from, "from", "", "the tapsync-qemu binary to install (default: the one beside this tapsync)")
	cmd.Flags().StringVar(&root, "host-root", "/", "where the node's file system is mounted (a DaemonSet's init container); paths in the files stay the node's")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "print what would change, change nothing")
	return cmd
}

// underRoot returns dirs as seen under root.
func underRoot(root string, dirs []string) []string {
	out := make([]string, len(dirs))
	for i, d := range dirs {
		out[i] = filepath.Join(root, d)
	}
	return out
}

// applyInstall writes the plan's files, printing each change.
func applyInstall(out io.Writer, p installPlan, dryRun bool) error {
	paths := make([]string, 0, len(p.write))
	for path := range p.write {
		paths = append(paths, path)
	}
	sort.Strings(paths)
	for _, path := range paths {
		if dryRun {
			fmt.Fprintf(out, "would write %s\n", path)
			continue
		}
		changed, err := writeIfChanged(path, p.write[path], p.mode[path])
		switch {
		case err != nil:
			return fmt.Errorf("write %s: %w", path, err)
		case changed:
			fmt.Fprintf(out, "wrote %s\n", path)
		default:
			fmt.Fprintf(out, "unchanged %s\n", path)
		}
	}
	return nil
}

func newUninstallKataCmd() *cobra.Command {
	var dirs []string
	var wrapper, root string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "uninstall-kata",
		Short: "Undo install-kata: Kata's own QEMU again for new VMs",
		Long: `Remove what tapsync install-kata wrote: each config.d/` + dropInName + ` it
wrote (a file of that name that is not install-kata's is refused and left),
the wrapper's conf and the wrapper. New VMs start Kata's QEMU directly again;
running ones keep theirs. Idempotent; every change is printed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			configs, err := findKataConfigs(underRoot(root, dirs), wrapper)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			var errs []error
			remove := func(path string, mustBeOurs bool) {
				b, err := os.ReadFile(path)
				switch {
				case errors.Is(err, fs.ErrNotExist):
					return
				case err == nil && mustBeOurs && !bytes.HasPrefix(b, []byte(dropInMark)):
					errs = append(errs, fmt.Errorf("%s was not written by tapsync install-kata: left alone", path))
					return
				case dryRun:
					fmt.Fprintf(out, "would remove %s\n", path)
					return
				}
				if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errs = append(errs, err)
					return
				}
				fmt.Fprintf(out, "removed %s\n", path)
			}
			for _, k := range configs {
				remove(k.dropIn(), true)
			}
			onHost := filepath.Join(root, wrapper)
			remove(onHost+".conf", true)
			remove(onHost, false)
			return errors.Join(errs...)
		},
	}
	cmd.Flags().StringSliceVar(&dirs, "kata-dir", DefaultKataDirs, "directories holding Kata's configurations")
	cmd.Flags().StringVar(&wrapper, "wrapper", DefaultWrapperPath, "where install-kata put tapsync-qemu")
	cmd.Flags().StringVar(&root, "host-root", "/", "where the node's file system is mounted (a DaemonSet's init container)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "print what would change, change nothing")
	return cmd
}

// checkKataInstall says, for each Kata QEMU configuration under dirs,
// whether install-kata's drop-in is in force (tapsync check).
func checkKataInstall(cfg Config, dirs []string, wrapper string) []checkResult {
	configs, err := findKataConfigs(dirs, wrapper)
	if err != nil {
		return []checkResult{{"warn", err.Error(), "fix the Kata configuration"}}
	}
	var out []checkResult
	for _, k := range configs {
		switch {
		case k.qemu == "" || watcher.MatchRuntime(cfg.Containerd.SkipRuntimes, "io.containerd.kata-"+k.shim+".v2"):
		case k.inForce:
			out = append(out, checkResult{"ok", fmt.Sprintf("Kata configuration %s starts QEMU through %s (tapsync's own monitor, no debug mode)", k.path, wrapper), ""})
		default:
			out = append(out, checkResult{"info", fmt.Sprintf("Kata configuration %s starts %s directly: its VMs have a monitor for tapsync only in debug mode", k.path, k.qemu),
				"run tapsync install-kata (a drop-in config.d/" + dropInName + " beside it)"})
		}
	}
	return out
}
