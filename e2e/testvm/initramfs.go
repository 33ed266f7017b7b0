package testvm

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/tapsync/tapsync/e2e/testcache"
)

// writeInitramfs writes the gzip'd newc archive: a minimal FHS skeleton,
// /dev/console, static busybox with a symlink per applet (from the binary's
// own --list-full, so the set matches the binary), the test agent, the
// modules, their load order in /etc/tapsync-modules, and /init.
func writeInitramfs(ctx context.Context, path string, r recipe, mods []kmod) error {
	list, err := runTool(ctx, "busybox-static", busyboxPath, "--list-full")
	if err != nil {
		return fmt.Errorf("list busybox applets: %w", err)
	}
	var applets []string
	for _, a := range strings.Fields(list) {
		if a != "bin/busybox" {
			applets = append(applets, a)
		}
	}

	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	cw := newCPIOWriter(zw)
	dirs := []string{"bin", "dev", "etc", "lib", "lib/modules", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin"}
	for _, a := range applets { // in case a busybox build lists another directory
		for d := filepath.Dir(a); d != "."; d = filepath.Dir(d) {
			if !slices.Contains(dirs, d) {
				dirs = append(dirs, d)
			}
		}
	}
	sort.Strings(dirs) // parents sort before children
	for _, d := range dirs {
		perm := fs.FileMode(0o755)
		if d == "tmp" {
			perm = 0o777 | fs.ModeSticky
		}
		if err := cw.Dir(d, perm); err != nil {
			return err
		}
	}
	if err := cw.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := cw.File("bin/busybox", 0o755, r.busybox); err != nil {
		return err
	}
	for _, a := range applets {
		if err := cw.Symlink(a, "/bin/busybox"); err != nil {
			return err
		}
	}
	if err := cw.File(agentGuestPath, 0o755, r.agent); err != nil {
		return err
	}
	var order strings.Builder
	for _, m := range mods {
		if err := cw.File("lib/modules/"+m.name+".ko", 0o644, m.data); err != nil {
			return err
		}
		order.WriteString(m.name + "\n")
	}
	if err := cw.File("etc/tapsync-modules", 0o644, []byte(order.String())); err != nil {
		return err
	}
	if err := cw.File("init", 0o755, initScript); err != nil {
		return err
	}
	if err := cw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("compress initramfs: %w", err)
	}
	return testcache.WriteFileSync(path, buf.Bytes(), 0o644)
}
