package qmp

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qemu"
	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// TestGoQEMUDomain drives go-qemu's own qemu.Domain over a Client against
// a real QEMU: commands, an error reply, and events, under -race with
// events and commands interleaved (go-qemu's SocketMonitor races there,
// digitalocean/go-qemu#226).
func TestGoQEMUDomain(t *testing.T) {
	t.Parallel()
	vm := startVM(t, "q35", 2)
	c := dialT(t, vm.qmp, Options{})
	d, err := qemu.NewDomain(c, "tapsync-test")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Connect(); err != nil {
		t.Errorf("Connect on a live Client = %v", err)
	}
	events, done, err := d.Events()
	if err != nil {
		t.Fatal(err)
	}
	defer close(done)

	if st, err := d.Status(); err != nil || st != qemu.StatusRunning {
		t.Errorf("Status = %v, %v; want running", st, err)
	}
	devs, err := d.PCIDevices()
	if err != nil {
		t.Fatal(err)
	}
	var ports []string
	for _, dev := range devs {
		if strings.HasPrefix(dev.QdevID, "rp") {
			ports = append(ports, dev.QdevID)
		}
	}
	if len(ports) != 2 {
		t.Errorf("PCIDevices: root ports %q, want rp1 and rp2 (of %d devices)", ports, len(devs))
	}
	if v, err := d.Version(); err != nil || v != c.Version() {
		t.Errorf("Version = %q, %v; want %q", v, err, c.Version())
	}
	// An error reply comes back as our *Error.
	_, err = d.Run(goqmp.Command{Execute: "device_del", Args: map[string]string{"id": "nosuch"}})
	if !IsNotFound(err) {
		t.Errorf("device_del of nothing = %v, want DeviceNotFound", err)
	}

	// Pause from the test's own monitor: go-qemu sees STOP and RESUME while
	// it keeps running commands.
	other := dialT(t, vm.test, Options{})
	ctx := context.Background()
	for _, cmd := range []string{"stop", "cont"} {
		if _, err := other.run(ctx, cmd, "", nil, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Status(); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	timeout := time.After(10 * time.Second)
	for len(got) < 2 {
		select {
		case e, ok := <-events:
			if !ok {
				t.Fatalf("event stream closed after %q", got)
			}
			if e.Timestamp.Seconds == 0 {
				t.Errorf("event %s without timestamp", e.Event)
			}
			got = append(got, e.Event)
		case <-timeout:
			t.Fatalf("events within 10s: %q, want STOP and RESUME", got)
		}
	}
	if got[0] != "STOP" || got[1] != "RESUME" {
		t.Errorf("events = %q, want STOP, RESUME", got)
	}

	if err := d.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
	if err := c.Connect(); !errors.Is(err, ErrClosed) {
		t.Errorf("Connect after Close = %v, want ErrClosed", err)
	}
	if _, err := c.Events(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Events after Close = %v, want ErrClosed", err)
	}
}

// TestMonitorRun covers Run's handling of raw commands and the Events
// stream's end, against the fake server.
func TestMonitorRun(t *testing.T) {
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		switch cmd.Execute {
		case "echo":
			return []string{event("E", nil), reply(cmd.Arguments)}
		case "qmp_capabilities":
			return nil
		}
		return []string{qmpError("CommandNotFound", "The command "+cmd.Execute+" has not been found")}
	})
	c := dialT(t, f.path, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	events, err := c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.Run([]byte(`{"execute": "echo", "arguments": {"a": 1}, "id": "mine"}`))
	if err != nil || string(out) != `{"return":{"a":1}}` {
		t.Errorf("Run(echo) = %s, %v", out, err)
	}
	if e := <-events; e.Event != "E" {
		t.Errorf("event %q, want E", e.Event)
	}
	if _, err := c.Run([]byte(`{"execute": "nope"}`)); !hasClass(err, ClassCommandNotFound) {
		t.Errorf("Run(nope) = %v, want CommandNotFound", err)
	}
	for _, bad := range []string{`garbage`, `{"exec-oob": "x"}`, `[]`} {
		if _, err := c.Run([]byte(bad)); err == nil {
			t.Errorf("Run(%s) succeeded", bad)
		}
	}
	cancel()
	for range events { // closed once ctx is done
	}
	events2, err := c.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	f.dropClients()
	for range events2 { // closed once the connection dies
	}
}
