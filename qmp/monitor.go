package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// A Client is a go-qemu qmp.Monitor, so that go-qemu's qemu.Domain (and
// anything else written against that interface) can run over it without
// go-qemu's own SocketMonitor and its reply-mixing bugs (see client.go).
var _ goqmp.Monitor = (*Client)(nil)

// EventBuffer is how many events a stream from Events holds for a reader
// that has not taken them yet; past that, events are dropped for that
// stream rather than stall the connection (its reader also reads replies).
const EventBuffer = 256

// Connect is part of go-qemu's qmp.Monitor. Dial already connected the
// Client and negotiated capabilities, so Connect only reports whether the
// connection is still alive; a dead Client stays dead (redial).
func (c *Client) Connect() error { return c.Err() }

// Disconnect is part of go-qemu's qmp.Monitor: it closes the connection
// (Close).
func (c *Client) Disconnect() error { return c.Close() }

// Run is part of go-qemu's qmp.Monitor: it runs one raw QMP command,
// {"execute": "...", "arguments": {...}}, and returns QEMU's reply as
// {"return": ...}. An error reply is returned as *Error. Any "id" in the
// command is replaced by the Client's own (replies are matched by it).
// The Client's timeout bounds it, as every command. Over HMP it runs only
// the commands this package spells in HMP (getfd, closefd, netdev_add,
// netdev_del, device_add, device_del, qom-get, human-monitor-command,
// query-cpus-fast); others fail wrapping errors.ErrUnsupported.
func (c *Client) Run(command []byte) ([]byte, error) {
	var cmd struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments"`
	}
	if err := json.Unmarshal(command, &cmd); err != nil {
		return nil, fmt.Errorf("qmp command %.200q on %s: %w", command, c.path, err)
	}
	if cmd.Execute == "" {
		return nil, fmt.Errorf("qmp command %.200q on %s: no \"execute\" (exec-oob is not supported)", command, c.path)
	}
	var args any
	if len(cmd.Arguments) > 0 && string(cmd.Arguments) != "null" {
		args = cmd.Arguments
	}
	ret, err := c.run(context.Background(), cmd.Execute, "", args, nil)
	if err != nil {
		return nil, err
	}
	return json.Marshal(struct {
		Return json.RawMessage `json:"return"`
	}{ret})
}

// Events is part of go-qemu's qmp.Monitor: a stream of every QMP event
// from now on, in arrival order, until ctx is done or the connection
// dies; then the channel is closed. A stream that falls EventBuffer
// events behind loses the events that do not fit. Options.OnEvent and
// every stream see each event. Over HMP, which has no events, it fails
// with an error wrapping errors.ErrUnsupported.
func (c *Client) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	if !c.HasEvents() {
		return nil, fmt.Errorf("%s events on %s: %w: HMP delivers no events", c.proto, c.path, errors.ErrUnsupported)
	}
	ch := make(chan goqmp.Event, EventBuffer)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("qmp events: %w", err)
	}
	c.streams[ch] = struct{}{}
	c.mu.Unlock()
	context.AfterFunc(ctx, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.streams[ch]; ok {
			delete(c.streams, ch)
			close(ch)
		}
	})
	return ch, nil
}

// streamLocked hands e to every Events stream; c.mu must be held.
func (c *Client) streamLocked(e Event) {
	if len(c.streams) == 0 {
		return
	}
	ge := goqmp.Event{Event: e.Name, Data: e.Data}
	ge.Timestamp.Seconds = e.Time.Unix()
	ge.Timestamp.Microseconds = int64(e.Time.Nanosecond() / 1000)
	for ch := range c.streams {
		select {
		case ch <- ge:
		default: // the reader is EventBuffer behind
		}
	}
}

// closeStreamsLocked ends every Events stream; c.mu must be held.
func (c *Client) closeStreamsLocked() {
	for ch := range c.streams {
		close(ch)
	}
	clear(c.streams)
}
