package watcher

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DiscoverQEMU finds the QEMU processes under procRoot (normally /proc)
// that run in one of the network namespaces bound in netnsDir and serve a
// QMP monitor on a unix socket. Each is a Sandbox{ID: "proc-<netns file
// name>", Netns: <netnsDir>/<name>, QMP: <socket>}.
//
// A process is QEMU when the base name of argv[0] starts with
// "qemu-system" or "qemu-kvm". Its netns must be the same namespace
// (device and inode) as a netns file in netnsDir. Its QMP socket is the
// first listening unix socket given as a QMP monitor, in command-line order:
//
//	-qmp unix:PATH,server=on,wait=off      (also server,nowait; --qmp)
//	-qmp unix:path=PATH,server=on
//	-chardev socket,id=ID,path=PATH,server=on  with  -mon chardev=ID,mode=control
//	                                             or  -qmp chardev:ID
//
// A relative PATH is resolved against the process's working directory.
// Processes that cannot be read (gone, or not permitted) are skipped. When
// several QEMUs share a netns, the one with the lowest pid is reported.
// The result is sorted by ID.
func DiscoverQEMU(procRoot, netnsDir string) ([]Sandbox, error) {
	netnsDir = filepath.Clean(netnsDir)
	nets, err := netnsByID(netnsDir)
	if err != nil {
		return nil, err
	}
	if len(nets) == 0 {
		return nil, nil
	}
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, fmt.Errorf("discover QEMU: %w", err)
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	byNetns := map[string]Sandbox{}
	for _, pid := range pids {
		dir := filepath.Join(procRoot, strconv.Itoa(pid))
		name, qmp, ok := qemuProcess(dir, nets)
		if !ok {
			continue
		}
		if _, taken := byNetns[name]; taken {
			continue
		}
		byNetns[name] = Sandbox{ID: "proc-" + name, Netns: filepath.Join(netnsDir, name), QMP: qmp}
	}
	out := make([]Sandbox, 0, len(byNetns))
	for _, sb := range byNetns {
		out = append(out, sb)
	}
	slices.SortFunc(out, func(a, b Sandbox) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// netnsByID maps each namespace bound in dir to its file name (the first
// in name order when one namespace is bound twice).
func netnsByID(dir string) (map[nsID]string, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("discover QEMU: netns dir %s: %w", dir, err)
	}
	defer unix.Close(fd)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("discover QEMU: %w", err)
	}
	nets := map[nsID]string{}
	for _, e := range ents { // sorted by name
		name := e.Name()
		if !safeName(name) {
			continue
		}
		if k, err := classifyAt(fd, name, false); err != nil || k != entryNetns {
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			continue
		}
		id := nsID{st.Dev, st.Ino}
		if _, dup := nets[id]; !dup {
			nets[id] = name
		}
	}
	return nets, nil
}

// qemuProcess looks at the process in dir (/proc/<pid>): when it is a QEMU
// in one of nets with a QMP unix socket, it returns the netns file name and
// the socket path.
func qemuProcess(dir string, nets map[nsID]string) (netns, qmp string, ok bool) {
	raw, err := os.ReadFile(filepath.Join(dir, "cmdline"))
	if err != nil || len(raw) == 0 {
		return "", "", false // gone, not permitted, or a kernel thread
	}
	args := strings.Split(string(bytes.TrimSuffix(raw, []byte{0})), "\x00")
	base := filepath.Base(args[0])
	if !strings.HasPrefix(base, "qemu-system") && !strings.HasPrefix(base, "qemu-kvm") {
		return "", "", false
	}
	// Equivalent to: stat -L -c '%d %i' /proc/<pid>/ns/net
	id, err := nsIDOf(filepath.Join(dir, "ns", "net"))
	if err != nil {
		return "", "", false
	}
	netns, ok = nets[id]
	if !ok {
		return "", "", false
	}
	qmp, ok = qmpSocket(args)
	if !ok {
		return "", "", false
	}
	if !filepath.IsAbs(qmp) {
		cwd, err := os.Readlink(filepath.Join(dir, "cwd"))
		if err != nil {
			return "", "", false
		}
		qmp = filepath.Join(cwd, qmp)
	}
	return netns, qmp, true
}

// qmpSocket returns the first listening unix socket among the QMP monitors
// of a QEMU command line (args[0] is the program).
func qmpSocket(args []string) (string, bool) {
	type monitor struct {
		path    string // -qmp unix:PATH
		chardev string // -qmp chardev:ID, -mon chardev=ID,mode=control
	}
	var mons []monitor
	chardevs := map[string]string{} // id → path of a listening unix socket
	for i := 1; i+1 < len(args); i++ {
		opt := args[i]
		if strings.HasPrefix(opt, "--") {
			opt = opt[1:] // QEMU treats --foo as -foo
		}
		if !strings.HasPrefix(opt, "-") {
			continue
		}
		val := args[i+1]
		switch opt {
		case "-qmp":
			i++
			if id, ok := strings.CutPrefix(val, "chardev:"); ok {
				mons = append(mons, monitor{chardev: id})
			} else if rest, ok := strings.CutPrefix(val, "unix:"); ok {
				o := parseQemuOpts(rest, "path")
				if p := o["path"]; p != "" && qemuBool(o["server"]) {
					mons = append(mons, monitor{path: p})
				}
			}
		case "-chardev":
			i++
			o := parseQemuOpts(val, "backend")
			if o["backend"] == "socket" && o["id"] != "" && o["path"] != "" && qemuBool(o["server"]) {
				chardevs[o["id"]] = o["path"]
			}
		case "-mon":
			i++
			o := parseQemuOpts(val, "chardev")
			if o["mode"] == "control" && o["chardev"] != "" {
				mons = append(mons, monitor{chardev: o["chardev"]})
			}
		}
	}
	for _, m := range mons {
		if m.path != "" {
			return m.path, true
		}
		if p, ok := chardevs[m.chardev]; ok {
			return p, true
		}
	}
	return "", false
}

// parseQemuOpts parses QEMU's key=value,key=value option syntax: ",," is a
// literal comma, a first element without "=" is the value of implied (when
// not empty), a bare "flag" is flag=on and "noflag" is flag=off. Later keys
// win, as in QEMU.
func parseQemuOpts(s, implied string) map[string]string {
	opts := map[string]string{}
	for first := true; s != ""; first = false {
		n := strings.IndexAny(s, "=,")
		var key, val string
		switch {
		case n >= 0 && s[n] == '=':
			key = s[:n]
			val, s = qemuOptValue(s[n+1:])
		case first && implied != "":
			key = implied
			val, s = qemuOptValue(s)
		default:
			if n < 0 {
				n = len(s)
			}
			key, s = s[:n], s[n:]
			val = "on"
			if k, ok := strings.CutPrefix(key, "no"); ok {
				key, val = k, "off"
			}
		}
		opts[key] = val
		s = strings.TrimPrefix(s, ",")
	}
	return opts
}

// qemuOptValue reads a value up to the next single comma.
func qemuOptValue(s string) (val, rest string) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				b.WriteByte(',')
				i++
				continue
			}
			return b.String(), s[i:]
		}
		b.WriteByte(s[i])
	}
	return b.String(), ""
}

// qemuBool is QEMU's boolean option parsing; an absent option is false.
func qemuBool(v string) bool {
	switch v {
	case "on", "yes", "true", "y":
		return true
	}
	return false
}
