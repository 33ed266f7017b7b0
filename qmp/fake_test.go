package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const greetingOOB = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}`

// fakeCommand is a command as a fake server received it.
type fakeCommand struct {
	Execute   string          `json:"execute"`
	Arguments map[string]any  `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

// fakeServer is a QMP server on a unix socket that sends greeting (a raw
// line, or nothing when empty) to each client and answers each command with
// the raw lines handle returns: events and a reply, or nothing at all. Like
// QEMU it copies the command's id into replies (JSON objects without
// "event" and without an "id" of their own); other lines go out verbatim.
// qmp_capabilities is answered by default.
type fakeServer struct {
	fakeSocket
	greeting string
	handle   func(cmd fakeCommand) []string
}

func startFake(t *testing.T, greeting string, handle func(cmd fakeCommand) []string) *fakeServer {
	t.Helper()
	f := &fakeServer{greeting: greeting, handle: handle}
	f.listen(t, "qmp.sock", f.serveConn)
	return f
}

func (f *fakeServer) serveConn(conn *net.UnixConn) {
	w := bufio.NewWriter(conn)
	send := func(lines []string) bool {
		for _, l := range lines {
			w.WriteString(l + "\n")
		}
		return w.Flush() == nil
	}
	if f.greeting != "" && !send([]string{f.greeting}) {
		return
	}
	dec := json.NewDecoder(conn)
	for {
		var cmd fakeCommand
		if err := dec.Decode(&cmd); err != nil {
			return
		}
		var lines []string
		if f.handle != nil {
			lines = f.handle(cmd)
		}
		if lines == nil && cmd.Execute == "qmp_capabilities" {
			lines = []string{`{"return": {}}`}
		}
		for i, l := range lines {
			lines[i] = withID(l, cmd.ID)
		}
		if !send(lines) {
			return
		}
	}
}

// fakeSocket is where a fake monitor (fakeServer, fakeHMP) listens. Like
// QEMU's monitor it serves one client at a time; every connection it
// accepted is closed when the test ends.
type fakeSocket struct {
	path  string
	ln    *net.UnixListener
	mu    sync.Mutex // guards conns, and the state of the fake it is part of
	conns []net.Conn
	wg    sync.WaitGroup
}

// listen serves at s.path, or at name in a new directory when s.path is ""
// (t.TempDir can exceed the 108-byte socket path limit), handing each
// client in turn to serveConn until the test ends.
func (s *fakeSocket) listen(t *testing.T, name string, serveConn func(*net.UnixConn)) {
	t.Helper()
	if s.path == "" {
		dir, err := os.MkdirTemp("", "qmpfake")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		s.path = filepath.Join(dir, name)
	}
	s.ln = listenUnix(t, s.path)
	s.wg.Add(1)
	go s.serve(serveConn)
	t.Cleanup(s.stop)
}

func (s *fakeSocket) serve(serveConn func(*net.UnixConn)) {
	defer s.wg.Done()
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns = append(s.conns, conn)
		s.mu.Unlock()
		serveConn(conn)
		conn.Close()
	}
}

// listenUnix listens at path, through its directory when path is too long
// for a socket address (as dialUnix connects).
func listenUnix(t *testing.T, path string) *net.UnixListener {
	t.Helper()
	addr := path
	if len(path) > maxSunPath {
		dir, err := os.Open(filepath.Dir(path))
		if err != nil {
			t.Fatal(err)
		}
		defer dir.Close()
		addr = fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), filepath.Base(path))
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false) // the name through /proc is gone by then
	t.Cleanup(func() { os.Remove(path) })
	return ln
}

// dropClients closes the server side of every connection so far.
func (s *fakeSocket) dropClients() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

func (s *fakeSocket) stop() {
	s.ln.Close()
	s.dropClients()
	s.wg.Wait()
}

func withID(line string, id json.RawMessage) string {
	var obj map[string]json.RawMessage
	if id == nil || json.Unmarshal([]byte(line), &obj) != nil || obj["event"] != nil || obj["id"] != nil {
		return line
	}
	obj["id"] = id
	b, _ := json.Marshal(obj)
	return string(b)
}

func event(name string, data map[string]any) string {
	b, _ := json.Marshal(map[string]any{
		"event":     name,
		"data":      data,
		"timestamp": map[string]any{"seconds": 1795863795, "microseconds": 489154},
	})
	return string(b)
}

func reply(v any) string {
	b, _ := json.Marshal(map[string]any{"return": v})
	return string(b)
}

func qmpError(class, desc string) string {
	b, _ := json.Marshal(map[string]any{"error": map[string]any{"class": class, "desc": desc}})
	return string(b)
}

