package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"
)

// The wire protocol is spoken here rather than through go-qemu's
// qmp.SocketMonitor, which (at v0.0.0-20250212194115) hands a reply to Run in
// bufio.Scanner's reused buffer while its reader already scans the next line
// into it (digitalocean/go-qemu#226: replies corrupted when an event follows,
// a data race under -race), takes an event that arrives before the
// qmp_capabilities reply for that reply and then answers every later command
// with the previous command's reply (digitalocean/go-qemu#210), drops the
// error class, and has no deadlines. Here every command carries an "id" that
// QEMU echoes, and replies are matched by it.

// DefaultTimeout bounds Dial and each command when Options.Timeout is zero.
const DefaultTimeout = 5 * time.Second

// MaxMessage caps one QMP message from QEMU (a reply, an event, the
// greeting), and so also one HMP reply, which comes as a string inside one
// (over DialHMP, the output of one command; its echo is capped apart).
// Measured on QEMU 7.2: query-pci of a q35 with 29 root ports and a full
// 31-slot bridge is 33 KB, HMP "info qtree" of it 139 KB, and the largest
// reply QEMU has, query-qmp-schema, 207 KB. 1 MiB leaves room for bigger
// VMs and newer QEMUs while a compromised QEMU can make the daemon hold at
// most about twice this per sandbox (the reader's buffer, at most this,
// and the copy of a message's return).
const MaxMessage = 1 << 20

var (
	// ErrClosed is wrapped by every error of a Client whose connection is
	// dead: QEMU exited or closed the socket, a command got no reply in
	// time, the stream was not QMP (or HMP), or Close was called. A dead
	// Client stays dead; callers redial.
	ErrClosed = errors.New("qmp connection closed")

	// ErrNoGreeting is wrapped by Dial (DialHMP) when the socket accepted
	// the connection but QEMU sent no greeting (banner) before the
	// deadline: QEMU is stopped or stuck, or serving another client (it
	// serves one per QMP or HMP socket, and greets the next one only after
	// the current one disconnects). The error says which was seen.
	ErrNoGreeting = errors.New("no QMP greeting")

	// ErrMessageTooLarge is wrapped (with ErrClosed) when QEMU sends a
	// message larger than MaxMessage: the connection is closed rather than
	// the message buffered.
	ErrMessageTooLarge = fmt.Errorf("QMP message larger than %d bytes", MaxMessage)
)

// Options tune a Client.
type Options struct {
	// Timeout bounds Dial and every single command; a context deadline
	// that comes first wins. Zero means DefaultTimeout.
	Timeout time.Duration

	// OnEvent, if set, is called with every QMP event, in arrival order, on
	// the goroutine that reads the socket; never over HMP (see
	// Client.HasEvents). It must not block and must not call the Client:
	// that goroutine also reads the replies, so a blocked OnEvent stalls
	// every command. Poke a channel.
	OnEvent func(Event)

	// CheckConn, if set, vets the connected socket before a byte of QMP
	// (or HMP) is exchanged (e.g. that the listener is the QEMU process
	// the socket was found through, by SO_PEERCRED); an error refuses the
	// socket.
	CheckConn func(*net.UnixConn) error
}

// Event is an asynchronous QMP message, such as DEVICE_DELETED.
type Event struct {
	Name string         // e.g. "DEVICE_DELETED"
	Data map[string]any // the event's "data" as decoded JSON; may be nil
	Time time.Time      // QEMU's timestamp
}

// Client is one monitor connection to one VM, over QMP (Dial) or HMP
// (DialHMP); its methods work the same over both. Over HMP no events are
// delivered: OnEvent is never called, Events fails, and RemoveNICs learns
// that a device went by asking (see HasEvents). Its methods are safe for
// concurrent use; commands go to QEMU one at a time, as QEMU runs them.
type Client struct {
	proto   string // ProtocolQMP or ProtocolHMP: the wire run speaks
	path    string
	version string
	timeout time.Duration
	onEvent func(Event)
	conn    *net.UnixConn

	wire    chan struct{} // held while a command is on the wire; a channel so waiting honours ctx
	nextID  atomic.Uint64
	sent    atomic.Uint64 // commands written to the socket
	addSem  chan struct{} // held by AddNIC: choosing a slot and device_add must not interleave
	unplugs unplugLog     // when device_del was last sent, per device (see RemoveNICs)

	closeOnce sync.Once
	// gone is cancelled when the connection dies (Done; AfterClose:
	// context.AfterFunc holds no goroutine until then).
	gone       context.Context
	kill       context.CancelFunc
	readerDone chan struct{} // closed when the reader goroutine has returned

	mu      sync.Mutex
	err     error                         // why the connection died; guarded by mu
	pending *call                         // the command awaiting its reply; guarded by mu
	waiters map[*waiter]struct{}          // event waiters; guarded by mu
	streams map[chan goqmp.Event]struct{} // Events streams; guarded by mu, closed when the connection dies
}

