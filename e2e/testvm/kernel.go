package testvm

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// guestModules are the modules virtio-net and the agent's virtio-serial
// ports (virtio_console, /dev/vportNpM) need, in the names the kernel uses.
// Build loads whichever of them (and of their "depends") are not built into
// the kernel, in dependency order, so this list is the roots and a record of
// what the 6.1 cloud kernel needed; order does not matter.
var guestModules = []string{
	"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
	"virtio_pci", "failover", "net_failover", "virtio_net", "virtio_console",
}

// requiredKernelConfig are options that must be built in (=y) for the guest
// to work; Build checks them in the package's config file so that a changed
// Debian kernel fails here, with a reason, rather than as a silent guest.
var requiredKernelConfig = []struct{ option, why string }{
	{"CONFIG_BLK_DEV_INITRD", "boot from an initramfs"},
	{"CONFIG_RD_GZIP", "unpack a gzip initramfs"},
	{"CONFIG_DEVTMPFS", "have /dev without udev"},
	{"CONFIG_SERIAL_8250_CONSOLE", "print the markers on ttyS0"},
	{"CONFIG_PCIEPORTBUS", "use pcie-root-port slots"},
	{"CONFIG_HOTPLUG_PCI_ACPI", "acknowledge ACPI unplug, without which device_del never completes"},
}

// findKernel returns the one boot/vmlinuz-<release> in the unpacked package.
func findKernel(root string) (path, release string, err error) {
	matches, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(matches) != 1 {
		return "", "", fmt.Errorf("expected one boot/vmlinuz-* in the package, found %d", len(matches))
	}
	return matches[0], strings.TrimPrefix(filepath.Base(matches[0]), "vmlinuz-"), nil
}

// findModuleDir accepts both the pre-usrmerge layout (lib/modules, Debian
// 12) and the merged one (usr/lib/modules, Debian 13).
func findModuleDir(root, release string) (string, error) {
	for _, d := range []string{"lib/modules", "usr/lib/modules"} {
		p := filepath.Join(root, d, release)
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("no lib/modules/%s in the package", release)
}

func checkKernelConfig(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read kernel config: %w", err)
	}
	set := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			set[k] = v
		}
	}
	var errs []error
	for _, c := range requiredKernelConfig {
		if set[c.option] != "y" {
			errs = append(errs, fmt.Errorf("kernel config %s=%q, need y to %s", c.option, set[c.option], c.why))
		}
	}
	return errors.Join(errs...)
}

// kmod is a loadable module ready for the initramfs.
type kmod struct {
	name string // kernel spelling, underscores
	data []byte // uncompressed .ko
}

// resolveModules returns the modules among roots and their dependencies that
// are not built in, ordered so that each comes after what it depends on
// (what modprobe would do; busybox insmod loads exactly one file). It reads
// dependencies from each module's own .modinfo "depends=" field because the
// package ships no modules.dep (depmod runs at install time).
func resolveModules(ctx context.Context, modDir string, roots []string) (order []kmod, builtin []string, err error) {
	files := map[string]string{} // name -> path of .ko[.gz|.xz|.zst]
	err = filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if name, ok := moduleName(p); ok && !d.IsDir() {
			files[name] = p
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list modules in %s: %w", modDir, err)
	}
	isBuiltin := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if name, ok := moduleName(strings.TrimSpace(line)); ok {
				isBuiltin[name] = true
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("read modules.builtin: %w", err)
	}

	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var visit func(name string, from string) error
	visit = func(name, from string) error {
		switch {
		case state[name] == done:
			return nil
		case state[name] == visiting:
			return fmt.Errorf("module dependency cycle through %s", name)
		case isBuiltin[name]:
			state[name] = done
			builtin = append(builtin, name)
			return nil
		}
		path, ok := files[name]
		if !ok {
			return fmt.Errorf("module %s (needed by %s) is neither built in nor in %s", name, from, modDir)
		}
		state[name] = visiting
		data, err := readModule(ctx, path)
		if err != nil {
			return err
		}
		deps, err := moduleDepends(data)
		if err != nil {
			return fmt.Errorf("module %s: %w", path, err)
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, kmod{name: name, data: data})
		return nil
	}
	for _, r := range roots {
		if err := visit(r, "the guest"); err != nil {
			return nil, nil, err
		}
	}
	sort.Strings(builtin)
	return order, builtin, nil
}

var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

// moduleName maps ".../virtio-foo.ko.xz" to "virtio_foo", the spelling the
// kernel and "depends=" use.
func moduleName(path string) (string, bool) {
	base := filepath.Base(path)
	for _, s := range moduleSuffixes {
		if n, ok := strings.CutSuffix(base, s); ok {
			return strings.ReplaceAll(n, "-", "_"), true
		}
	}
	return "", false
}

// readModule returns the uncompressed module. Debian 12 ships plain .ko;
// newer kernels compress (.ko.xz, .ko.zst), which busybox insmod may not
// read, so decompression happens here, at build time.
func readModule(ctx context.Context, path string) ([]byte, error) {
	switch {
	case strings.HasSuffix(path, ".ko"):
		return os.ReadFile(path)
	case strings.HasSuffix(path, ".gz"):
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		data, err := io.ReadAll(zr)
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		return data, nil
	case strings.HasSuffix(path, ".xz"):
		out, err := runToolBytes(ctx, "xz-utils", "xz", "-dc", path)
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		return out, nil
	case strings.HasSuffix(path, ".zst"):
		out, err := runToolBytes(ctx, "zstd", "zstd", "-dc", path)
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		return out, nil
	}
	return nil, fmt.Errorf("module %s: unknown compression", path)
}

// moduleDepends reads "depends=a,b" from the module's .modinfo section
// (what `modinfo -F depends` prints).
func moduleDepends(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("parse ELF: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo: %w", err)
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, strings.ReplaceAll(d, "-", "_"))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}
