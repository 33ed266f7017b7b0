package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const hmpBanner = "QEMU 7.2.22 monitor - type 'help' for more information\r\n" + hmpPrompt

// hmpEchoOf is QEMU 7.2's echo of line typed into HMP: its readline
// redraws the line after each character (TestHMPCaptured compares it with
// a capture).
func hmpEchoOf(line string) string {
	var b strings.Builder
	for i := 1; i <= len(line); i++ {
		b.WriteString(strings.Repeat("\x1b[D", i-1) + line[:i] + "\x1b[K")
	}
	return b.String() + "\r\n"
}

// fakeHMP is an HMP server on a unix socket: it sends banner to each
// client, and for each line received its echo (echo(line), hmpEchoOf
// when nil; "info version" always gets its true echo and an answer) and
// then what handle returns (the output and a prompt, usually: see
// answer), as QEMU's readline does. fds counts the fds that came in
// SCM_RIGHTS with the line.
type fakeHMP struct {
	fakeSocket
	banner string
	echo   func(line string) string
	handle func(line string, fds int) string
	lines  []string // every line received, guarded by mu
}

// answer is what QEMU sends after the echo: the output, then the prompt.
func answer(out string) string { return out + hmpPrompt }

func startFakeHMP(t *testing.T, handle func(line string, fds int) string) *fakeHMP {
	t.Helper()
	return serveFakeHMP(t, &fakeHMP{banner: hmpBanner, handle: handle})
}

// serveFakeHMP starts f at f.path, or in a new directory when f.path is
// "" (f.path may be too long for sun_path).
func serveFakeHMP(t *testing.T, f *fakeHMP) *fakeHMP {
	t.Helper()
	f.listen(t, "hmp.sock", f.serveConn)
	return f
}

func (f *fakeHMP) serveConn(conn *net.UnixConn) {
	if f.banner != "" {
		if _, err := conn.Write([]byte(f.banner)); err != nil {
			return
		}
	}
	var pending []byte
	fds := 0
	buf, oob := make([]byte, 4096), make([]byte, 256)
	for {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				got, _ := unix.ParseUnixRights(&m)
				for _, fd := range got {
					unix.Close(fd)
				}
				fds += len(got)
			}
		}
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			line := string(pending[:i])
			pending = pending[i+1:]
			f.mu.Lock()
			f.lines = append(f.lines, line)
			f.mu.Unlock()
			out := hmpEchoOf(line)
			switch {
			case line == "info version":
				out += answer("7.2.22Debian fake\r\n")
			case f.echo != nil:
				out = f.echo(line)
			}
			if line != "info version" && f.handle != nil {
				out += f.handle(line, fds)
			}
			fds = 0
			if _, err := conn.Write([]byte(out)); err != nil {
				return
			}
		}
	}
}

func (f *fakeHMP) received() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.lines)
}

func dialHMPT(t *testing.T, path string, opts Options) *Client {
	t.Helper()
	return dialWith(t, DialHMP, path, opts)
}

// hmpCapture is a reply captured from QEMU 7.2.22 (Debian 12) on an HMP
// unix socket: the line sent, and every byte up to the next prompt.
type hmpCapture struct {
	Line  string `json:"line"`
	Reply string `json:"reply"`
}

func readCapture(t testing.TB, name string) hmpCapture {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "hmp", name))
	if err != nil {
		t.Fatal(err)
	}
	var c hmpCapture
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestHMPEchoMatchesQEMU(t *testing.T) {
	c := readCapture(t, "info-cpus.json")
	echo := hmpEchoOf(c.Line)
	if !strings.HasPrefix(c.Reply, echo) {
		t.Fatalf("QEMU's echo of %q:\n%q\nthe fake's:\n%q", c.Line, c.Reply, echo)
	}
	// The echo is as long as hmpEchoMax says, give or take its slack.
	if n := len(echo); n > hmpEchoMax(len(c.Line)) || n < hmpEchoMax(len(c.Line))-4*len(c.Line)-16 {
		t.Errorf("echo of %d bytes, hmpEchoMax(%d) = %d", n, len(c.Line), hmpEchoMax(len(c.Line)))
	}
}

