package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/tapsync/tapsync/qmp"
	"golang.org/x/sys/unix"
)

// plugger is how the floor asks its VM for a NIC and takes it back: over
// QMP by hand (monitor), over HMP through qmp.Client (hmpMonitor).
type plugger interface {
	// plug sends getfd (tap), netdev_add and device_add of endpoint index
	// into bus at slot.
	plug(ctx context.Context, index int, tap *os.File, link nic, bus string, slot int) error
	// unplug sends device_del, waits until the device is gone, and sends
	// netdev_del.
	unplug(ctx context.Context, index int) error
	close()
}

// monitor is the smallest QMP client that can pass fds: qmp.Client
// passes them only inside AddNIC, which adds its idempotency lookups —
// exactly the overhead the floor leaves out.
type monitor struct {
	conn    *net.UnixConn
	mu      sync.Mutex
	next    int
	replies map[string]chan reply
	deleted map[string]chan struct{}
	dead    chan struct{}
	err     error
}

func dialQMP(path string) (*monitor, error) {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("dial QMP %s: %w", path, err)
	}
	m := &monitor{conn: c.(*net.UnixConn), replies: map[string]chan reply{}, deleted: map[string]chan struct{}{}, dead: make(chan struct{})}
	r := bufio.NewReaderSize(c, 64<<10)
	if _, err := r.ReadBytes('\n'); err != nil { // the greeting
		c.Close()
		return nil, fmt.Errorf("QMP greeting on %s: %w", path, err)
	}
	go m.read(r)
	if err := m.run("qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return m, nil
}

func (m *monitor) close() { m.conn.Close() }

func (m *monitor) read(r *bufio.Reader) {
	defer close(m.dead)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			m.err = err
			return
		}
		var msg struct {
			ID     string          `json:"id"`
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
			Data  struct {
				Device string `json:"device"`
			} `json:"data"`
		}
		if json.Unmarshal(line, &msg) != nil {
			continue
		}
		m.mu.Lock()
		if msg.Event == "DEVICE_DELETED" {
			if ch, ok := m.deleted[msg.Data.Device]; ok {
				close(ch)
				delete(m.deleted, msg.Data.Device)
			}
		} else if ch, ok := m.replies[msg.ID]; ok {
			delete(m.replies, msg.ID)
			if msg.Error != nil {
				ch <- reply{err: fmt.Errorf("%s: %s", msg.Error.Class, msg.Error.Desc)}
			} else {
				ch <- reply{ret: msg.Return}
			}
		}
		m.mu.Unlock()
	}
}

func (m *monitor) expectDeleted(id string) <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch := make(chan struct{})
	m.deleted[id] = ch
	return ch
}

type reply struct {
	ret json.RawMessage
	err error
}

// run sends one command, with f's fd in SCM_RIGHTS when f is not nil, and
// waits for its reply.
func (m *monitor) run(cmd string, args any, f *os.File) error {
	_, err := m.call(cmd, args, f)
	return err
}

// call is run that returns the reply's "return" value.
func (m *monitor) call(cmd string, args any, f *os.File) (json.RawMessage, error) {
	m.mu.Lock()
	m.next++
	id := fmt.Sprintf("floor-%d", m.next)
	ch := make(chan reply, 1)
	m.replies[id] = ch
	m.mu.Unlock()
	msg := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		msg["arguments"] = args
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return nil, err
	}
	var oob []byte
	if f != nil {
		oob = unix.UnixRights(int(f.Fd()))
	}
	if _, _, err := m.conn.WriteMsgUnix(append(b, '\n'), oob, nil); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("QMP %s %s: %w", cmd, strings.TrimSpace(string(b)), r.err)
		}
		return r.ret, nil
	case <-m.dead:
		return nil, fmt.Errorf("QMP %s: connection closed: %v", cmd, m.err)
	case <-time.After(30 * time.Second):
		return nil, fmt.Errorf("QMP %s: no reply within 30s", cmd)
	}
}

// plug: getfd → netdev_add → device_add.
func (m *monitor) plug(_ context.Context, index int, tap *os.File, link nic, bus string, slot int) error {
	fd := fmt.Sprintf("floor-fd%d", index)
	if err := m.run("getfd", map[string]any{"fdname": fd}, tap); err != nil {
		return err
	}
	if err := m.run("netdev_add", map[string]any{"type": "tap", "id": qmp.NetdevID(index), "fds": fd}, nil); err != nil {
		return err
	}
	dev := map[string]any{
		"driver": "virtio-net-pci", "id": qmp.DeviceID(index), "netdev": qmp.NetdevID(index),
		"mac": link.mac.String(), "bus": bus, "addr": fmt.Sprintf("%#x", slot), "romfile": "",
	}
	if link.mtu > 0 {
		dev["host_mtu"] = link.mtu
	}
	return m.run("device_add", dev, nil)
}

// unplug: device_del → DEVICE_DELETED → netdev_del.
func (m *monitor) unplug(_ context.Context, index int) error {
	id := qmp.DeviceID(index)
	gone := m.expectDeleted(id)
	if err := m.run("device_del", map[string]any{"id": id}, nil); err != nil {
		return err
	}
	select {
	case <-gone:
	case <-time.After(time.Minute):
		return fmt.Errorf("no DEVICE_DELETED for %s within a minute", id)
	}
	return m.run("netdev_del", map[string]any{"id": qmp.NetdevID(index)}, nil)
}
