package watcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// DefaultQEMUBinaries are the executables /proc discovery accepts as QEMU
// when none are configured: Debian's and Ubuntu's package
// (/usr/bin/qemu-system-x86_64, which Kata's own configuration-qemu.toml
// names by default), RHEL's (/usr/libexec/qemu-kvm) and kata-deploy's
// (/opt/kata/bin/qemu-system-x86_64). Other architectures or builds must
// be configured.
var DefaultQEMUBinaries = []string{
	"/usr/bin/qemu-system-x86_64",
	"/usr/libexec/qemu-kvm",
	"/opt/kata/bin/qemu-system-x86_64",
}

// DefaultQMPDir is where Kata keeps each VM's sockets (/run/vc/vm/<id>/).
const DefaultQMPDir = "/run/vc/vm"

// ProcConfig says which processes /proc discovery may take for a
// sandbox's QEMU. Any pod can start a process whose argv looks like QEMU's
// and name a socket of its own; the VM it is taken for receives root's tap
// and vhost-net descriptors. So a process counts only when all of these
// hold:
//
//   - /proc/PID/exe is one of Binaries (the same file, by device and
//     inode: a copy or a container's file of the same name is not it; a
//     binary replaced by an upgrade since QEMU started is not it either),
//     and that file is owned by root and writable by no one else;
//   - the process runs as root (every uid in /proc/PID/status) or as one
//     of UIDs;
//   - its QMP socket is under QMPDir, with no symlink leading out of it.
//
// Discovery does not connect to the socket (QEMU serves one QMP client at
// a time). Whoever connects must check the listener with CheckQMPPeer (on
// its own connection) or VerifyQMPPeer before trusting it: the
// Sandbox.PID a discovery returns is the process that must be listening.
//
// Kata runs QEMU as root unless its rootless mode is on
// (hypervisor.qemu.rootless = true), which runs each VM as a fresh user
// kata-<random> made by useradd, with a random uid and its sockets under
// /run/user/<uid>: such VMs cannot be listed here in advance; use the
// containerd source for them.
type ProcConfig struct {
	Binaries []string // default DefaultQEMUBinaries
	QMPDir   string   // default DefaultQMPDir
	UIDs     []uint32 // non-root users QEMU may run as; default none
}

func (c ProcConfig) withDefaults() ProcConfig {
	if len(c.Binaries) == 0 {
		c.Binaries = DefaultQEMUBinaries
	}
	if c.QMPDir == "" {
		c.QMPDir = DefaultQMPDir
	}
	return c
}

// DiscoverQEMU is ProcConfig{}.Discover: the default binaries and QMP
// directory, and QEMU running as root only.
func DiscoverQEMU(procRoot, netnsDir string) ([]Sandbox, error) {
	return ProcConfig{}.Discover(procRoot, netnsDir)
}

// Discover finds the QEMU processes under procRoot (normally /proc) that
// run in one of the network namespaces bound in netnsDir, serve a QMP
// monitor on a unix socket, and pass the checks of ProcConfig. Each is a
// Sandbox{ID: "proc-<netns file name>", Netns: <netnsDir>/<name>, QMP:
// <socket>, PID: <pid>}.
//
// A process is looked at when the base name of argv[0] starts with
// "qemu-system" or "qemu-kvm" (argv only selects; /proc/PID/exe decides).
// Its netns must be the same namespace (device and inode) as a netns file
// in netnsDir, and never the host's. Its QMP socket is the first listening
// unix socket given as a QMP monitor, in command-line order:
//
//	-qmp unix:PATH,server=on,wait=off      (also server,nowait; --qmp)
//	-qmp unix:path=PATH,server=on
//	-chardev socket,id=ID,path=PATH,server=on  with  -mon chardev=ID,mode=control
//	                                             or  -qmp chardev:ID
//
// A relative PATH is resolved against the process's working directory.
// Processes that cannot be read (gone, or not permitted) are skipped, and
// so are those that fail a check (rejected lists them with the reason, for
// a log). When several QEMUs share a netns, the one with the lowest pid is
// reported. The result is sorted by ID.
func (c ProcConfig) Discover(procRoot, netnsDir string) ([]Sandbox, error) {
	found, _, err := c.discover(procRoot, netnsDir)
	return found, err
}

