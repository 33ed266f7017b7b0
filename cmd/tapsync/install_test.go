package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// kataTree lays out Kata's configurations as kata-deploy does under dir:
// the Go runtime's qemu and qemu-snp shims, runtime-rs's, and a clh one.
func kataTree(t *testing.T, dir string) {
	t.Helper()
	files := map[string]string{
		"runtimes/qemu/configuration-qemu.toml":                                  "[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\nenable_debug = false\n[runtime]\ninternetworking_model = \"tcfilter\"\n",
		"runtimes/qemu/config.d/50-user-overrides.toml":                          "[hypervisor.qemu]\ndefault_vcpus = 2\n",
		"runtime-rs/runtimes/qemu-runtime-rs/configuration-qemu-runtime-rs.toml": "[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\n",
		"runtimes/qemu-snp/configuration-qemu-snp.toml":                          "[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-snp-experimental\"\n",
		"runtimes/clh/configuration-clh.toml":                                    "[hypervisor.clh]\npath = \"/opt/kata/bin/cloud-hypervisor\"\n",
	}
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func runCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

// install-kata writes a drop-in beside each QEMU configuration that is
// not a confidential handler's, the wrapper and its conf; a second run
// changes nothing; uninstall-kata removes exactly what it wrote.
func TestInstallKata(t *testing.T) {
	dir, bin := t.TempDir(), t.TempDir()
	kataTree(t, dir)
	wrapper := filepath.Join(bin, "tapsync-qemu")
	from := filepath.Join(t.TempDir(), "tapsync-qemu")
	if err := os.WriteFile(from, []byte("#!wrapper"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := writeConfig(t, "[containerd]\nwrapper_socket = \"/run/tapsync/qmp/{id}.sock\"\n")
	args := []string{"install-kata", "--config", cfg, "--kata-dir", dir, "--wrapper", wrapper, "--from", from}
	out, err := runCmd(t, args...)
	if err != nil {
		t.Fatalf("install-kata: %v\n%s", err, out)
	}
	t.Logf("install-kata:\n%s", out)
	goDrop := filepath.Join(dir, "runtimes/qemu/config.d", dropInName)
	rsDrop := filepath.Join(dir, "runtime-rs/runtimes/qemu-runtime-rs/config.d", dropInName)
	for _, want := range []string{
		"wrote " + goDrop, "wrote " + rsDrop, "wrote " + wrapper + "\n", "wrote " + wrapper + ".conf",
		"left alone " + filepath.Join(dir, "runtimes/qemu-snp/configuration-qemu-snp.toml") + ": io.containerd.kata-qemu-snp.v2 is a confidential handler",
		"left alone " + filepath.Join(dir, "runtimes/clh/configuration-clh.toml") + ": not a QEMU configuration",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("install-kata output lacks %q", want)
		}
	}
	conf, _ := os.ReadFile(wrapper + ".conf")
	if !strings.Contains(string(conf), "qemu = /opt/kata/bin/qemu-system-x86_64\n") || !strings.Contains(string(conf), "dir = /run/tapsync/qmp\n") {
		t.Errorf("wrapper conf:\n%s", conf)
	}
	if fi, err := os.Stat(wrapper); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("wrapper: %v, %v", fi, err)
	}
	for _, c := range []string{"runtimes/qemu/configuration-qemu.toml", "runtime-rs/runtimes/qemu-runtime-rs/configuration-qemu-runtime-rs.toml"} {
		k, err := readKataConfig(filepath.Join(dir, c), wrapper)
		if err != nil || !k.inForce || k.qemu != "/opt/kata/bin/qemu-system-x86_64" {
			t.Errorf("%s after install: %+v, %v; want the drop-in in force over the real QEMU", c, k, err)
		}
	}

	loaded, err := LoadConfig(cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, r := range checkKataInstall(loaded, []string{dir}, wrapper) {
		lines = append(lines, r.level+" "+r.what)
	}
	if all := strings.Join(lines, "\n"); len(lines) != 2 || strings.Count(all, "ok Kata configuration") != 2 || strings.Contains(all, "snp") {
		t.Errorf("check after install-kata:\n%s", all)
	}

	// Again: nothing changes.
	out, err = runCmd(t, args...)
	if err != nil || strings.Contains(out, "wrote") {
		t.Errorf("second install-kata: %v\n%s", err, out)
	}
	// A later drop-in of the operator's that sets path again wins: the
	// configuration reads as not in force.
	later := filepath.Join(dir, "runtimes/qemu/config.d/70-mine.toml")
	os.WriteFile(later, []byte("[hypervisor.qemu]\npath = \"/usr/bin/qemu-system-x86_64\"\n"), 0o644)
	if k, _ := readKataConfig(filepath.Join(dir, "runtimes/qemu/configuration-qemu.toml"), wrapper); k.inForce {
		t.Errorf("with a later drop-in setting path: %+v, want not in force", k)
	}
	os.Remove(later)

	// uninstall-kata removes what install-kata wrote, and only that.
	foreign := filepath.Join(dir, "runtime-rs/runtimes/qemu-runtime-rs/config.d/keep.toml")
	os.WriteFile(foreign, []byte("[hypervisor.qemu]\n"), 0o644)
	out, err = runCmd(t, "uninstall-kata", "--kata-dir", dir, "--wrapper", wrapper)
	if err != nil {
		t.Fatalf("uninstall-kata: %v\n%s", err, out)
	}
	for _, p := range []string{goDrop, rsDrop, wrapper, wrapper + ".conf"} {
		if !strings.Contains(out, "removed "+p) {
			t.Errorf("uninstall-kata output lacks removed %s:\n%s", p, out)
		}
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s still there", p)
		}
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("uninstall-kata removed a drop-in not its own: %v", err)
	}
	if out, err = runCmd(t, "uninstall-kata", "--kata-dir", dir, "--wrapper", wrapper); err != nil || out != "" {
		t.Errorf("second uninstall-kata: %v, %q; want nothing to do", err, out)
	}
	for _, r := range checkKataInstall(loaded, []string{dir}, wrapper) {
		if r.level != "info" || !strings.Contains(r.todo, "install-kata") {
			t.Errorf("check after uninstall-kata: %+v, want info with install-kata to do", r)
		}
	}
	// A file of our name that we did not write is refused.
	os.WriteFile(goDrop, []byte("[hypervisor.qemu]\n"), 0o644)
	if out, err = runCmd(t, "uninstall-kata", "--kata-dir", dir, "--wrapper", wrapper); err == nil || !strings.Contains(err.Error(), "not written by tapsync install-kata") {
		t.Errorf("uninstall-kata over a foreign %s: %v\n%s", dropInName, err, out)
	}
}

// install-kata refuses what it cannot do right, naming why, and writes
// nothing.
func TestInstallKataRefused(t *testing.T) {
	from := filepath.Join(t.TempDir(), "tapsync-qemu")
	os.WriteFile(from, []byte("#!wrapper"), 0o755)
	cfg := writeConfig(t, "")
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"no configuration", nil, "no Kata QEMU configuration"},
		{"two QEMUs", map[string]string{
			"runtimes/qemu/configuration-qemu.toml":   "[hypervisor.qemu]\npath = \"/a/qemu\"\n",
			"runtimes/qemu2/configuration-qemu2.toml": "[hypervisor.qemu]\npath = \"/b/qemu\"\n"}, "different QEMUs"},
		{"malformed", map[string]string{"runtimes/qemu/configuration-qemu.toml": "[hypervisor.qemu\n"}, "configuration-qemu.toml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, bin := t.TempDir(), t.TempDir()
			for name, body := range tc.files {
				p := filepath.Join(dir, name)
				os.MkdirAll(filepath.Dir(p), 0o755)
				os.WriteFile(p, []byte(body), 0o644)
			}
			out, err := runCmd(t, "install-kata", "--config", cfg, "--kata-dir", dir, "--wrapper", filepath.Join(bin, "w"), "--from", from)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want one naming %q\n%s", err, tc.want, out)
			}
			if ents, _ := os.ReadDir(bin); len(ents) != 0 {
				t.Errorf("wrote %v", ents)
			}
		})
	}
}