func dialT(t *testing.T, path string, opts Options) *Client {
	t.Helper()
	return dialWith(t, Dial, path, opts)
}

// dialWith connects to path with dial (Dial or DialHMP), failing t if it
// cannot, and closes the Client when t ends.
func dialWith(t *testing.T, dial func(context.Context, string, Options) (*Client, error), path string, opts Options) *Client {
	t.Helper()
	c, err := dial(context.Background(), path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitClosed fails the test unless ch closes within d.
func waitClosed(t *testing.T, ch <-chan struct{}, d time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("%s not closed within %s", what, d)
	}
}

func TestDialBadServers(t *testing.T) {
	for _, tc := range []struct {
		name, greeting string
		handle         func(fakeCommand) []string
		want           string // in the error
	}{
		{name: "junk greeting", greeting: "garbage", want: "read greeting"},
		{name: "greeting of the wrong shape", greeting: `{"QMP": 5}`, want: "not a QMP message"},
		{name: "greeting is an array", greeting: `[1, 2]`, want: "not a QMP message"},
		{name: "greeting without QMP", greeting: `{"hello": 1}`, want: "malformed greeting"},
		{name: "capabilities refused", greeting: greetingOOB, want: "qmp_capabilities: GenericError: nope",
			handle: func(fakeCommand) []string { return []string{qmpError("GenericError", "nope")} }},
		{name: "junk reply to qmp_capabilities", greeting: greetingOOB, want: "read qmp_capabilities reply",
			handle: func(fakeCommand) []string { return []string{"}}}"} }},
		{name: "reply without return", greeting: greetingOOB, want: "malformed qmp_capabilities reply",
			handle: func(fakeCommand) []string { return []string{`{"retour": {}}`} }},
		{name: "no reply to qmp_capabilities", greeting: greetingOOB, want: "did not answer qmp_capabilities",
			handle: func(fakeCommand) []string { return []string{} }},
		{name: "no greeting", want: "another client probably holds the monitor"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t, tc.greeting, tc.handle)
			start := time.Now()
			c, err := Dial(context.Background(), f.path, Options{Timeout: 500 * time.Millisecond})
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), f.path) {
				t.Errorf("error %q does not name the socket and say %q", err, tc.want)
			}
			if d := time.Since(start); d > time.Minute { // a hang, not a speed target
				t.Errorf("Dial took %s with a 500ms timeout", d)
			}
			t.Logf("%s: %v", tc.name, err)
		})
	}

	t.Run("greeting without oob is fine", func(t *testing.T) {
		// fds go in SCM_RIGHTS whatever the capabilities; "oob" is about
		// out-of-band command execution.
		f := startFake(t, `{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}`, nil)
		c := dialT(t, f.path, Options{Timeout: time.Second})
		if c.Version() != "7.2.0" {
			t.Errorf("Version() = %q", c.Version())
		}
	})
	t.Run("server closes at once", func(t *testing.T) {
		f := startFake(t, "", nil)
		f.ln.Close() // no more clients: the socket file stays, connects are refused
		if _, err := Dial(context.Background(), f.path, Options{Timeout: time.Second}); err == nil {
			t.Fatal("Dial succeeded")
		}
	})
	t.Run("no greeting is ErrNoGreeting", func(t *testing.T) {
		f := startFake(t, "", nil)
		_, err := Dial(context.Background(), f.path, Options{Timeout: 200 * time.Millisecond})
		if !errors.Is(err, ErrNoGreeting) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err = %v, want ErrNoGreeting and DeadlineExceeded", err)
		}
	})
	t.Run("ctx deadline first", func(t *testing.T) {
		f := startFake(t, "", nil)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := Dial(ctx, f.path, Options{Timeout: time.Minute})
		if !errors.Is(err, ErrNoGreeting) || time.Since(start) > time.Minute { // a hang, not a speed target
			t.Errorf("err = %v after %s, want ErrNoGreeting soon after 100ms", err, time.Since(start))
		}
	})
}