// The replies of QEMU 7.2 read as QMP's would.
func TestHMPCaptured(t *testing.T) {
	read := func(t *testing.T, name string) string {
		c := readCapture(t, name)
		out, err := readHMPReply(bufio.NewReader(strings.NewReader(c.Reply)), c.Line, MaxMessage)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return out
	}
	t.Run("banner", func(t *testing.T) {
		c := readCapture(t, "banner.json")
		out, err := readHMPOutput(bufio.NewReader(strings.NewReader(c.Reply)), hmpBannerMax)
		if err != nil || out != "QEMU 7.2.22 monitor - type 'help' for more information\r\n" {
			t.Errorf("banner = %q, %v", out, err)
		}
	})
	t.Run("info version", func(t *testing.T) {
		if v, ok := parseHMPVersion(read(t, "info-version.json")); v != "7.2.22" || !ok {
			t.Errorf("version %q, %v", v, ok)
		}
	})
	t.Run("info cpus", func(t *testing.T) {
		ret, err := hmpCPUs(read(t, "info-cpus.json"))
		if err != nil || string(ret) != `[{"cpu-index":0},{"cpu-index":1},{"cpu-index":2}]` {
			t.Errorf("hmpCPUs = %s, %v", ret, err)
		}
	})
	t.Run("info network", func(t *testing.T) {
		if ids := parseInfoNetwork(read(t, "info-network.json")); !slices.Equal(ids, []string{"tapsync-netdev1"}) {
			t.Errorf("netdevs %q", ids)
		}
	})
	t.Run("qom-get", func(t *testing.T) {
		out := read(t, "qom-get-type.json")
		ret, err := hmpCommands["qom-get"].result(out)
		if e := hmpError("qom-get", out, false); e != nil || err != nil || string(ret) != `"virtio-net-pci"` {
			t.Errorf("qom-get = %s, %v, %v", ret, err, e)
		}
	})
	for _, tc := range []struct {
		file, cmd string
		class     string
		desc      string
		notFound  bool
	}{
		{"device-del-missing.json", "device_del", ClassDeviceNotFound, "Device 'tapsync-net7' not found", true},
		{"netdev-del-missing.json", "netdev_del", ClassDeviceNotFound, "Device 'tapsync-netdev7' not found", true},
		{"qom-get-missing.json", "qom-get", ClassDeviceNotFound, "Device '/machine/peripheral/tapsync-net7' not found", true},
		{"device-add-bad-bus.json", "device_add", ClassGeneric, "Bus 'nobus' not found", false},
		{"netdev-add-duplicate.json", "netdev_add", ClassGeneric, `arguments refused (QEMU printed why on its stderr; for netdev_add, an id in use): Try "help netdev_add" for more information`, false},
		{"unknown-command.json", "bogus", ClassCommandNotFound, "unknown command: 'bogus'", false},
	} {
		t.Run(tc.file, func(t *testing.T) {
			out := read(t, tc.file)
			_, silent := hmpCommands[tc.cmd]
			silent = silent && hmpCommands[tc.cmd].result == nil
			e := hmpError(tc.cmd+" id=x", out, silent)
			if e == nil || e.Class != tc.class || e.Desc != tc.desc || IsNotFound(e) != tc.notFound {
				t.Fatalf("hmpError(%q) = %#v, want class %s, desc %q", out, e, tc.class, tc.desc)
			}
			if want := "hmp " + tc.cmd + " id=x: " + tc.class + ": " + tc.desc; e.Error() != want {
				t.Errorf("Error() = %q, want %q", e.Error(), want)
			}
		})
	}
}

func TestHMPErrorSilent(t *testing.T) {
	for _, tc := range []struct {
		out    string
		silent bool
		err    bool
	}{
		{"", true, false},
		{"warning: something odd\r\n", true, false},
		{"something odd\r\n", true, true},
		{"warning: x\r\nsomething odd\r\n", true, true},
		{"bus: main-system-bus\r\n", false, false},
		{"Error: Device 'x' not found\r\n", false, true},
	} {
		if e := hmpError("x", tc.out, tc.silent); (e != nil) != tc.err {
			t.Errorf("hmpError(%q, silent %v) = %v, want error %v", tc.out, tc.silent, e, tc.err)
		}
	}
}