// With --host-root (a DaemonSet's init container, the node's file system
// mounted at /host), files go under the root and say the node's paths.
func TestInstallKataHostRoot(t *testing.T) {
	root := t.TempDir()
	kataTree(t, filepath.Join(root, "opt/kata/share/defaults/kata-containers"))
	from := filepath.Join(t.TempDir(), "tapsync-qemu")
	os.WriteFile(from, []byte("#!wrapper"), 0o755)
	cfg := writeConfig(t, "")
	out, err := runCmd(t, "install-kata", "--config", cfg, "--host-root", root, "--from", from)
	if err != nil {
		t.Fatalf("install-kata: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(root, DefaultWrapperPath)); err != nil {
		t.Errorf("wrapper not under the host root: %v\n%s", err, out)
	}
	drop, err := os.ReadFile(filepath.Join(root, "opt/kata/share/defaults/kata-containers/runtimes/qemu/config.d", dropInName))
	if err != nil || !strings.Contains(string(drop), `path = "`+DefaultWrapperPath+`"`) {
		t.Errorf("drop-in %v:\n%s", err, drop)
	}
	out, err = runCmd(t, "uninstall-kata", "--host-root", root)
	if err != nil || strings.Count(out, "removed ") != 4 {
		t.Errorf("uninstall-kata --host-root: %v\n%s", err, out)
	}
}