// procRejection is a process that looked like QEMU and failed a check.
type procRejection struct {
	pid int
	why string
}

// ProcDiscovery is Discover run again and again (at start, when a netns
// appears, at each resync) that logs each rejected process once, with
// its pid and why, rather than at every scan.
type ProcDiscovery struct {
	cfg                ProcConfig
	procRoot, netnsDir string

	mu     sync.Mutex
	logged map[int]string // pid → why, of the rejections already logged
}

// NewProcDiscovery returns a discovery of cfg's QEMUs under procRoot
// (normally /proc) in the namespaces bound in netnsDir.
func NewProcDiscovery(cfg ProcConfig, procRoot, netnsDir string) *ProcDiscovery {
	return &ProcDiscovery{cfg: cfg, procRoot: procRoot, netnsDir: netnsDir, logged: map[int]string{}}
}

// Scan is ProcConfig.Discover; a process rejected for a reason not logged
// before is logged at warn level to the logger in ctx.
func (d *ProcDiscovery) Scan(ctx context.Context) ([]Sandbox, error) {
	found, rejected, err := d.cfg.discover(d.procRoot, d.netnsDir)
	if err != nil {
		return nil, err
	}
	log := zerolog.Ctx(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	seen := map[int]bool{}
	for _, r := range rejected {
		seen[r.pid] = true
		if d.logged[r.pid] == r.why {
			continue
		}
		d.logged[r.pid] = r.why
		log.Warn().Str("source", string(SourceProc)).Int("pid", r.pid).Str("why", r.why).
			Msg("process that looks like QEMU rejected by /proc discovery; not wiring it")
	}
	for pid := range d.logged {
		if !seen[pid] {
			delete(d.logged, pid)
		}
	}
	return found, nil
}

func (c ProcConfig) discover(procRoot, netnsDir string) ([]Sandbox, []procRejection, error) {
	c = c.withDefaults()
	netnsDir = filepath.Clean(netnsDir)
	nets, err := netnsByID(netnsDir)
	if err != nil {
		return nil, nil, err
	}
	if len(nets) == 0 {
		return nil, nil, nil
	}
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, nil, fmt.Errorf("discover QEMU: %w", err)
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	bins := trustedBinaries(c.Binaries)
	var rejected []procRejection
	byNetns := map[string]Sandbox{}
	for _, pid := range pids {
		dir := filepath.Join(procRoot, strconv.Itoa(pid))
		name, qmp, err := c.qemuProcess(dir, nets, bins)
		if err != nil {
			if !errors.Is(err, errNotQEMU) {
				rejected = append(rejected, procRejection{pid, err.Error()})
			}
			continue
		}
		if _, taken := byNetns[name]; taken {
			continue
		}
		byNetns[name] = Sandbox{ID: "proc-" + name, Netns: filepath.Join(netnsDir, name), QMP: qmp, PID: pid}
	}
	out := make([]Sandbox, 0, len(byNetns))
	for _, sb := range byNetns {
		out = append(out, sb)
	}
	slices.SortFunc(out, func(a, b Sandbox) int { return strings.Compare(a.ID, b.ID) })
	return out, rejected, nil
}

// trustedBinaries maps the identity of each configured binary that exists
// to its path. A missing one is simply not there to match.
func trustedBinaries(paths []string) map[nsID]string {
	bins := map[nsID]string{}
	for _, p := range paths {
		if id, err := nsIDOf(p); err == nil {
			bins[id] = p
		}
	}
	return bins
}

// netnsByID maps each namespace bound in dir to its file name (the first
// in name order when one namespace is bound twice). The host's namespace
// is left out even when bound there.
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
		k, id, err := inspectAt(fd, name, false)
		if err != nil || k != entryNetns || notHostNetns(id) != nil {
			continue
		}
		if _, dup := nets[id]; !dup {
			nets[id] = name
		}
	}
	return nets, nil
}