// Every value on an HMP line is checked: HMP has no quoting.
func TestHMPLine(t *testing.T) {
	for _, tc := range []struct {
		cmd  string
		args any
		want string // the line, or the error's text
		bad  bool
	}{
		{"getfd", map[string]any{"fdname": "tapsync-fd3-0"}, "getfd tapsync-fd3-0", false},
		{"device_del", map[string]any{"id": "tapsync-net3"}, "device_del tapsync-net3", false},
		{"qom-get", map[string]any{"path": "/machine/peripheral/tapsync-net3", "property": "host_mtu"}, "qom-get /machine/peripheral/tapsync-net3 host_mtu", false},
		{"netdev_add", map[string]any{"type": "tap", "id": "tapsync-netdev3", "fds": "tapsync-fd3-0:tapsync-fd3-1", "vhost": true, "vhostfds": "a:b"},
			"netdev_add tap,id=tapsync-netdev3,fds=tapsync-fd3-0:tapsync-fd3-1,vhost=on,vhostfds=a:b", false},
		{"device_add", map[string]any{"driver": "virtio-net-pci", "id": "tapsync-net3", "netdev": "tapsync-netdev3", "mac": "02:00:00:00:00:03",
			"bus": "pci-bridge-0", "addr": "0x1e", "romfile": "", "host_mtu": 1400, "mq": true, "vectors": 6},
			"device_add virtio-net-pci,id=tapsync-net3,addr=0x1e,bus=pci-bridge-0,host_mtu=1400,mac=02:00:00:00:00:03,mq=on,netdev=tapsync-netdev3,romfile=,vectors=6", false},
		{"human-monitor-command", map[string]any{"command-line": "info qtree"}, "info qtree", false},
		{"query-cpus-fast", nil, "info cpus", false},
		// Run's raw JSON.
		{"device_del", json.RawMessage(`{"id": "tapsync-net3"}`), "device_del tapsync-net3", false},
		{"device_add", json.RawMessage(`{"driver": "virtio-rng-pci", "id": "rng0", "addr": 7}`), "device_add virtio-rng-pci,id=rng0,addr=7", false},

		{"device_add", map[string]any{"driver": "virtio-net-pci", "id": "tapsync-net3", "bus": "pci-bridge-0,addr=0x3"}, `bus "pci-bridge-0,addr=0x3" cannot go on an HMP command line: character ","`, true},
		{"device_add", map[string]any{"driver": "virtio-net-pci", "id": "tapsync-net3", "bus": "pci bridge"}, `bus "pci bridge" cannot go on an HMP command line: character " "`, true},
		{"device_del", map[string]any{"id": "a\nnetdev_del b"}, `id "a\nnetdev_del b" cannot go on an HMP command line: character "\n"`, true},
		{"device_del", map[string]any{"id": `"quoted"`}, `character "\""`, true},
		{"device_del", map[string]any{"id": "x\x1b[D"}, `character "\x1b"`, true},
		{"device_del", map[string]any{"id": "é"}, `character "\xc3"`, true},
		{"device_del", map[string]any{"id": "a=b"}, `character "="`, true},
		{"device_del", map[string]any{"id": ""}, `id "" cannot go on an HMP command line: empty`, true},
		{"device_del", map[string]any{}, `argument "id" missing`, true},
		{"device_del", map[string]any{"id": "x", "force": true}, `argument "force" has no HMP spelling here`, true},
		{"device_add", map[string]any{"driver": "x", "a,b": "c"}, `a,b "c" cannot go on an HMP command line: not an option name`, true},
		{"device_add", map[string]any{"driver": "x", "n": 1.5}, `a float64`, true},
		{"device_add", json.RawMessage(`{"driver": "x", "n": 1.5}`), `not a whole number`, true},
		{"device_add", map[string]any{"driver": "x", "l": []string{"a"}}, `a []string`, true},
		{"human-monitor-command", map[string]any{"command-line": "info  qtree"}, `command-line "" cannot go on an HMP command line: empty`, true},
		{"human-monitor-command", map[string]any{"command-line": "device_del a,b"}, `command-line "a,b"`, true},
		{"device_del", map[string]any{"id": strings.Repeat("a", hmpMaxLine)}, "longer than 1000", true},
	} {
		args, err := hmpArgs(tc.args)
		var line string
		if err == nil {
			line, err = hmpCommands[tc.cmd].line(args)
		}
		switch {
		case tc.bad && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s %v: line %q, err %v; want an error saying %q", tc.cmd, tc.args, line, err, tc.want)
		case !tc.bad && (err != nil || line != tc.want):
			t.Errorf("%s %v = %q, %v; want %q", tc.cmd, tc.args, line, err, tc.want)
		}
	}
}

