package watcher

import (
	"encoding/binary"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// The fuzz targets cover what a pod controls: a netns path in an OCI spec
// (InDir, UnderDir) and a process's command line and status (/proc
// discovery). Their seeds run with go test; `go test -fuzz=FuzzX
// ./watcher` explores further.

func FuzzInDir(f *testing.F) {
	for _, s := range [][2]string{
		{"/var/run/netns", "/var/run/netns/cni-1234"},
		{"/var/run/netns/", "/var/run/netns/x/../cni-1234"},
		{"/var/run/netns", "/var/run/netns/../netns2/x"},
		{"/var/run/netns", "/var/run/netns/.."},
		{"/var/run/netns", "/run/netns/a"},
		{"", ""},
		{"/", "/a"},
		{"a", "a/b"},
		{"/var/run/netns", "/var/run/netns/a\x00b"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, dir, path string) {
		if InDir(dir, path) != nil {
			return
		}
		p, d := filepath.Clean(path), filepath.Clean(dir)
		name := filepath.Base(p)
		if filepath.Join(d, name) != p || !safeName(name) || name == ".." {
			t.Errorf("InDir(%q, %q) accepted a path that is not a plain file directly in the dir", dir, path)
		}
	})
}

func FuzzUnderDir(f *testing.F) {
	for _, s := range [][2]string{
		{"/run/vc/vm", "/run/vc/vm/abc/qmp.sock"},
		{"/run/vc/vm", "/run/vc/vm/a/../b/qmp.sock"},
		{"/run/vc/vm", "/run/vc/vm/../x.sock"},
		{"/run/vc/vm", "/run/vc/vmx"},
		{"/", "/x"},
		{"/", "/"},
		{"", "/x"},
		{"run", "run/x"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, dir, path string) {
		if UnderDir(dir, path) != nil {
			return
		}
		p, d := filepath.Clean(path), filepath.Clean(dir)
		rel, err := filepath.Rel(d, p)
		if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) || !filepath.IsAbs(p) {
			t.Errorf("UnderDir(%q, %q) accepted a path outside the dir (rel %q, %v)", dir, path, rel, err)
		}
	})
}

// FuzzQMPSocket feeds /proc/<pid>/cmdline contents (NUL-separated argv)
// to the parser that finds a QEMU's QMP socket.
func FuzzQMPSocket(f *testing.F) {
	for _, args := range []string{
		"-qmp unix:/run/a.sock,server=on,wait=off",
		"-qmp unix:/run/a,,b.sock,server,nowait",
		"--qmp unix:path=/run/a.sock,server=on",
		"-chardev socket,id=q,path=/run/q.sock,server=on -mon q,mode=control",
		"-mon chardev=q,mode=control -chardev socket,id=q,path=/run/q.sock,server=on",
		"-chardev socket,id=q,path=/run/q.sock,server=on -qmp chardev:q",
		"-qmp",
		"-qmp unix:,server",
		"-chardev ,,,=,,= -mon =,,",
		"-qmp unix:=",
		"",
	} {
		f.Add([]byte("qemu-system-x86_64\x00" + strings.ReplaceAll(args, " ", "\x00") + "\x00"))
	}
	f.Fuzz(func(t *testing.T, cmdline []byte) {
		args := strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00")
		sock, ok := qmpSocket(args)
		if ok && sock == "" {
			t.Errorf("qmpSocket(%q) = \"\", true", args)
		}
		if !ok && sock != "" {
			t.Errorf("qmpSocket(%q) = %q, false", args, sock)
		}
		for _, a := range args {
			parseQemuOpts(a, "path")
			parseQemuOpts(a, "")
		}
	})
}

// FuzzStatusUIDs feeds /proc/<pid>/status contents to the uid check.
func FuzzStatusUIDs(f *testing.F) {
	for _, s := range []string{
		"Name:\tqemu\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n",
		"Uid:\t1000\t0\t0\t0\n",
		"Uid:\t0\t4294967296\t0\t0\n",
		"Uid:\t-1\n",
		"Uid:\n",
		"Uid:0 0 0 0",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, status string) {
		if statusUIDsAllowed(status, nil) != nil {
			return
		}
		// Accepted with no other user allowed: the first Uid line must
		// hold nothing but zeros.
		for line := range strings.Lines(status) {
			if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
				for _, f := range strings.Fields(rest) {
					if strings.Trim(f, "0+") != "" {
						t.Errorf("status %q accepted as root with uid field %q", status, f)
					}
				}
				return
			}
		}
		t.Errorf("status %q without a Uid line accepted", status)
	})
}

// FuzzNetlinkMessage reads a netlink message as the watcher does, from
// any netns a pod owns (a pod names its links and addresses): no panic, a
// description for every change, and a deletion reported only for an
// RTM_DELLINK, with the ifindex at its place in the ifinfomsg.
func FuzzNetlinkMessage(f *testing.F) {
	link := make([]byte, unix.SizeofIfInfomsg)
	binary.NativeEndian.PutUint32(link[4:], 7)
	name := append(binary.NativeEndian.AppendUint16(binary.NativeEndian.AppendUint16(nil, 9), unix.IFLA_IFNAME), "eth0\x00"...)
	for _, s := range []struct {
		typ  uint16
		data []byte
	}{
		{unix.RTM_DELLINK, append(slices.Clone(link), name...)},
		{unix.RTM_NEWLINK, link},
		{unix.RTM_DELLINK, append([]byte{unix.AF_BRIDGE}, link[1:]...)},
		{unix.RTM_NEWADDR, make([]byte, 8)},
		{unix.RTM_DELROUTE, make([]byte, 12)},
		{unix.RTM_NEWTFILTER, make([]byte, 20)},
		{unix.RTM_NEWACTION, make([]byte, 4)},
	} {
		f.Add(s.typ, s.data)
	}
	f.Fuzz(func(t *testing.T, typ uint16, data []byte) {
		m := syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: typ}, Data: data}
		why, ok := describeMessage(m)
		if ok && why == "" {
			t.Errorf("type %d: a change with no description", typ)
		}
		// Home's nsid notices go through the same attribute parser.
		nsidAttr(m)
		gone := deletedLink(m)
		switch {
		case gone < 0:
			t.Errorf("type %d: deleted ifindex %d", typ, gone)
		case gone > 0 && (typ != unix.RTM_DELLINK || data[0] != unix.AF_UNSPEC ||
			int32(binary.NativeEndian.Uint32(data[4:8])) != int32(gone)):
			t.Errorf("type %d, %x: deletion of ifindex %d reported", typ, data, gone)
		}
		// What the message outdates of the netns's filters: its link's,
		// every link's, or (an address, a route) none.
		switch stale := tcStale(m); {
		case stale == 0 || stale == TCStaleAll:
		case stale < 0 || len(data) < 8 || int32(binary.NativeEndian.Uint32(data[4:8])) != int32(stale):
			t.Errorf("type %d, %x: filters of link %d outdated", typ, data, stale)
		}
		if why == "" && tcStale(m) != 0 && typ != unix.RTM_NEWACTION && typ != unix.RTM_DELACTION {
			t.Errorf("type %d: no event, yet filters outdated", typ)
		}
	})
}
