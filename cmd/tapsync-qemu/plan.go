package main

import (
	"strconv"
	"strings"
)

// sunPathMax is the longest socket path bind(2) takes: sun_path is 108
// bytes on Linux, one of them the terminating NUL.
const sunPathMax = 107

// warnPrefix starts the one line written when a VM gets no monitor of ours.
const warnPrefix = "tapsync-qemu: no tapsync monitor for this VM: "

// namePrefix is how Kata names every VM: -name sandbox-<id>.
const namePrefix = "sandbox-"

// socketCheck says whether QEMU may serve a monitor at sock in dir: nil,
// or why not. The real one (checkSocket) looks at the file system.
type socketCheck func(dir, sock string) error

// planArgs returns QEMU's arguments (args without argv[0]) with the
// wrapper's monitor added last, or args unchanged. line is "" or the one
// line to write to stderr, saying why a Kata VM gets no monitor of ours.
// It never adds a path made from an id that fails validID.
func planArgs(args []string, s settings, check socketCheck) (out []string, line string) {
	sc := scanArgs(args)
	if sc.help || len(sc.names) == 0 {
		return args, ""
	}
	fail := func(why string) ([]string, string) { return args, warnPrefix + why }
	var guests []string
	for _, v := range sc.names {
		if g, ok := guestName(v); ok && strings.HasPrefix(g, namePrefix) {
			guests = append(guests, g)
		}
	}
	if len(guests) == 0 {
		return args, "" // not a Kata VM
	}
	if len(sc.names) > 1 {
		return fail("-name given " + strconv.Itoa(len(sc.names)) + " times")
	}
	id := strings.TrimPrefix(guests[0], namePrefix)
	if !validID(id) {
		return fail("sandbox id " + quote(id) + ": want 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit")
	}
	if s.confErr != nil {
		return fail(s.confErr.Error())
	}
	sock := s.dir + "/" + id + ".sock"
	if len(sock) > sunPathMax {
		return fail("socket path " + sock + " is " + strconv.Itoa(len(sock)) + " bytes; sun_path holds " + strconv.Itoa(sunPathMax))
	}
	for _, v := range sc.qmp {
		if unixPath(v) == sock {
			return args, "" // ours is there already (say, a second wrapper in a chain)
		}
	}
	for _, a := range args {
		if strings.Contains(a, sock) {
			return fail("socket path " + sock + " is already named by argument " + quote(a))
		}
	}
	if err := check(s.dir, sock); err != nil {
		return fail(err.Error())
	}
	out = append(args[:len(args):len(args)], "-qmp", "unix:"+sock+",server=on,wait=off")
	return out, ""
}

// scanned is what planArgs needs from a QEMU command line.
type scanned struct {
	names []string // values of -name
	qmp   []string // values of -qmp
	help  bool     // QEMU only prints something and exits
}

// flagOpts are QEMU's options that take no argument (DEF(..., 0, ...) in
// qemu-options.hx): those of qemu-system-x86_64 7.2, each checked to take
// no value, and a few of older releases. Every other option takes the
// next argument as its value. An option missing here only makes the scan
// skip one argument too many, so a -name after it is missed and the VM
// runs without our monitor; treating a value as an option would be worse.
var flagOpts = map[string]bool{
	"S": true, "nodefaults": true, "no-user-config": true, "daemonize": true,
	"nographic": true, "snapshot": true, "usb": true, "mem-prealloc": true,
	"portrait": true, "full-screen": true, "win2k-hack": true,
	"no-fd-bootchk": true, "no-acpi": true, "no-hpet": true, "singlestep": true,
	"preconfig": true, "s": true, "enable-kvm": true, "xen-attach": true,
	"xen-domid-restrict": true, "no-reboot": true, "no-shutdown": true,
	"only-migratable": true, "enable-sync-profile": true, "async-teardown": true,
	"semihosting": true, "audio-help": true, "old-param": true,
	"enable-fips": true, "no-quit": true, "alt-grab": true, "ctrl-grab": true,
	"no-frame": true, "curses": true, "sdl": true, "no-kvm": true,
	"version": true, "h": true, "help": true,
}