// hmpFakeVM answers over HMP as QEMU 7.2 does for the commands RemoveNICs
// sends. Its guest acknowledges an unplug ack after device_del (never,
// when ack is zero).
type hmpFakeVM struct {
	ack time.Duration

	mu      sync.Mutex
	devices map[string]bool
	netdevs map[string]bool
	delAt   map[string]time.Time // when device_del was asked
}

func newHMPFakeVM(ack time.Duration, indexes ...int) *hmpFakeVM {
	v := &hmpFakeVM{ack: ack, devices: map[string]bool{}, netdevs: map[string]bool{}, delAt: map[string]time.Time{}}
	for _, i := range indexes {
		v.devices[DeviceID(i)], v.netdevs[NetdevID(i)] = true, true
	}
	return v
}

func (v *hmpFakeVM) handle(line string, _ int) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	for id, at := range v.delAt {
		if v.ack > 0 && time.Since(at) >= v.ack {
			delete(v.devices, id)
			delete(v.delAt, id)
		}
	}
	words := strings.Fields(line)
	notFound := func(what string) string { return answer("Error: Device '" + what + "' not found\r\n") }
	switch words[0] {
	case "device_del":
		if !v.devices[words[1]] {
			return notFound(words[1])
		}
		if _, ok := v.delAt[words[1]]; !ok {
			v.delAt[words[1]] = time.Now()
		}
	case "netdev_del":
		if !v.netdevs[words[1]] {
			return notFound(words[1])
		}
		delete(v.netdevs, words[1])
	case "qom-get":
		id, _ := strings.CutPrefix(words[1], peripheral+"/")
		if !v.devices[id] {
			return notFound(words[1])
		}
		return answer("\"virtio-net-pci\"\r\n")
	default:
		return answer("unknown command: '" + words[0] + "'\r\n")
	}
	return answer("")
}

func (v *hmpFakeVM) has(netdev string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.netdevs[netdev]
}

// Over HMP, with no DEVICE_DELETED, RemoveNICs asks until the device is
// gone, then deletes the netdev; a device that stays is pending after the
// wait, as over QMP.
func TestHMPRemoveNICsPolls(t *testing.T) {
	vm := newHMPFakeVM(200*time.Millisecond, 1, 2)
	f := startFakeHMP(t, vm.handle)
	c := dialHMPT(t, f.path, Options{})
	if c.Protocol() != ProtocolHMP || c.HasEvents() || c.Version() != "7.2.22" {
		t.Errorf("Protocol %q, HasEvents %v, Version %q", c.Protocol(), c.HasEvents(), c.Version())
	}
	ctx := context.Background()
	start := time.Now()
	errs := c.RemoveNICs(ctx, unplugs(false, 1, 2, 9), 10*time.Second)
	took := time.Since(start)
	for i, err := range errs {
		if err != nil {
			t.Errorf("NIC %d: %v", i, err)
		}
	}
	if took < 200*time.Millisecond || took > 5*time.Second { // it asked until the ack, not the whole wait
		t.Errorf("RemoveNICs took %s; the guest acknowledged after 200ms, the wait was 10s", took)
	}
	if vm.has(NetdevID(1)) || vm.has(NetdevID(2)) {
		t.Error("netdevs left after their devices went")
	}
	lines := f.received()
	if n := count(lines, "qom-get"); n < 2 {
		t.Errorf("%d qom-get: did it poll? %q", n, lines)
	}
	t.Logf("done after %s, %d commands", took.Round(time.Millisecond), len(lines))

	// A guest that never answers.
	vm2 := newHMPFakeVM(0, 3)
	f2 := startFakeHMP(t, vm2.handle)
	c2 := dialHMPT(t, f2.path, Options{})
	start = time.Now()
	err := c2.RemoveNIC(ctx, 3, 300*time.Millisecond)
	if !errors.Is(err, ErrRemovalPending) || !strings.Contains(err.Error(), "still there after 300ms") || !strings.Contains(err.Error(), f2.path) {
		t.Errorf("RemoveNIC = %v, want ErrRemovalPending naming %s", err, f2.path)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("RemoveNIC returned after %s, before the wait of 300ms", d)
	}
	if !vm2.has(NetdevID(3)) {
		t.Error("netdev deleted while the device is plugged")
	}
	// Asked before: checked, not waited for, device_del not repeated.
	before := count(f2.received(), "device_del")
	if err := c2.RemoveNICs(ctx, unplugs(true, 3), time.Hour)[0]; !errors.Is(err, ErrRemovalPending) {
		t.Errorf("RemoveNICs of a requested unplug = %v", err)
	}
	if n := count(f2.received(), "device_del"); n != before {
		t.Errorf("device_del repeated: %d, was %d", n, before)
	}
	// Removing twice succeeds.
	if err := c.RemoveNIC(ctx, 1, time.Second); err != nil {
		t.Errorf("second RemoveNIC: %v", err)
	}
}

