package main

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/state"
)

const hexID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

var testSettings = settings{qemu: "/usr/bin/qemu-system-x86_64", dir: "/run/tapsync/qmp"}

// ours is the pair planArgs appends for sandbox id with testSettings.
func ours(id string) []string {
	return []string{"-qmp", "unix:/run/tapsync/qmp/" + id + ".sock,server=on,wait=off"}
}

// goRuntimeArgs is the shape of the Kata Go runtime's QEMU command line
// (govmm): -name first, -qmp unix:path=…, fds passed as extra files.
func goRuntimeArgs(id, name string) []string {
	vm := "/run/vc/vm/" + id
	return []string{
		"-name", name,
		"-uuid", "c4c2d2a6-1f14-4b6e-9f7a-3f1c6a7e0d11",
		"-machine", "q35,accel=kvm",
		"-cpu", "host,pmu=off",
		"-qmp", "unix:path=" + vm + "/qmp.sock,server=on,wait=off",
		"-m", "2048M,slots=10,maxmem=16384M",
		"-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
		"-device", "virtio-serial-pci,disable-modern=false,id=serial0",
		"-device", "virtconsole,chardev=charconsole0,id=console0",
		"-chardev", "socket,id=charconsole0,path=" + vm + "/console.sock,server=on,wait=off",
		"-device", "virtio-scsi-pci,id=scsi0,disable-modern=false",
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-pci,rng=rng0",
		"-device", "vhost-vsock-pci,disable-modern=false,vhostfd=3,id=vsock-1234,guest-cid=1234",
		"-chardev", "socket,id=char-5f0e,path=" + vm + "/vhost-fs.sock",
		"-device", "vhost-user-fs-pci,chardev=char-5f0e,tag=kataShared,queue-size=1024",
		"-netdev", "tap,id=network-0,vhost=on,vhostfds=4,fds=5",
		"-device", "driver=virtio-net-pci,netdev=network-0,mac=02:42:ac:11:00:02,disable-modern=false,mq=on,vectors=4",
		"-rtc", "base=utc,driftfix=slew,clock=host",
		"-global", "kvm-pit.lost_tick_policy=discard",
		"-vga", "none",
		"-no-user-config", "-nodefaults", "-nographic", "--no-reboot",
		"-object", "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on",
		"-numa", "node,memdev=dimm1",
		"-kernel", "/opt/kata/share/kata-containers/vmlinux.container",
		"-append", "tsc=reliable no_timer_check rcupdate.rcu_expedited=1 console=hvc0 quiet systemd.show_status=false panic=1 nr_cpus=4 -name sandbox-other",
		"-pidfile", vm + "/pid",
		"-smp", "1,cores=1,threads=1,sockets=4,maxcpus=4",
	}
}

// rustRuntimeArgs is the shape of Kata runtime-rs's: the QMP socket passed
// as fd 3 (bound by the shim), the HMP debug monitor relative to the
// bundle dir.
func rustRuntimeArgs(id string) []string {
	return []string{
		"-name", "sandbox-" + id,
		"-kernel", "/opt/kata/share/kata-containers/vmlinux.container",
		"-append", "console=hvc0 agent.log_vport=1025",
		"-smp", "1,maxcpus=4",
		"-machine", "q35,accel=kvm,nvdimm=on",
		"-cpu", "host,pmu=off",
		"-m", "2048M,slots=10,maxmem=16384M",
		"-qmp", "unix:fd=3,server=on,wait=off",
		"-monitor", "unix:path=debug-monitor.sock,server=on,wait=off",
		"-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2",
		"-device", "vhost-vsock-pci,disable-modern=false,vhostfd=4,id=vsock-4,guest-cid=4",
		"-no-user-config", "-nodefaults", "-nographic", "-no-reboot",
	}
}

