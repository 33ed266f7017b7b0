package main

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestParseConf(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       settings
		err        string
	}{
		{name: "empty"},
		{name: "both", text: "# tapsync-qemu\nqemu = /opt/kata/bin/qemu-system-x86_64\n\n  dir=/run/tapsync/qmp  # where sockets go\n",
			want: settings{qemu: "/opt/kata/bin/qemu-system-x86_64", dir: "/run/tapsync/qmp"}},
		{name: "# inside a path", text: "qemu = /opt/q#1/qemu\n", want: settings{qemu: "/opt/q#1/qemu"}},
		{name: "only dir", text: "dir = /run/x\n", want: settings{dir: "/run/x"}},
		{name: "unknown key", text: "qemu = /q\nsocket = /x\n", err: `line 2: unknown key "socket"`},
		{name: "no =", text: "qemu /q\n", err: "line 1: want key = value"},
		{name: "empty value", text: "dir =\n", err: "line 1: want key = value"},
		{name: "twice", text: "dir = /a\ndir = /b\n", err: `line 2: "dir" set twice`},
		{name: "relative qemu", text: "qemu = qemu-system-x86_64\n", err: `line 1: qemu "qemu-system-x86_64": want an absolute path without control characters`},
		{name: "relative dir", text: "dir = run/x\n", err: `line 1: dir "run/x": want an absolute, clean path (not /) without commas or control characters`},
		{name: "unclean dir", text: "dir = /run/../x\n", err: `line 1: dir "/run/../x": want an absolute, clean path (not /) without commas or control characters`},
		{name: "dir with a comma", text: "dir = /run/a,b\n", err: `line 1: dir "/run/a,b": want an absolute, clean path (not /) without commas or control characters`},
		{name: "dir with a CR", text: "dir = /run/a\rb\n", err: `line 1: dir "/run/a\rb": want an absolute, clean path (not /) without commas or control characters`},
		{name: "qemu with a tab", text: "qemu = /q\tx\n", err: `line 1: qemu "/q\tx": want an absolute path without control characters`},
		{name: "dir /", text: "dir = /\n", err: `line 1: dir "/": want an absolute, clean path (not /) without commas or control characters`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseConf([]byte(tc.text))
			if tc.err != "" {
				if err == nil || err.Error() != tc.err {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// TestLoadSettings checks which config files are trusted. Root only: the
// trusted file is root's, the others are made someone else's.
func TestLoadSettings(t *testing.T) {
	skipUnlessRoot(t)
	def := defaultSettings()
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, path string)
		want  settings // confErr compared by text
		why   string
	}{
		{name: "missing", setup: func(*testing.T, string) {}, want: def},
		{name: "trusted", setup: writeConf("qemu = /q\ndir = /run/d\n", 0o644, 0), want: settings{qemu: "/q", dir: "/run/d"}},
		{name: "trusted, partial", setup: writeConf("dir = /run/d\n", 0o600, 0), want: settings{qemu: def.qemu, dir: "/run/d"}},
		{name: "another owner", setup: writeConf("qemu = /q\n", 0o644, 65534), why: "owned by uid 65534, not root"},
		{name: "group writable", setup: writeConf("qemu = /q\n", 0o664, 0), why: "writable by group or others (mode 0664)"},
		{name: "world writable", setup: writeConf("qemu = /q\n", 0o646, 0), why: "writable by group or others (mode 0646)"},
		{name: "symlink", setup: func(t *testing.T, path string) {
			writeConf("qemu = /q\n", 0o644, 0)(t, path+".real")
			if err := os.Symlink(path+".real", path); err != nil {
				t.Fatal(err)
			}
		}, why: "is a symlink"},
		{name: "directory", setup: func(t *testing.T, path string) {
			if err := os.Mkdir(path, 0o755); err != nil {
				t.Fatal(err)
			}
		}, why: "not a regular file"},
		{name: "fifo", setup: func(t *testing.T, path string) {
			if err := syscall.Mkfifo(path, 0o644); err != nil {
				t.Fatal(err)
			}
		}, why: "not a regular file"},
		{name: "bad line", setup: writeConf("qemu = /q\nbogus\n", 0o644, 0), why: "line 2: want key = value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tapsync-qemu.conf")
			tc.setup(t, path)
			got := loadSettings(path)
			want := tc.want
			if tc.why != "" {
				want = def
			}
			gotWhy := ""
			if got.confErr != nil {
				gotWhy = got.confErr.Error()
			}
			wantWhy := ""
			if tc.why != "" {
				wantWhy = "config " + path + " ignored: " + tc.why
			}
			if got.qemu != want.qemu || got.dir != want.dir || gotWhy != wantWhy {
				t.Fatalf("got %q %q %q\nwant %q %q %q", got.qemu, got.dir, gotWhy, want.qemu, want.dir, wantWhy)
			}
		})
	}
}

// writeConf writes text at path with mode and owner uid.
func writeConf(text string, mode os.FileMode, uid int) func(*testing.T, string) {
	return func(t *testing.T, path string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(path, uid, uid); err != nil {
			t.Fatal(err)
		}
	}
}

func skipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (root-owned config and socket dir, real QEMU); run as root, e.g. sudo go test")
	}
}
