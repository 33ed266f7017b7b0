package qmp

import (
	"bufio"
	"bytes"
	"context"
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

// TestOversizedMessages: a QEMU that sends a message larger than
// MaxMessage — a reply, an HMP reply, an event, the greeting — gets its
// connection closed with an error naming the socket; nothing is buffered
// past the cap.
func TestOversizedMessages(t *testing.T) {
	huge := strings.Repeat("a", MaxMessage+1)
	for _, tc := range []struct {
		name string
		run  func(c *Client) error
		send []string
	}{
		{"reply", func(c *Client) error { _, err := c.VCPUs(context.Background()); return err },
			[]string{`{"return": "` + huge + `"}`}},
		{"HMP reply", func(c *Client) error { _, err := c.ListNetdevs(context.Background()); return err },
			[]string{reply(huge)}},
		{"event before the reply", func(c *Client) error { _, err := c.VCPUs(context.Background()); return err },
			[]string{event("X", map[string]any{"junk": huge}), reply([]any{})}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
				if cmd.Execute == "qmp_capabilities" {
					return nil
				}
				return tc.send
			})
			c := dialT(t, f.path, Options{Timeout: 5 * time.Second})
			err := tc.run(c)
			if !errors.Is(err, ErrClosed) || !errors.Is(c.Err(), ErrMessageTooLarge) || !strings.Contains(err.Error(), f.path) {
				t.Fatalf("err = %v (Err() = %v), want ErrClosed naming %s, Err() wrapping ErrMessageTooLarge", err, c.Err(), f.path)
			}
			t.Log(err)
		})
	}

	t.Run("greeting", func(t *testing.T) {
		f := startFake(t, `{"QMP": {"version": {"package": "`+huge+`"}}}`, nil)
		_, err := Dial(context.Background(), f.path, Options{Timeout: 5 * time.Second})
		if !errors.Is(err, ErrMessageTooLarge) || !strings.Contains(err.Error(), f.path) {
			t.Fatalf("Dial = %v, want ErrMessageTooLarge naming %s", err, f.path)
		}
	})

	// Just under the cap is fine.
	t.Run("at the cap", func(t *testing.T) {
		s := strings.Repeat("a", MaxMessage-100)
		f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
			if cmd.Execute == "human-monitor-command" {
				return []string{reply(s)}
			}
			return nil
		})
		c := dialT(t, f.path, Options{Timeout: 5 * time.Second})
		var out string
		if err := c.runInto(context.Background(), "human-monitor-command", "", map[string]any{"command-line": "x"}, &out); err != nil || len(out) != len(s) {
			t.Fatalf("reply of %d bytes: %d, %v", MaxMessage-100, len(out), err)
		}
	})
}

// TestEndlessMessage: a message that never ends ends the connection once
// the cap is reached, not when memory runs out.
func TestEndlessMessage(t *testing.T) {
	dir, err := os.MkdirTemp("", "qmpcap")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	wrote := make(chan int64, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			wrote <- 0
			return
		}
		defer conn.Close()
		r := bufio.NewReader(conn)
		conn.Write([]byte(greetingOOB + "\n"))
		r.ReadString('\n')
		conn.Write([]byte(`{"return": {}, "id": "0"}` + "\n"))
		r.ReadString('\n')
		n, _ := conn.Write([]byte(`{"return": "`))
		total := int64(n)
		chunk := bytes.Repeat([]byte("a"), 64<<10)
		for total < 1<<30 { // a client without a cap would take the whole GiB
			n, err := conn.Write(chunk)
			total += int64(n)
			if err != nil {
				break
			}
		}
		wrote <- total
	}()
	c := dialT(t, path, Options{Timeout: 30 * time.Second})
	_, err = c.VCPUs(context.Background())
	if !errors.Is(c.Err(), ErrMessageTooLarge) {
		t.Fatalf("VCPUs = %v (Err() = %v), want the connection closed for ErrMessageTooLarge", err, c.Err())
	}
	if n := <-wrote; n >= 1<<30 {
		t.Errorf("the client read %d bytes of one message", n)
	} else {
		t.Logf("peer wrote %d bytes before the client hung up: %v", n, err)
	}
}

// Across the large messages after which the reader lets its grown buffer
// go (TestReaderLetsGrownBufferGo), what it had read after each — here an
// event and then, once asked for, the next reply — comes in order: OnEvent
// runs on the reader, so the event is heard before the reply is.
func TestReaderShrinksAfterLargeMessage(t *testing.T) {
	big := strings.Repeat("x", 3*shrinkAfter)
	var n atomic.Int32
	f := startFake(t, greetingOOB, func(cmd fakeCommand) []string {
		switch cmd.Execute {
		case "qmp_capabilities":
			return []string{reply(map[string]any{})}
		case "human-monitor-command":
			return []string{reply(big), event("NIC_RX_FILTER_CHANGED", map[string]any{"name": "after-big"})}
		}
		return []string{reply(fmt.Sprintf("answer %d", n.Add(1)))}
	})
	var events []string
	var mu sync.Mutex
	c := dialT(t, f.path, Options{OnEvent: func(e Event) {
		mu.Lock()
		events = append(events, e.Name)
		mu.Unlock()
	}})
	ctx := context.Background()
	for i := 1; i <= 3; i++ {
		var out string
		if err := c.runInto(ctx, "human-monitor-command", "", map[string]any{"command-line": "info qtree"}, &out); err != nil || out != big {
			t.Fatalf("big reply %d: %d bytes, %v", i, len(out), err)
		}
		if err := c.runInto(ctx, "query-name", "", nil, &out); err != nil || out != fmt.Sprintf("answer %d", i) {
			t.Fatalf("reply after the big one: %q, %v", out, err)
		}
		mu.Lock()
		got := len(events)
		mu.Unlock()
		if got != i {
			t.Fatalf("events heard by reply %d after a big one: %d, want %d", i, got, i)
		}
	}
}