// errNotQEMU marks a process that does not even look like QEMU in one of
// the watched namespaces: not worth a log line.
var errNotQEMU = errors.New("not a QEMU in a watched netns")

// qemuProcess looks at the process in dir (/proc/<pid>): when it is a
// trusted QEMU in one of nets with a QMP unix socket under c.QMPDir, it
// returns the netns file name and the socket path. bins are the trusted
// binaries by identity.
func (c ProcConfig) qemuProcess(dir string, nets map[nsID]string, bins map[nsID]string) (netns, qmp string, err error) {
	raw, err := os.ReadFile(filepath.Join(dir, "cmdline"))
	if err != nil || len(raw) == 0 {
		return "", "", errNotQEMU // gone, not permitted, or a kernel thread
	}
	args := strings.Split(string(bytes.TrimSuffix(raw, []byte{0})), "\x00")
	if !looksLikeQEMU(args[0]) {
		return "", "", errNotQEMU
	}
	// Equivalent to: stat -L -c '%d %i' /proc/<pid>/ns/net
	id, err := nsIDOf(filepath.Join(dir, "ns", "net"))
	if err != nil {
		return "", "", errNotQEMU
	}
	netns, ok := nets[id]
	if !ok {
		return "", "", errNotQEMU
	}
	qmp, ok = qmpSocket(args)
	if !ok {
		return "", "", errNotQEMU
	}
	if err := checkExe(filepath.Join(dir, "exe"), bins); err != nil {
		return "", "", err
	}
	if err := checkUIDs(filepath.Join(dir, "status"), c.UIDs); err != nil {
		return "", "", err
	}
	if !filepath.IsAbs(qmp) {
		cwd, err := os.Readlink(filepath.Join(dir, "cwd"))
		if err != nil {
			return "", "", fmt.Errorf("QMP socket %q relative to an unreadable cwd: %w", qmp, err)
		}
		qmp = filepath.Join(cwd, qmp)
	}
	if err := socketUnder(c.QMPDir, qmp); err != nil {
		return "", "", err
	}
	return netns, qmp, nil
}

// looksLikeQEMU reports whether argv[0] names QEMU.
func looksLikeQEMU(argv0 string) bool {
	base := filepath.Base(argv0)
	return strings.HasPrefix(base, "qemu-system") || strings.HasPrefix(base, "qemu-kvm")
}

// checkExe returns an error unless exe (/proc/<pid>/exe, followed to the
// running executable's inode) is one of bins, owned by root and writable
// by no one but root.
func checkExe(exe string, bins map[nsID]string) error {
	// Equivalent to: stat -L -c '%d %i %u %g %a' /proc/<pid>/exe
	var st unix.Stat_t
	if err := unix.Stat(exe, &st); err != nil {
		return fmt.Errorf("executable %s: %w", exe, err)
	}
	bin, ok := bins[nsID{st.Dev, st.Ino}]
	if !ok {
		target, _ := os.Readlink(exe)
		return fmt.Errorf("executable %q is not a configured QEMU binary", target)
	}
	if st.Uid != 0 {
		return fmt.Errorf("QEMU binary %s is owned by uid %d, not root", bin, st.Uid)
	}
	if st.Mode&0o002 != 0 || (st.Mode&0o020 != 0 && st.Gid != 0) {
		return fmt.Errorf("QEMU binary %s is writable by others (mode %o, gid %d)", bin, st.Mode&0o7777, st.Gid)
	}
	return nil
}