// A reply that is not HMP, too large, or never ends kills the connection,
// within the deadline.
func TestHMPBadReplies(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply string                   // after the echo
		echo  func(line string) string // replaces the echo when set
		want  error                    // wrapped by the connection's Err, besides ErrClosed
		says  string
	}{
		{name: "garbled echo", echo: func(string) string { return "x\x1b[K\r\n" }, reply: answer(""), want: errNotHMP, says: `the echo of "device_del tapsync-net1" ends in`},
		{name: "echo without end", echo: func(string) string { return strings.Repeat("\x1b[D", 100_000) }, want: errNotHMP, says: "runs past"},
		{name: "oversized", reply: strings.Repeat("bus: x\r\n", MaxMessage/8+1) + hmpPrompt, want: ErrMessageTooLarge},
		{name: "no prompt", reply: "Error: stuck\r\n", want: context.DeadlineExceeded, says: "got no reply in time"},
		{name: "nothing", echo: func(string) string { return "" }, reply: "", want: context.DeadlineExceeded, says: "got no reply in time"},
		{name: "unasked output", reply: answer("") + "surprise", says: "while no command was waiting"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := serveFakeHMP(t, &fakeHMP{banner: hmpBanner, echo: tc.echo, handle: func(string, int) string { return tc.reply }})
			c := dialHMPT(t, f.path, Options{Timeout: 500 * time.Millisecond})
			start := time.Now()
			_, err := c.run(context.Background(), "device_del", "id=tapsync-net1", map[string]any{"id": "tapsync-net1"}, nil)
			if tc.name == "unasked output" {
				if err != nil {
					t.Fatalf("the command itself: %v", err)
				}
				waitClosed(t, c.Done(), 5*time.Second, "Done() after output nobody asked for")
				err = c.Err()
			}
			if d := time.Since(start); d > 5*time.Second { // a hang, not a speed target
				t.Errorf("took %s with a 500ms timeout", d)
			}
			if !errors.Is(err, ErrClosed) || (tc.want != nil && !errors.Is(err, tc.want) && !errors.Is(c.Err(), tc.want)) ||
				!strings.Contains(err.Error()+" "+c.Err().Error(), tc.says) {
				t.Fatalf("err = %v (connection: %v); want ErrClosed and %v, saying %q", err, c.Err(), tc.want, tc.says)
			}
			waitClosed(t, c.Done(), time.Second, "Done()")
			if _, err := c.run(context.Background(), "device_del", "", map[string]any{"id": "x"}, nil); !errors.Is(err, ErrClosed) {
				t.Errorf("a command after: %v, want ErrClosed", err)
			}
			t.Log(c.Err())
		})
	}
}

func TestDialHMPBadServers(t *testing.T) {
	for _, tc := range []struct {
		name, banner string
		want         string
		is           error
	}{
		{name: "no banner", banner: "", want: "another client probably holds the monitor", is: ErrNoGreeting},
		{name: "a QMP socket", banner: greetingOOB + "\n", want: "not an HMP monitor: it sent"},
		{name: "a QMP socket, prompt and all", banner: greetingOOB + "\n(qemu) ", want: "not an HMP monitor"},
		{name: "endless banner", banner: strings.Repeat("x", 2*hmpBannerMax), want: ErrMessageTooLarge.Error(), is: ErrMessageTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := serveFakeHMP(t, &fakeHMP{banner: tc.banner})
			start := time.Now()
			c, err := DialHMP(context.Background(), f.path, Options{Timeout: 500 * time.Millisecond})
			if err == nil {
				c.Close()
				t.Fatal("DialHMP succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), f.path) || (tc.is != nil && !errors.Is(err, tc.is)) {
				t.Errorf("DialHMP = %v, want an error naming %s saying %q", err, f.path, tc.want)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("DialHMP took %s with a 500ms timeout", d)
			}
		})
	}
}