func TestMalformedReplies(t *testing.T) {
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		switch cmd.Execute {
		case "qom-get":
			return []string{`{"no-return": 1}`}
		case "human-monitor-command":
			if cmd.Arguments["command-line"] == "info qtree" {
				return []string{reply("bus: main-system-bus\r\n  dev: x\r\n")}
			}
			return []string{reply(7)}
		case "device_del":
			return []string{`{"return": {}, "error": "not an object"}`}
		}
		return nil
	})
	c := dialT(t, f.path, Options{Timeout: 2 * time.Second})
	ctx := context.Background()

	if _, err := c.ListNetdevs(ctx); err == nil {
		t.Error("ListNetdevs accepted a number")
	} else {
		t.Log(err)
	}
	if _, err := c.ListNICs(ctx); err == nil {
		t.Error("ListNICs accepted a tree it cannot read")
	} else {
		t.Log(err)
	}
	if _, err := c.Topology(ctx); err == nil {
		t.Error("Topology accepted garbage")
	}
	var typ string
	if err := c.qomGet(ctx, "/machine", "type", &typ); err == nil || !strings.Contains(err.Error(), "malformed reply") {
		t.Errorf("qom-get without return: err = %v", err)
	}
	if c.Err() != nil {
		t.Fatalf("well-formed JSON of the wrong shape killed the connection: %v", c.Err())
	}
	// A reply of the wrong shape at the protocol level: an error, and the
	// connection is given up.
	if err := c.RemoveNIC(ctx, 1, time.Second); err == nil {
		t.Error("RemoveNIC accepted an undecodable reply")
	} else {
		t.Log(err)
	}
}

func TestCommandTimeout(t *testing.T) {
	var got atomic.Int32
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		if cmd.Execute == "qmp_capabilities" {
			return nil
		}
		got.Add(1)
		return []string{} // never answer
	})
	c := dialT(t, f.path, Options{Timeout: 300 * time.Millisecond})

	start := time.Now()
	_, err := c.ListNetdevs(context.Background())
	elapsed := time.Since(start)
	if !errors.Is(err, ErrClosed) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no reply in time") {
		t.Fatalf("err = %v, want a timeout that closed the connection", err)
	}
	if elapsed > time.Minute { // a hang, not a speed target
		t.Errorf("timeout of 300ms took %s", elapsed)
	}
	waitClosed(t, c.Done(), 2*time.Second, "Done()")
	if !errors.Is(c.Err(), ErrClosed) {
		t.Errorf("Err() = %v", c.Err())
	}
	// Later commands fail at once, without reaching the server.
	before := got.Load()
	if _, err := c.ListNICs(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("after timeout: err = %v, want ErrClosed", err)
	}
	if got.Load() != before {
		t.Error("a command was sent on a dead connection")
	}
	t.Logf("timeout after %s: %v", elapsed, err)

	// Junk in place of a reply: no telling where the next message starts,
	// so the connection is given up at once.
	f2 := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		if cmd.Execute == "qmp_capabilities" {
			return nil
		}
		return []string{"this is not json"}
	})
	c2 := dialT(t, f2.path, Options{Timeout: time.Minute})
	start = time.Now()
	if _, err := c2.ListNetdevs(context.Background()); !errors.Is(err, ErrClosed) || time.Since(start) > time.Minute { // a hang, not a speed target
		t.Errorf("junk reply: err = %v after %s, want ErrClosed at once", err, time.Since(start))
	}
	waitClosed(t, c2.Done(), time.Second, "Done() after junk")
}

func TestRepliesMatchedByID(t *testing.T) {
	// An event before the qmp_capabilities reply (go-qemu#210 took it for
	// the reply and answered every later command with the one before), and
	// a stale reply with a foreign id before the real one.
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		switch cmd.Execute {
		case "qmp_capabilities":
			return []string{event("RTC_CHANGE", map[string]any{"offset": 1}), `{"return": {}}`}
		case "human-monitor-command":
			return []string{`{"return": "stale: index=0,type=tap,", "id": "999"}`, reply("mine: index=0,type=tap,fd=3\r\n")}
		}
		return nil
	})
	events := make(chan Event, 1)
	c := dialT(t, f.path, Options{OnEvent: func(e Event) { events <- e }})
	ids, err := c.ListNetdevs(context.Background())
	if err != nil || len(ids) != 1 || ids[0] != "mine" {
		t.Fatalf("ListNetdevs = %q, %v; want [mine]", ids, err)
	}
	select {
	case e := <-events:
		if e.Name != "RTC_CHANGE" {
			t.Errorf("event = %+v", e)
		}
	default:
		t.Error("the event sent before the qmp_capabilities reply was lost")
	}
}

func TestContextCancelClosesConnection(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		if cmd.Execute == "qmp_capabilities" {
			return nil
		}
		cancel() // the command is on the wire and will never be answered
		return []string{}
	})
	c := dialT(t, f.path, Options{Timeout: time.Minute})
	if _, err := c.ListNetdevs(ctx); !errors.Is(err, context.Canceled) || !errors.Is(err, ErrClosed) {
		t.Errorf("err = %v, want Canceled and ErrClosed", err)
	}
	waitClosed(t, c.Done(), 2*time.Second, "Done()")
}