func TestPlanArgs(t *testing.T) {
	long := strings.Repeat("a", 200)
	badID := func(id string) string {
		return warnPrefix + "sandbox id " + quote(id) + ": want 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit"
	}
	nameOnly := func(v string) []string { return []string{"-name", v, "-S"} }
	for _, tc := range []struct {
		name  string
		args  []string
		s     settings
		fsErr error
		add   string // sandbox id whose monitor is added; "" for args unchanged
		line  string // the stderr line, exactly
	}{
		{name: "kata go runtime", args: goRuntimeArgs(hexID, "sandbox-"+hexID), add: hexID},
		{name: "kata go runtime, debug", args: goRuntimeArgs(hexID, "sandbox-"+hexID+",debug-threads=on"), add: hexID},
		{name: "kata go runtime, old -qmp unix:PATH", args: []string{"-name", "sandbox-" + hexID, "-qmp", "unix:/run/vc/vm/" + hexID + "/qmp.sock,server=on,wait=off", "-pidfile", "/run/vc/vm/" + hexID + "/pid"}, add: hexID},
		{name: "kata runtime-rs", args: rustRuntimeArgs("f00d-1.2_x"), add: "f00d-1.2_x"},
		{name: "name with options", args: nameOnly("sandbox-abc,debug-threads=on,process=qemu"), add: "abc"},
		{name: "guest=", args: nameOnly("guest=sandbox-abc"), add: "abc"},
		{name: "guest= with options", args: nameOnly("guest=sandbox-abc,debug-threads=on"), add: "abc"},
		{name: "last guest wins", args: nameOnly("sandbox-abc,guest=sandbox-def"), add: "def"},
		{name: "--name", args: []string{"--name", "sandbox-abc"}, add: "abc"},
		{name: "flags before -name", args: []string{"-S", "-nodefaults", "--no-reboot", "-daemonize", "-name", "sandbox-abc"}, add: "abc"},
		{name: "id of 85, the longest for the default dir", args: nameOnly("sandbox-" + long[:85]), add: long[:85]},
		{name: "id of 128, valid but too long for sun_path", args: nameOnly("sandbox-" + long[:128]),
			line: warnPrefix + "socket path /run/tapsync/qmp/" + long[:128] + ".sock is 150 bytes; sun_path holds 107"},

		{name: "no -name", args: []string{"-machine", "q35", "-S", "-qmp", "unix:/tmp/x.sock,server=on,wait=off"}},
		{name: "no args", args: nil},
		{name: "not a kata vm", args: nameOnly("myvm")},
		{name: "not a kata vm, guest=", args: nameOnly("guest=myvm,debug-threads=on")},
		{name: "-name without value", args: []string{"-S", "-name"}},
		{name: "-name as another option's value", args: []string{"-append", "-name", "sandbox-abc"}},
		{name: "-name as a disk image", args: []string{"-S", "sandbox-abc", "-name"}},

		{name: "id ../x", args: nameOnly("sandbox-../x"), line: badID("../x")},
		{name: "id empty", args: nameOnly("sandbox-"), line: badID("")},
		{name: "id empty, with options", args: nameOnly("sandbox-,debug-threads=on"), line: badID("")},
		{name: "id of 200", args: nameOnly("sandbox-" + long), line: badID(long)},
		{name: "id of 129", args: nameOnly("sandbox-" + long[:129]), line: badID(long[:129])},
		{name: "id with a comma", args: nameOnly("sandbox-a,,b"), line: badID("a,b")},
		{name: "id with a space", args: nameOnly("sandbox-a b"), line: badID("a b")},
		{name: "id with a NUL", args: nameOnly("sandbox-a\x00b"), line: badID("a\x00b")},
		{name: "id with a newline", args: nameOnly("sandbox-a\nb"), line: badID("a\nb")},
		{name: "id starting with a dot", args: nameOnly("sandbox-.x"), line: badID(".x")},
		{name: "id starting with a dash", args: nameOnly("sandbox--x"), line: badID("-x")},
		{name: "id with a slash", args: nameOnly("sandbox-a/b"), line: badID("a/b")},

		{name: "-name twice", args: []string{"-name", "sandbox-abc", "-name", "sandbox-abc"}, line: warnPrefix + "-name given 2 times"},
		{name: "-name twice, one kata", args: []string{"-name", "other", "-name", "sandbox-abc"}, line: warnPrefix + "-name given 2 times"},
		{name: "ours already there", args: append(nameOnly("sandbox-abc"), ours("abc")...)},
		{name: "ours already there, path=", args: []string{"-qmp", "unix:path=/run/tapsync/qmp/abc.sock,server=on", "-name", "sandbox-abc"}},
		{name: "our path in another option", args: []string{"-name", "sandbox-abc", "-chardev", "socket,id=c,path=/run/tapsync/qmp/abc.sock,server=on"},
			line: warnPrefix + `socket path /run/tapsync/qmp/abc.sock is already named by argument "socket,id=c,path=/run/tapsync/qmp/abc.sock,server=on"`},
		{name: "path too long", args: nameOnly("sandbox-" + hexID), s: settings{qemu: "/q", dir: "/run/" + strings.Repeat("d", 33)},
			line: warnPrefix + "socket path /run/" + strings.Repeat("d", 33) + "/" + hexID + ".sock is 108 bytes; sun_path holds 107"},
		{name: "path just fits", args: nameOnly("sandbox-" + hexID), s: settings{qemu: "/q", dir: "/run/" + strings.Repeat("d", 32)}, add: hexID},
		{name: "config ignored", args: nameOnly("sandbox-abc"), s: settings{qemu: "/q", dir: defaultDir, confErr: errors.New("config /x.conf ignored: owned by uid 1000, not root")},
			line: warnPrefix + "config /x.conf ignored: owned by uid 1000, not root"},
		{name: "socket check fails", args: nameOnly("sandbox-abc"), fsErr: errors.New("socket dir /run/tapsync/qmp: is a symlink"),
			line: warnPrefix + "socket dir /run/tapsync/qmp: is a symlink"},

		{name: "--version", args: []string{"--version", "-name", "sandbox-abc"}},
		{name: "-version", args: []string{"-name", "sandbox-abc", "-version"}},
		{name: "-help", args: []string{"-name", "sandbox-abc", "-help"}},
		{name: "-h", args: []string{"-h"}},
		{name: "--help", args: []string{"--help"}},
		{name: "-machine help", args: []string{"-name", "sandbox-abc", "-machine", "help"}},
		{name: "-M ?", args: []string{"-name", "sandbox-abc", "-M", "?"}},
		{name: "-device help", args: []string{"-name", "sandbox-abc", "-device", "help"}},
		{name: "-device e1000,help", args: []string{"-name", "sandbox-abc", "-device", "e1000,help"}},
		{name: "-cpu help", args: []string{"-name", "sandbox-abc", "-cpu", "help"}},
		{name: "-name help", args: []string{"-name", "help"}},
		{name: "help as a kernel parameter", args: []string{"-name", "sandbox-abc", "-append", "help"}, add: "abc"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.s
			if s.qemu == "" {
				s = testSettings
			}
			check := func(dir, sock string) error {
				if tc.add != "" && (dir != s.dir || sock != s.dir+"/"+tc.add+".sock") {
					t.Errorf("checked dir %q sock %q", dir, sock)
				}
				return tc.fsErr
			}
			in := slices.Clone(tc.args)
			out, line := planArgs(tc.args, s, check)
			if !slices.Equal(tc.args, in) {
				t.Fatalf("input changed: %q", tc.args)
			}
			want := in
			if tc.add != "" {
				want = append(slices.Clone(in), "-qmp", "unix:"+s.dir+"/"+tc.add+".sock,server=on,wait=off")
			}
			if !slices.Equal(out, want) {
				t.Errorf("args:\n got %q\nwant %q", out, want)
			}
			if line != tc.line {
				t.Errorf("line:\n got %q\nwant %q", line, tc.line)
			}
			// A second wrapper in a chain (or a second look) adds nothing.
			if again, line := planArgs(out, s, check); !slices.Equal(again, out) || tc.line == "" && line != "" {
				t.Errorf("second pass: %q, %q", again, line)
			}
		})
	}
}