// CheckConn vets the socket before a byte is read or written.
func TestDialHMPCheckConn(t *testing.T) {
	f := startFakeHMP(t, nil)
	refused := errors.New("not the listener we want")
	var checked bool
	_, err := DialHMP(context.Background(), f.path, Options{CheckConn: func(c *net.UnixConn) error {
		checked = true
		return refused
	}})
	if !checked || !errors.Is(err, refused) || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("DialHMP = %v, want refused by CheckConn", err)
	}
	if lines := f.received(); len(lines) != 0 {
		t.Errorf("sent %q before CheckConn refused", lines)
	}
	c := dialHMPT(t, f.path, Options{CheckConn: func(*net.UnixConn) error { return nil }})
	if c.Version() != "7.2.22" {
		t.Errorf("Version = %q", c.Version())
	}
}

// The go-qemu Monitor interface over HMP: Run for the commands spelled in
// HMP, a clear error for the rest and for Events.
func TestHMPMonitor(t *testing.T) {
	f := startFakeHMP(t, func(line string, _ int) string {
		if line == "qom-get /machine/peripheral/tapsync-net1 mq" {
			return answer("true\r\n")
		}
		return answer("unknown command: '" + line + "'\r\n")
	})
	c := dialHMPT(t, f.path, Options{})
	out, err := c.Run([]byte(`{"execute": "qom-get", "arguments": {"path": "/machine/peripheral/tapsync-net1", "property": "mq"}}`))
	if err != nil || string(out) != `{"return":true}` {
		t.Errorf("Run(qom-get) = %s, %v", out, err)
	}
	if _, err := c.Run([]byte(`{"execute": "query-status"}`)); !errors.Is(err, errors.ErrUnsupported) || !strings.Contains(err.Error(), "query-status") {
		t.Errorf("Run(query-status) = %v, want ErrUnsupported", err)
	}
	if _, err := c.Events(context.Background()); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Events = %v, want ErrUnsupported", err)
	}
	var e *Error
	if _, err := c.run(context.Background(), "human-monitor-command", "", map[string]any{"command-line": "info nothing"}, nil); !errors.As(err, &e) || e.Class != ClassCommandNotFound {
		t.Errorf("unknown command: %v", err)
	}
	if lines := f.received(); slices.Contains(lines, "query-status") {
		t.Errorf("sent %q", lines)
	}
}

// Commands from many goroutines go one at a time, each answered with its
// own reply.
func TestHMPConcurrentCommands(t *testing.T) {
	f := startFakeHMP(t, func(line string, _ int) string {
		return answer(fmt.Sprintf("%q\r\n", strings.Fields(line)[2]))
	})
	c := dialHMPT(t, f.path, Options{})
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			prop := fmt.Sprintf("p%d", i)
			var got string
			if err := c.qomGet(context.Background(), "/machine/peripheral/x", prop, &got); err != nil || got != prop {
				t.Errorf("qom-get %s = %q, %v", prop, got, err)
			}
		}()
	}
	wg.Wait()
	if n := c.Commands(); n != 20 {
		t.Errorf("Commands() = %d, want 20", n)
	}
}

// getfd carries its fd in SCM_RIGHTS with the line.
func TestHMPGetFD(t *testing.T) {
	var mu sync.Mutex
	got := map[string]int{}
	f := startFakeHMP(t, func(line string, fds int) string {
		mu.Lock()
		got[line] = fds
		mu.Unlock()
		return answer("")
	})
	c := dialHMPT(t, f.path, Options{})
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := c.getFD(context.Background(), "tapsync-fd3-0", r); err != nil {
		t.Fatal(err)
	}
	if _, err := c.run(context.Background(), "closefd", "", map[string]any{"fdname": "tapsync-fd3-0"}, nil); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if got["getfd tapsync-fd3-0"] != 1 || got["closefd tapsync-fd3-0"] != 0 {
		t.Errorf("fds per line: %v", got)
	}
}