// AfterClose runs its function once the connection dies, and not while
// it lives; a stopped one is never run (context.AfterFunc's promise).
func TestAfterClose(t *testing.T) {
	f := startFake(t, greetingOOB, nil)
	c := dialT(t, f.path, Options{})
	ran := make(chan struct{})
	c.AfterClose(func() { close(ran) })
	if stop := c.AfterClose(func() {}); !stop() {
		t.Fatal("stop() = false on a live connection: it had run")
	}
	select {
	case <-ran:
		t.Fatal("ran while the connection was alive")
	default:
	}
	f.dropClients()
	waitClosed(t, ran, 5*time.Second, "AfterClose's function after the server closed the socket")
	if stop := c.AfterClose(func() {}); stop() {
		t.Error("stop() = true on a dead connection: it had not run")
	}
}

func TestServerGoesAway(t *testing.T) {
	f := startFake(t, greetingOOB, nil)
	c := dialT(t, f.path, Options{})
	f.dropClients()
	waitClosed(t, c.Done(), 5*time.Second, "Done() after the server closed the socket")
	if _, err := c.ListNetdevs(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("err = %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close after death: %v", err)
	}
}

func TestEventsDoNotBlockReplies(t *testing.T) {
	const n = 200
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		if cmd.Execute != "human-monitor-command" {
			return nil
		}
		var lines []string
		for i := range n {
			lines = append(lines, event("NIC_RX_FILTER_CHANGED", map[string]any{"name": fmt.Sprint(i)}))
		}
		return append(lines, reply("tapsync-netdev1: index=0,type=tap,fd=13\r\n"))
	})
	var mu sync.Mutex
	var seen []Event
	c := dialT(t, f.path, Options{OnEvent: func(e Event) {
		mu.Lock()
		seen = append(seen, e)
		mu.Unlock()
	}})
	ids, err := c.ListNetdevs(context.Background())
	if err != nil || len(ids) != 1 || ids[0] != "tapsync-netdev1" {
		t.Fatalf("ListNetdevs = %q, %v", ids, err)
	}
	// Events are dispatched before the reply that follows them is read.
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != n {
		t.Fatalf("OnEvent saw %d events, want %d", len(seen), n)
	}
	e := seen[n-1]
	if e.Name != "NIC_RX_FILTER_CHANGED" || e.Data["name"] != fmt.Sprint(n-1) || e.Time.Unix() != 1795863795 || e.Time.Nanosecond() != 489154000 {
		t.Errorf("last event = %+v", e)
	}
}

// fakeVM is a stateful fake QEMU for removal: devices and netdevs by id.
type fakeVM struct {
	mu       sync.Mutex
	devices  map[string]bool
	netdevs  map[string]bool
	pending  map[string]bool
	unplug   string          // "ack": DEVICE_DELETED at once; "pending": never; "refuse": DEVICE_UNPLUG_GUEST_ERROR
	ack      map[string]bool // devices that unplug as with "ack" whatever unplug says
	commands []string
}

func (v *fakeVM) handle(cmd fakeCommand) []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	id, _ := cmd.Arguments["id"].(string)
	if cmd.Execute != "qmp_capabilities" {
		v.commands = append(v.commands, cmd.Execute+" "+id)
	}
	switch cmd.Execute {
	case "device_del":
		switch {
		case !v.devices[id]:
			return []string{qmpError("DeviceNotFound", fmt.Sprintf("Device '%s' not found", id))}
		case v.pending[id]:
			return []string{qmpError("GenericError", fmt.Sprintf("Device %s is already in the process of unplug", id))}
		}
		path := "/machine/peripheral/" + id
		mode := v.unplug
		if v.ack[id] {
			mode = "ack"
		}
		switch mode {
		case "ack": // as QEMU does when no guest round trip is needed: events before the reply
			delete(v.devices, id)
			return []string{
				event("DEVICE_DELETED", map[string]any{"path": path + "/virtio-backend"}),
				event("DEVICE_DELETED", map[string]any{"device": id, "path": path}),
				reply(map[string]any{}),
			}
		case "refuse":
			return []string{reply(map[string]any{}), event("DEVICE_UNPLUG_GUEST_ERROR", map[string]any{"device": id, "path": path})}
		}
		v.pending[id] = true
		return []string{reply(map[string]any{})}
	case "netdev_del":
		if !v.netdevs[id] {
			return []string{qmpError("DeviceNotFound", fmt.Sprintf("Device '%s' not found", id))}
		}
		delete(v.netdevs, id)
		return []string{reply(map[string]any{})}
	case "qom-get":
		path, _ := cmd.Arguments["path"].(string)
		if v.devices[strings.TrimPrefix(path, "/machine/peripheral/")] {
			return []string{reply("virtio-net-pci")}
		}
		return []string{qmpError("DeviceNotFound", fmt.Sprintf("Device '%s' not found", path))}
	}
	return nil
}

