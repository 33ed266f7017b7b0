package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Defaults when the wrapper has no config file.
const (
	defaultKataQEMU = "/opt/kata/bin/qemu-system-x86_64"
	defaultQEMU     = "/usr/bin/qemu-system-x86_64"
	defaultDir      = "/run/tapsync/qmp"
)

// settings are the wrapper's configuration.
type settings struct {
	qemu string // the real QEMU binary
	dir  string // where the wrapper's sockets go
	// confErr says why the config file was ignored: the VM then runs
	// without our monitor (qemu is the default; dir is unused).
	confErr error
}

// confPath is the wrapper's config file: its own executable path plus
// ".conf" (e.g. /opt/tapsync/bin/tapsync-qemu.conf).
func confPath(exe string) string { return exe + ".conf" }

// defaultSettings are used without a config file: Kata's own QEMU when
// kata-deploy installed one, Debian's otherwise.
func defaultSettings() settings {
	s := settings{qemu: defaultQEMU, dir: defaultDir}
	if fi, err := os.Stat(defaultKataQEMU); err == nil && fi.Mode().IsRegular() {
		s.qemu = defaultKataQEMU
	}
	return s
}

// loadSettings reads path, trusted only as a regular file owned by root
// and writable by nobody else. A missing file means the defaults.
func loadSettings(path string) settings {
	s := defaultSettings()
	// O_NONBLOCK: a FIFO planted at path must not hang QEMU's start.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, os.ErrNotExist) {
		return s
	}
	if errors.Is(err, syscall.ELOOP) {
		s.confErr = errors.New("config " + path + " ignored: is a symlink")
		return s
	}
	if err != nil {
		s.confErr = errors.New("config " + path + " ignored: " + errText(err))
		return s
	}
	defer f.Close()
	data, err := readTrusted(f)
	if err == nil {
		var c settings
		if c, err = parseConf(data); err == nil {
			if c.qemu != "" {
				s.qemu = c.qemu
			}
			if c.dir != "" {
				s.dir = c.dir
			}
			return s
		}
	}
	s.confErr = errors.New("config " + path + " ignored: " + err.Error())
	return s
}

// readTrusted reads an open config file if root may trust it.
func readTrusted(f *os.File) ([]byte, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.Mode().IsRegular():
		return nil, errors.New("not a regular file")
	case st == nil || st.Uid != 0:
		return nil, errors.New("owned by uid " + uidText(st) + ", not root")
	case fi.Mode().Perm()&0o022 != 0:
		return nil, errors.New("writable by group or others (mode " + modeText(fi.Mode()) + ")")
	}
	const max = 64 << 10
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, errors.New(errText(err))
	}
	if len(data) > max {
		return nil, errors.New("larger than 64 KiB")
	}
	return data, nil
}

// parseConf parses "key = value" lines (qemu, dir); '#' starts a comment
// at the start of a line or after a blank. Unset keys stay "".
func parseConf(data []byte) (settings, error) {
	var c settings
	seen := map[string]bool{}
	for n, line := range strings.Split(string(data), "\n") {
		where := "line " + strconv.Itoa(n+1) + ": "
		if i := strings.Index(line, "#"); i == 0 || i > 0 && (line[i-1] == ' ' || line[i-1] == '\t') {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || v == "" {
			return c, errors.New(where + "want key = value")
		}
		if seen[k] {
			return c, errors.New(where + quote(k) + " set twice")
		}
		seen[k] = true
		switch k {
		case "qemu":
			if !filepath.IsAbs(v) || hasControl(v) {
				return c, errors.New(where + "qemu " + quote(v) + ": want an absolute path without control characters")
			}
			c.qemu = v
		case "dir":
			// A comma would end the path inside QEMU's -qmp option.
			if !filepath.IsAbs(v) || filepath.Clean(v) != v || v == "/" || strings.Contains(v, ",") || hasControl(v) {
				return c, errors.New(where + "dir " + quote(v) + ": want an absolute, clean path (not /) without commas or control characters")
			}
			c.dir = v
		default:
			return c, errors.New(where + "unknown key " + quote(k))
		}
	}
	return c, nil
}

// hasControl reports whether v holds a control character: paths end up
// in the one stderr line.
func hasControl(v string) bool {
	for i := 0; i < len(v); i++ {
		if v[i] < 0x20 || v[i] == 0x7f {
			return true
		}
	}
	return false
}

func uidText(st *syscall.Stat_t) string {
	if st == nil {
		return "?"
	}
	return strconv.FormatUint(uint64(st.Uid), 10)
}

func modeText(m os.FileMode) string {
	o := strconv.FormatUint(uint64(m.Perm()), 8)
	return "0000"[:4-len(o)] + o
}

// errText is err's text without os's "open PATH: " wrapping when the path
// is already in the line.
func errText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