// A socket whose path is longer than sun_path is dialled through its
// directory, over both protocols.
func TestDialLongPath(t *testing.T) {
	dir := longDir(t)
	f := serveFakeHMP(t, &fakeHMP{fakeSocket: fakeSocket{path: filepath.Join(dir, "debug-monitor.sock")}, banner: hmpBanner})
	if len(f.path) <= maxSunPath {
		t.Fatalf("path of %d bytes is not too long", len(f.path))
	}
	c := dialHMPT(t, f.path, Options{})
	if c.Path() != f.path {
		t.Errorf("Path() = %q", c.Path())
	}

	qmpPath := filepath.Join(dir, "qmp.sock")
	ln := listenUnix(t, qmpPath)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.Write([]byte(greetingOOB + "\n"))
		dec := json.NewDecoder(conn)
		var cmd fakeCommand
		if dec.Decode(&cmd) == nil {
			conn.Write([]byte(withID(`{"return": {}}`, cmd.ID) + "\n"))
		}
		dec.Decode(&cmd)
	}()
	t.Cleanup(func() { ln.Close() })
	q := dialT(t, qmpPath, Options{})
	if q.Protocol() != ProtocolQMP || !q.HasEvents() {
		t.Errorf("Protocol %q, HasEvents %v", q.Protocol(), q.HasEvents())
	}

	// Too long even through /proc: a clear error.
	long := filepath.Join(dir, strings.Repeat("s", 100))
	if _, err := DialHMP(context.Background(), long, Options{}); err == nil || !strings.Contains(err.Error(), "too long") {
		t.Errorf("DialHMP(%d-byte name) = %v", 100, err)
	}
	if _, err := Dial(context.Background(), filepath.Join(dir, "missing.sock"), Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Dial of a missing long path = %v, want ENOENT", err)
	}
}

// longDir makes a directory whose path is longer than a socket address,
// like a Kata bundle dir (~117 bytes).
func longDir(t *testing.T) string {
	t.Helper()
	base, err := os.MkdirTemp("", "hmplong")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	dir := filepath.Join(base, "run", "containerd", "io.containerd.runtime.v2.task", "k8s.io",
		"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// FuzzHMPReply feeds bytes to the HMP reply reader as if QEMU sent them
// after the line: no panic, the caps hold, the output never holds a
// prompt, and a reply QEMU could send reads back whole.
func FuzzHMPReply(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "hmp", "*.json"))
	for _, name := range files {
		c := readCapture(f, filepath.Base(name))
		if len(c.Reply) <= 16<<10 {
			f.Add(c.Line, []byte(c.Reply))
		}
	}
	f.Add("info cpus", []byte(hmpEchoOf("info cpus")+"(qemu) x\r\n(qemu) "))
	f.Add("x", []byte("x\x1b[K\r\n\r\n(qemu)"))
	const limit = 4 << 10
	f.Fuzz(func(t *testing.T, line string, data []byte) {
		if line == "" || len(line) > 200 || strings.ContainsAny(line, "\n") { // lines are never empty
			return
		}
		r := bytes.NewReader(data)
		br := bufio.NewReader(r)
		out, err := readHMPReply(br, line, limit)
		if read := len(data) - r.Len() - br.Buffered(); read > hmpEchoMax(len(line))+limit+len(hmpPrompt) {
			t.Fatalf("read %d bytes for a reply to a %d-byte line with a cap of %d", read, len(line), limit)
		}
		if err == nil {
			if len(out) > limit {
				t.Fatalf("output of %d bytes passed a cap of %d", len(out), limit)
			}
			if strings.HasPrefix(out, hmpPrompt) || strings.Contains(out, "\n"+hmpPrompt) {
				t.Fatalf("output %q holds a prompt", out)
			}
			hmpError("x", out, true)
			hmpCPUs(out)
			parseHMPVersion(out)
		}
		// What QEMU would send for output data reads back as data.
		s := string(data)
		if len(s) > limit || strings.HasPrefix(s, hmpPrompt) || strings.Contains(s, "\n"+hmpPrompt) || (s != "" && !strings.HasSuffix(s, "\n")) {
			return
		}
		got, err := readHMPReply(bufio.NewReader(strings.NewReader(hmpEchoOf(line)+s+hmpPrompt)), line, limit)
		if err != nil || got != s {
			t.Fatalf("reply %q to %q read as %q, %v", s, line, got, err)
		}
	})
}