type call struct {
	id    string        // QMP: the command's "id"
	line  string        // HMP: the command line, as QEMU echoes it
	reply chan response // buffered 1
}

// response is QEMU's answer to one call.
type response struct {
	m    message // QMP
	text string  // HMP: what the command printed, echo and prompt taken off
}

type waiter struct {
	match func(Event) bool
	ch    chan Event // buffered 1; the first match is kept
}

// message is any JSON object QEMU sends on a QMP socket:
//
//	{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "..."}, "capabilities": ["oob"]}}
//	{"return": {...}, "id": "7"}
//	{"error": {"class": "DeviceNotFound", "desc": "Device 'tapsync-net3' not found"}, "id": "8"}
//	{"event": "DEVICE_DELETED", "data": {"device": "tapsync-net3", "path": "/machine/peripheral/tapsync-net3"},
//	 "timestamp": {"seconds": 1795863795, "microseconds": 684625}}
type message struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
		} `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
	ID     json.RawMessage `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event     string         `json:"event"`
	Data      map[string]any `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// text is m as JSON, for an error that shows an unexpected message.
func (m message) text() string {
	b, _ := json.Marshal(m)
	return string(b)
}

// Dial connects to the QMP socket at path, reads QEMU's greeting and
// negotiates capabilities, within opts.Timeout or ctx's deadline, whichever
// comes first. A path too long for a unix socket address is reached
// through its directory (see dialUnix).
func Dial(ctx context.Context, path string, opts Options) (*Client, error) {
	return dialMonitor(ctx, ProtocolQMP, path, opts, func(h *handshaking) (*Client, error) {
		return handshake(h, opts.OnEvent)
	})
}

// handshake reads QEMU's QMP greeting and negotiates capabilities.
func handshake(h *handshaking, onEvent func(Event)) (*Client, error) {
	conn := h.conn
	mr := newMsgReader(conn, MaxMessage)
	greeting, err := mr.next()
	switch {
	case timedOut(err):
		return nil, fmt.Errorf("%w in %s: %s: %w", ErrNoGreeting, h.timeout, silence(conn), h.ctxErr())
	case err != nil:
		return nil, fmt.Errorf("read greeting: %w", err)
	case greeting.QMP == nil:
		return nil, fmt.Errorf("malformed greeting %.200q", greeting.text())
	}
	v := greeting.QMP.Version.QEMU
	version := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)

	// Equivalent to: {"execute": "qmp_capabilities", "id": "0"}
	if _, err := conn.Write([]byte(`{"execute": "qmp_capabilities", "id": "0"}` + "\n")); err != nil {
		return nil, fmt.Errorf("send qmp_capabilities: %w", err)
	}
	var early []message // events that came before the reply
	for {
		m, err := mr.next()
		switch {
		case timedOut(err):
			return nil, fmt.Errorf("QEMU %s greeted but did not answer qmp_capabilities: %w", version, h.ctxErr())
		case err != nil:
			return nil, fmt.Errorf("read qmp_capabilities reply: %w", err)
		case m.Event != "":
			early = append(early, m)
			continue
		case m.Error != nil:
			return nil, fmt.Errorf("qmp_capabilities: %s: %s", m.Error.Class, m.Error.Desc)
		case m.Return == nil || !bytes.Equal(m.ID, []byte(`"0"`)):
			return nil, fmt.Errorf("malformed qmp_capabilities reply %.200q", m.text())
		}
		break
	}
	if err := h.finish("qmp_capabilities"); err != nil {
		return nil, err
	}

	c := newClient(ProtocolQMP, conn, h.path, version, h.timeout, onEvent)
	go c.read(mr, early)
	return c, nil
}

func newClient(proto string, conn *net.UnixConn, path, version string, timeout time.Duration, onEvent func(Event)) *Client {
	gone, kill := context.WithCancel(context.Background())
	return &Client{
		proto:      proto,
		path:       path,
		version:    version,
		timeout:    timeout,
		onEvent:    onEvent,
		conn:       conn,
		wire:       make(chan struct{}, 1),
		addSem:     make(chan struct{}, 1),
		readerDone: make(chan struct{}),
		gone:       gone,
		kill:       kill,
		waiters:    map[*waiter]struct{}{},
		streams:    map[chan goqmp.Event]struct{}{},
	}
}

// Commands returns how many commands this connection has sent to QEMU,
// each one a round trip through QEMU's main loop.
func (c *Client) Commands() uint64 { return c.sent.Load() }

// Path is the socket this Client is connected to.
func (c *Client) Path() string { return c.path }

// Version is QEMU's version, e.g. "7.2.22": from the QMP greeting, or
// from HMP "info version" when dialled.
func (c *Client) Version() string { return c.version }

// Protocol says which monitor protocol the Client speaks: ProtocolQMP
// (Dial) or ProtocolHMP (DialHMP).
func (c *Client) Protocol() string { return c.proto }

// HasEvents reports whether QEMU's events reach this Client: true over
// QMP. Over HMP there are none, so a caller cannot keep a model of the VM
// by events (OnEvent never fires) and must read the VM again instead, and
// an unplug that RemoveNICs left pending completes unseen: call
// RemoveNICs again to find out.
func (c *Client) HasEvents() bool { return c.proto == ProtocolQMP }

// Done is closed when the connection is dead. Every later command fails
// with ErrClosed; callers redial.
func (c *Client) Done() <-chan struct{} { return c.gone.Done() }

// Err says why the connection died (wrapping ErrClosed), or nil while it is
// alive.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection and waits for its reader goroutine. It must
// not be called from OnEvent. Closing twice is fine.
func (c *Client) Close() error {
	c.fail(errors.New("closed by caller"))
	<-c.readerDone
	return nil
}

// fail marks the connection dead for reason and closes the socket, which
// ends the reader; only the first reason is kept.
func (c *Client) fail(reason error) {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.err = fmt.Errorf("%s %s: %w: %w", c.proto, c.path, ErrClosed, reason)
		c.closeStreamsLocked()
		c.mu.Unlock()
		_ = c.conn.Close()
		c.kill()
	})
}

// AfterClose arranges for f to run in its own goroutine once the
// connection is dead (Done), as context.AfterFunc does: no goroutine
// waits meanwhile. stop cancels it, reporting whether it did.
func (c *Client) AfterClose(f func()) (stop func() bool) {
	return context.AfterFunc(c.gone, f)
}

func (c *Client) dead() bool {
	select {
	case <-c.gone.Done():
		return true
	default:
		return false
	}
}

// read reads the socket for the life of the connection, dispatching events
// and handing replies to the waiting command.
func (c *Client) read(mr *msgReader, early []message) {
	defer close(c.readerDone)
	for _, m := range early {
		c.dispatch(m)
	}
	for {
		m, err := mr.next()
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET):
			// ECONNRESET: QEMU died with unread data (our command) in its socket.
			c.fail(fmt.Errorf("monitor socket closed (QEMU exited or closed it): %w", err))
			return
		case errors.Is(err, ErrMessageTooLarge):
			c.fail(fmt.Errorf("read: %w (a misbehaving QEMU?)", err))
			return
		case err != nil:
			// Past junk there is no telling where the next message starts.
			c.fail(fmt.Errorf("read: %w", err))
			return
		case m.Event != "":
			c.dispatch(m)
		default:
			c.deliver(m)
		}
	}
}

func (c *Client) dispatch(m message) {
	e := Event{
		Name: m.Event,
		Data: m.Data,
		Time: time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*int64(time.Microsecond)),
	}
	c.mu.Lock()
	for w := range c.waiters {
		if w.match(e) {
			select {
			case w.ch <- e:
			default: // already holds a match
			}
		}
	}
	c.streamLocked(e)
	c.mu.Unlock()
	if c.onEvent != nil {
		c.onEvent(e)
	}
}

// deliver hands a reply to the command waiting for it. QEMU echoes the id
// of the command; a reply with another id (or none while nothing waits) is
// dropped rather than taken for somebody else's.
func (c *Client) deliver(m message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.pending
	if p == nil {
		return
	}
	if m.ID != nil && !bytes.Equal(m.ID, []byte(strconv.Quote(p.id))) {
		return
	}
	c.pending = nil
	p.reply <- response{m: m}
}

// waitEvent registers interest in the first event that matches. Register
// before sending the command whose event is awaited: QEMU may emit the event
// before it replies.
func (c *Client) waitEvent(match func(Event) bool) (<-chan Event, func()) {
	w := &waiter{match: match, ch: make(chan Event, 1)}
	c.mu.Lock()
	c.waiters[w] = struct{}{}
	c.mu.Unlock()
	return w.ch, func() {
		c.mu.Lock()
		delete(c.waiters, w)
		c.mu.Unlock()
	}
}

// run executes one QMP command and returns its "return" value. what names
// the command's object in errors ("id=tapsync-net3"). file, if not nil, is
// passed with the command in SCM_RIGHTS (getfd); the caller keeps its copy.
// Over HMP the command and its arguments are spelled as an HMP command line
// and its output taken back to the "return" value QMP would give (see
// runHMP).
//
// A command sent but not answered before its deadline kills the
// connection: a monitor that does not answer within the timeout is taken
// for hung, and QEMU may still carry the command out, so the caller must
// redial and observe again rather than assume either outcome.
func (c *Client) run(ctx context.Context, cmd, what string, args any, file *os.File) (json.RawMessage, error) {
	name := cmd
	if what != "" {
		name += " " + what
	}
	if c.proto == ProtocolHMP {
		return c.runHMP(ctx, cmd, name, args, file)
	}
	p := &call{id: strconv.FormatUint(c.nextID.Add(1), 10), reply: make(chan response, 1)}
	msg, err := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{cmd, args, p.id})
	if err != nil {
		return nil, fmt.Errorf("qmp %s: encode arguments: %w", name, err)
	}
	r, err := c.exchange(ctx, name, p, append(msg, '\n'), file)
	if err != nil {
		return nil, err
	}
	m := r.m
	if m.Error != nil {
		return nil, &Error{Cmd: name, Class: classOf(m.Error.Class, m.Error.Desc), Desc: m.Error.Desc}
	}
	if m.Return == nil {
		return nil, fmt.Errorf("qmp %s on %s: malformed reply %.200q", name, c.path, m.text())
	}
	return m.Return, nil
}

// exchange sends msg as the pending call p, within the Client's timeout,
// and waits for its reply; the reader goroutine hands it over.
func (c *Client) exchange(ctx context.Context, name string, p *call, msg []byte, file *os.File) (response, error) {
	closed := func() error { return fmt.Errorf("%s %s: %w", c.proto, name, c.Err()) }
	if c.dead() {
		return response{}, closed()
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	select {
	case c.wire <- struct{}{}:
		defer func() { <-c.wire }()
	case <-ctx.Done():
		// Nothing was sent: the connection is still good.
		return response{}, fmt.Errorf("%s %s on %s: waiting for the command before it: %w", c.proto, name, c.path, ctx.Err())
	case <-c.gone.Done():
		return response{}, closed()
	}

	c.mu.Lock()
	c.pending = p
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		if c.pending == p {
			c.pending = nil
		}
		c.mu.Unlock()
	}()

	deadline, _ := ctx.Deadline()
	if err := c.write(msg, file, deadline); err != nil {
		// Part of the command may be on the wire.
		c.fail(fmt.Errorf("send %s: %w", name, err))
		return response{}, closed()
	}

	c.sent.Add(1)

	select {
	case r := <-p.reply:
		return r, nil
	case <-ctx.Done():
		c.fail(fmt.Errorf("%s got no reply in time: %w", name, ctx.Err()))
		return response{}, fmt.Errorf("%s %s on %s: no reply in time; connection closed, redial: %w", c.proto, name, c.path, errors.Join(ErrClosed, ctx.Err()))
	case <-c.gone.Done():
		return response{}, closed()
	}
}

// write sends one command; with file, its fd rides along in SCM_RIGHTS.
func (c *Client) write(msg []byte, file *os.File, deadline time.Time) error {
	if err := c.conn.SetWriteDeadline(deadline); err != nil {
		return err
	}
	if file == nil {
		_, err := c.conn.Write(msg)
		return err
	}
	raw, err := file.SyscallConn()
	if err != nil {
		return err
	}
	var n int
	var werr error
	// Control keeps the fd open and valid while it is being sent.
	if err := raw.Control(func(fd uintptr) {
		n, _, werr = c.conn.WriteMsgUnix(msg, unix.UnixRights(int(fd)), nil)
	}); err != nil {
		return err
	}
	if werr != nil {
		return werr
	}
	if n < len(msg) { // sendmsg may send less; the fd went with the first part
		_, err = c.conn.Write(msg[n:])
	}
	return err
}

// runInto runs a command and decodes its return value into out.
func (c *Client) runInto(ctx context.Context, cmd, what string, args any, out any) error {
	ret, err := c.run(ctx, cmd, what, args, nil)
	if err != nil {
		return err
	}
	if sp, ok := out.(*string); ok {
		if s, ok := unquoteJSON(ret); ok {
			*sp = s
			return nil
		}
	}
	if err := json.Unmarshal(ret, out); err != nil {
		name := cmd
		if what != "" {
			name += " " + what
		}
		return fmt.Errorf("%s %s on %s: unexpected reply %.200q: %w", c.proto, name, c.path, ret, err)
	}
	return nil
}