// TestValidIDIsStateRule keeps validID the rule of state.ValidID.
func TestValidIDIsStateRule(t *testing.T) {
	for _, id := range []string{
		"", "a", "0", hexID, strings.Repeat("a", 128), strings.Repeat("a", 129),
		"a.b-c_d", ".a", "-a", "_a", "a/b", "a b", "a,b", "a\x00", "é", "a\n", "A9",
	} {
		if got, want := validID(id), state.ValidID(id) == nil; got != want {
			t.Errorf("validID(%q) = %v, state.ValidID says %v", id, got, want)
		}
	}
}

func TestGuestName(t *testing.T) {
	for _, tc := range []struct {
		v, name string
		ok      bool
	}{
		{"vm", "vm", true},
		{"vm,debug-threads=on", "vm", true},
		{"guest=vm", "vm", true},
		{"guest=vm,,x", "vm,x", true},
		{"vm,,x=y", "vm,x=y", true},
		{"debug-threads=on", "", false},
		{"vm,guest=other", "other", true},
		{"", "", true},
	} {
		name, ok := guestName(tc.v)
		if name != tc.name || ok != tc.ok {
			t.Errorf("guestName(%q) = %q, %v; want %q, %v", tc.v, name, ok, tc.name, tc.ok)
		}
	}
}