// helpOpts are options whose value "help" (or "?", or a ",help" parameter)
// makes QEMU list something and exit.
var helpOpts = map[string]bool{"machine": true, "M": true, "device": true, "cpu": true, "accel": true, "name": true}

// scanArgs walks args the way QEMU's option loop does: "--foo" is "-foo",
// an argument not starting with '-' is a disk image, and an option in
// flagOpts takes no value.
func scanArgs(args []string) scanned {
	var sc scanned
	for i := 0; i < len(args); i++ {
		a := args[i]
		if len(a) < 2 || a[0] != '-' {
			continue
		}
		opt := strings.TrimPrefix(a[1:], "-")
		switch opt {
		case "version", "h", "help":
			sc.help = true
		}
		if flagOpts[opt] {
			continue
		}
		if i+1 >= len(args) {
			break // QEMU: "requires an argument"
		}
		i++
		v := args[i]
		if helpOpts[opt] && wantsHelp(v) {
			sc.help = true
		}
		switch opt {
		case "name":
			sc.names = append(sc.names, v)
		case "qmp":
			sc.qmp = append(sc.qmp, v)
		}
	}
	return sc
}

// optParams splits a QemuOpts string at single commas; ",," is a literal
// comma (QEMU's get_opt_value).
func optParams(v string) []string {
	var ps []string
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		if v[i] == ',' {
			if i+1 < len(v) && v[i+1] == ',' {
				b.WriteByte(',')
				i++
				continue
			}
			ps = append(ps, b.String())
			b.Reset()
			continue
		}
		b.WriteByte(v[i])
	}
	return append(ps, b.String())
}

func wantsHelp(v string) bool {
	for _, p := range optParams(v) {
		if p == "help" || p == "?" {
			return true
		}
	}
	return false
}

// guestName is the guest name a -name value sets: QEMU's name options have
// the implied first key "guest" (-name NAME,debug-threads=on), guest= may
// be given instead, and the last one given wins.
func guestName(v string) (string, bool) {
	name, ok := "", false
	for i, p := range optParams(v) {
		k, val, _ := strings.Cut(p, "=")
		switch {
		case i == 0 && implied(p):
			name, ok = p, true
		case k == "guest" && !implied(p):
			name, ok = val, true
		}
	}
	return name, ok
}

// implied reports whether the parameter p (unescaped) has no "key=": in
// the raw string, a comma comes before any '=' (QEMU's strcspn(p, "=,")).
func implied(p string) bool {
	k, _, hasEq := strings.Cut(p, "=")
	return !hasEq || strings.Contains(k, ",")
}

// unixPath is the path of a "-qmp unix:PATH,…" or "unix:path=PATH,…"
// value, or "".
func unixPath(v string) string {
	rest, ok := strings.CutPrefix(v, "unix:")
	if !ok {
		return ""
	}
	for i, p := range optParams(rest) {
		k, val, _ := strings.Cut(p, "=")
		switch {
		case i == 0 && implied(p):
			return p
		case k == "path" && !implied(p):
			return val
		}
	}
	return ""
}

// validID reports whether id may name a socket file: 1-128 characters of
// [A-Za-z0-9_.-], starting with a letter or digit. It is state.ValidID's
// rule (^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$), written out because importing
// state (or regexp) would pull zerolog and much more into this binary;
// TestValidIDIsStateRule keeps the two the same.
func validID(id string) bool {
	if len(id) == 0 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case (c == '_' || c == '.' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}

// quote renders s for the one stderr line: Go-quoted (no newline or NUL
// survives) and cut to 140 characters.
func quote(s string) string {
	if len(s) > 140 {
		return strconv.Quote(s[:140]) + "…"
	}
	return strconv.Quote(s)
}