func newFakeVM(unplug string) *fakeVM {
	return &fakeVM{
		devices: map[string]bool{"tapsync-net3": true},
		netdevs: map[string]bool{"tapsync-netdev3": true},
		pending: map[string]bool{},
		unplug:  unplug,
	}
}

func TestRemoveNICAcknowledged(t *testing.T) {
	vm := newFakeVM("ack")
	f := startFake(t, greetingOOB, vm.handle)
	deleted := make(chan Event, 10)
	c := dialT(t, f.path, Options{OnEvent: func(e Event) {
		if e.Name == "DEVICE_DELETED" {
			deleted <- e
		}
	}})
	ctx := context.Background()

	start := time.Now()
	if err := c.RemoveNIC(ctx, 3, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Minute { // a hang, not a speed target
		t.Errorf("acknowledged removal took %s", d)
	}
	vm.mu.Lock()
	if len(vm.devices) != 0 || len(vm.netdevs) != 0 {
		t.Errorf("left behind: devices %v, netdevs %v", vm.devices, vm.netdevs)
	}
	vm.mu.Unlock()
	if len(deleted) != 2 {
		t.Errorf("OnEvent saw %d DEVICE_DELETED, want 2", len(deleted))
	}

	// Removing again: device_del says DeviceNotFound, netdev_del too.
	if err := c.RemoveNIC(ctx, 3, 5*time.Second); err != nil {
		t.Errorf("second RemoveNIC: %v", err)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	want := "device_del tapsync-net3,netdev_del tapsync-netdev3,device_del tapsync-net3,netdev_del tapsync-netdev3"
	if got := strings.Join(vm.commands, ","); got != want {
		t.Errorf("commands = %s\nwant       %s", got, want)
	}
}

func TestRemoveNICPending(t *testing.T) {
	vm := newFakeVM("pending")
	f := startFake(t, greetingOOB, vm.handle)
	c := dialT(t, f.path, Options{})
	ctx := context.Background()

	for i, wait := range []time.Duration{300 * time.Millisecond, 100 * time.Millisecond} {
		start := time.Now()
		err := c.RemoveNIC(ctx, 3, wait)
		if !errors.Is(err, ErrRemovalPending) || !strings.Contains(err.Error(), "tapsync-net3") {
			t.Fatalf("RemoveNIC #%d: err = %v, want ErrRemovalPending naming the device", i+1, err)
		}
		if d := time.Since(start); d < wait || d > wait+time.Minute { // it waited, and did not hang
			t.Errorf("RemoveNIC #%d returned after %s with wait %s", i+1, d, wait)
		}
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if !vm.netdevs["tapsync-netdev3"] {
		t.Error("netdev deleted while its device is still plugged")
	}
	for _, cmd := range vm.commands {
		if strings.HasPrefix(cmd, "netdev_del") {
			t.Errorf("sent %s while the unplug is pending", cmd)
		}
	}
}

func TestRemoveNICGuestError(t *testing.T) {
	vm := newFakeVM("refuse")
	f := startFake(t, greetingOOB, vm.handle)
	c := dialT(t, f.path, Options{})
	err := c.RemoveNIC(context.Background(), 3, 5*time.Second)
	if err == nil || errors.Is(err, ErrRemovalPending) || !strings.Contains(err.Error(), "DEVICE_UNPLUG_GUEST_ERROR") {
		t.Fatalf("err = %v, want the guest's refusal", err)
	}
}

func TestConcurrentCommands(t *testing.T) {
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		if cmd.Execute == "human-monitor-command" {
			return []string{event("X", nil), reply("n: index=0,type=tap,fd=3\r\n")}
		}
		return nil
	})
	var events atomic.Int32
	c := dialT(t, f.path, Options{OnEvent: func(Event) { events.Add(1) }})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 20 {
				if ids, err := c.ListNetdevs(context.Background()); err != nil || len(ids) != 1 {
					t.Errorf("ListNetdevs = %q, %v", ids, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if events.Load() != 160 {
		t.Errorf("saw %d events, want 160", events.Load())
	}
	c.Close()
	waitClosed(t, c.Done(), time.Second, "Done() after Close")
	if !errors.Is(c.Err(), ErrClosed) {
		t.Errorf("Err() = %v", c.Err())
	}
}