// checkUIDs returns an error unless every uid of the process (real,
// effective, saved, filesystem; the Uid: line of /proc/<pid>/status) is
// root or one of allowed.
func checkUIDs(status string, allowed []uint32) error {
	raw, err := os.ReadFile(status)
	if err != nil {
		return fmt.Errorf("process status %s: %w", status, err)
	}
	if err := statusUIDsAllowed(string(raw), allowed); err != nil {
		return fmt.Errorf("process status %s: %w", status, err)
	}
	return nil
}

// statusUIDsAllowed is checkUIDs on the text of a status file.
func statusUIDsAllowed(raw string, allowed []uint32) error {
	for line := range strings.Lines(raw) {
		rest, ok := strings.CutPrefix(line, "Uid:")
		if !ok {
			continue
		}
		uids := strings.Fields(rest)
		if len(uids) == 0 {
			break
		}
		for _, f := range uids {
			uid, err := strconv.ParseUint(f, 10, 32)
			if err != nil {
				return fmt.Errorf("bad Uid line %q", strings.TrimSpace(line))
			}
			if uid != 0 && !slices.Contains(allowed, uint32(uid)) {
				return fmt.Errorf("process runs as uid %d, neither root nor a configured QEMU user", uid)
			}
		}
		return nil
	}
	return errors.New("no Uid line")
}

// socketUnder returns an error unless sock is under dir by name and, with
// symlinks resolved, still is: the directory holding it resolves to a
// place under dir resolved, and sock itself is a socket, not a symlink.
func socketUnder(dir, sock string) error {
	if err := UnderDir(dir, sock); err != nil {
		return fmt.Errorf("QMP socket: %w", err)
	}
	realDir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("QMP socket %s: QMP dir: %w", sock, err)
	}
	realParent, err := filepath.EvalSymlinks(filepath.Dir(sock))
	if err != nil {
		return fmt.Errorf("QMP socket %s: %w", sock, err)
	}
	if realParent != realDir {
		if err := UnderDir(realDir, realParent); err != nil {
			return fmt.Errorf("QMP socket %s leads out of %s through a symlink (to %s)", sock, dir, realParent)
		}
	}
	var st unix.Stat_t
	if err := unix.Lstat(sock, &st); err != nil {
		return fmt.Errorf("QMP socket %s: %w", sock, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("QMP socket %s: not a socket", sock)
	}
	return nil
}

// CheckQMPPeer returns an error unless the process listening at the other
// end of conn (a connected unix socket) is pid. The kernel records the
// listener's credentials when it calls listen(2) and hands them to each
// client at connect(2) (SO_PEERCRED), so this holds even before QEMU
// accepts the connection. Use it on the connection that will then carry
// QMP, so that nothing can swap the socket between check and use.
func CheckQMPPeer(conn *net.UnixConn, pid int) error {
	cred, err := peerCred(conn)
	if err != nil {
		return fmt.Errorf("QMP peer check: %w", err)
	}
	if pid <= 0 || int(cred.Pid) != pid {
		return fmt.Errorf("QMP socket %s is served by pid %d (uid %d), not by QEMU pid %d", conn.RemoteAddr(), cred.Pid, cred.Uid, pid)
	}
	return nil
}

// peerCred returns the credentials the kernel recorded for the listener
// at the other end of conn when it called listen(2).
func peerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		// Equivalent to: getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &ucred)
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if credErr != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	return cred, nil
}

// VerifyQMPPeer connects to the unix socket at path, checks with
// CheckQMPPeer that pid listens on it, and disconnects. It takes QEMU's
// single QMP client slot for a moment; prefer CheckQMPPeer on the
// connection that is kept.
func VerifyQMPPeer(path string, pid int) error {
	nc, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return fmt.Errorf("QMP peer check of %s: %w", path, err)
	}
	defer nc.Close()
	return CheckQMPPeer(nc.(*net.UnixConn), pid)
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
