package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// HMP, QEMU's human monitor, is spoken where QMP cannot be had: Kata's
// runtime-rs holds its VM's only QMP socket and, with enable_debug, serves
// an HMP one (-monitor unix:path=debug-monitor.sock,server=on,wait=off in
// the bundle dir). The Client's commands are the QMP commands the package
// already uses, each spelled as the HMP command line that does the same
// (hmpCommands); QEMU 7.2 on a unix socket answers like a terminal:
//
//	QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu)       on connect
//	i\x1b[K\x1b[Din\x1b[K ... \x1b[D\x1b[Dinfo cpus\x1b[K\r\n              the echo of "info cpus\n"
//	* CPU #0: thread_id=3878\r\n  CPU #1: thread_id=3879\r\n              its output
//	(qemu)                                                                 ready for the next line
//
// Errors are printed as "Error: <what QMP says in desc>".

// Monitor protocols, as Client.Protocol names them.
const (
	ProtocolQMP = "qmp"
	ProtocolHMP = "hmp"
)

// hmpPrompt is what QEMU prints, at the start of a line, when it is ready
// for the next command line.
const hmpPrompt = "(qemu) "

// hmpMaxLine caps an HMP command line. QEMU 7.2 reads an argument into a
// 1024-byte buffer and refuses longer ones, and the echo of a line grows
// with the square of its length (see hmpEchoMax).
const hmpMaxLine = 1000

// hmpBannerMax caps the banner QEMU sends on connect (56 bytes in 7.2).
const hmpBannerMax = 4 << 10

// hmpUnplugPoll is how often RemoveNICs asks over HMP whether a device it
// unplugged is gone, there being no DEVICE_DELETED to wait for.
const hmpUnplugPoll = 40 * time.Millisecond

// DialHMP connects to the HMP monitor socket at path (QEMU's -monitor
// unix:…), reads QEMU's banner and asks its version, within opts.Timeout or
// ctx's deadline, whichever comes first. The Client it returns works as
// one from Dial, but for events (see HasEvents) and the raw QMP of Run,
// which it takes only for the commands this package spells in HMP.
func DialHMP(ctx context.Context, path string, opts Options) (*Client, error) {
	return dialMonitor(ctx, ProtocolHMP, path, opts, handshakeHMP)
}

// handshakeHMP reads QEMU's HMP banner and asks its version.
func handshakeHMP(h *handshaking) (*Client, error) {
	conn := h.conn
	br := bufio.NewReader(conn) // 4 KB for the life of the connection; replies are read byte by byte
	// Like a QMP socket, an HMP one serves one client at a time: the next
	// gets its banner when the current one disconnects.
	banner, err := readHMPOutput(br, hmpBannerMax)
	switch {
	case timedOut(err) && banner == "":
		return nil, &noBanner{timeout: h.timeout, seen: silence(conn), err: h.ctxErr()}
	case timedOut(err):
		return nil, fmt.Errorf("not an HMP monitor: it sent %.200q and no prompt: %w", banner, h.ctxErr())
	case err != nil:
		return nil, fmt.Errorf("read HMP banner: %w", err)
	case !strings.HasPrefix(banner, "QEMU ") || !strings.Contains(banner, " monitor"):
		return nil, fmt.Errorf("not an HMP monitor: banner %.200q", banner)
	}

	// Equivalent to: info version
	const line = "info version"
	if _, err := conn.Write([]byte(line + "\n")); err != nil {
		return nil, fmt.Errorf("send %s: %w", line, err)
	}
	out, err := readHMPReply(br, line, hmpBannerMax)
	switch {
	case timedOut(err):
		return nil, fmt.Errorf("QEMU sent its HMP banner but did not answer %s: %w", line, h.ctxErr())
	case err != nil:
		return nil, fmt.Errorf("read %s reply: %w", line, err)
	}
	version, ok := parseHMPVersion(out)
	if !ok {
		return nil, fmt.Errorf("%s: unexpected reply %.200q", line, out)
	}
	if err := h.finish(line); err != nil {
		return nil, err
	}
	c := newClient(ProtocolHMP, conn, h.path, version, h.timeout, nil)
	go c.readHMP(br)
	return c, nil
}

// noBanner is DialHMP's ErrNoGreeting.
type noBanner struct {
	timeout time.Duration
	seen    string // what the monitor's listener was seen doing (see silence)
	err     error  // the context's
}

func (e *noBanner) Error() string {
	return fmt.Sprintf("no HMP banner in %s: %s: %v", e.timeout, e.seen, e.err)
}

func (e *noBanner) Unwrap() []error { return []error{ErrNoGreeting, e.err} }

// parseHMPVersion reads "7.2.22Debian 1:7.2+dfsg-7+deb12u18+b3\r\n" (the
// version, then the package, unseparated) as "7.2.22".
func parseHMPVersion(out string) (string, bool) {
	end := strings.IndexFunc(out, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if end < 0 {
		end = len(out)
	}
	v := out[:end]
	if parts := strings.Split(v, "."); len(parts) != 3 || slices.Contains(parts, "") {
		return "", false
	}
	return v, true
}

// readHMP reads the socket for the life of the connection, handing each
// reply to the waiting command. QEMU prints nothing unasked: output while
// no command waits is taken for a garbled stream.
func (c *Client) readHMP(br *bufio.Reader) {
	defer close(c.readerDone)
	for {
		_, err := br.Peek(1)
		var out string
		if err == nil {
			c.mu.Lock()
			p := c.pending
			c.mu.Unlock()
			if p == nil {
				junk, _ := br.Peek(br.Buffered())
				c.fail(fmt.Errorf("read: QEMU sent %.80q while no command was waiting: not an HMP reply", junk))
				return
			}
			if out, err = readHMPReply(br, p.line, MaxMessage); err == nil {
				c.deliverHMP(p, out)
				continue
			}
		}
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET):
			c.fail(fmt.Errorf("monitor socket closed (QEMU exited or closed it): %w", err))
		case errors.Is(err, ErrMessageTooLarge):
			c.fail(fmt.Errorf("read: HMP output past the cap: %w (a misbehaving QEMU?)", err))
		default:
			// Past junk there is no telling where the next reply starts.
			c.fail(fmt.Errorf("read: %w", err))
		}
		return
	}
}

func (c *Client) deliverHMP(p *call, out string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending == p {
		c.pending = nil
		p.reply <- response{text: out}
	}
}

// errNotHMP is wrapped by a reader error when the bytes are not what QEMU's
// HMP sends.
var errNotHMP = errors.New("not an HMP reply")

// hmpEchoMax bounds the echo of a command line of n bytes: QEMU's readline
// redraws the line after each character (cursor back over the line so far,
// the line, erase to its end: 4i bytes for the i-th), 2n(n+1) bytes in all,
// then "\r\n".
func hmpEchoMax(n int) int { return 2*(n+1)*(n+2) + 2 }

// readHMPReply reads the reply to line from r: QEMU's echo of line, then
// what the command printed, up to the prompt. It returns the printed text
// (lines end in "\r\n"); the echo's last redraw must be line itself, the
// echo at most hmpEchoMax bytes, the text at most max bytes
// (ErrMessageTooLarge). A prompt is taken where a line starts with
// "(qemu) ": QEMU's own output never does.
func readHMPReply(r io.ByteReader, line string, max int) (string, error) {
	if err := skipEcho(r, line); err != nil {
		return "", err
	}
	out, err := readHMPOutput(r, max)
	if err != nil {
		return "", err
	}
	return out, nil
}

// skipEcho reads the echo of line, through its closing "\r\n".
func skipEcho(r io.ByteReader, line string) error {
	want := line + "\x1b[K\r\n"
	limit := hmpEchoMax(len(line))
	tail := make([]byte, 0, 2*len(want)) // the echo's last bytes
	for n := 1; ; n++ {
		b, err := r.ReadByte()
		if err != nil {
			return err
		}
		if n > limit {
			return fmt.Errorf("%w: the echo of %q runs past %d bytes", errNotHMP, line, limit)
		}
		if len(tail) == cap(tail) {
			tail = append(tail[:0], tail[len(tail)-len(want)+1:]...)
		}
		tail = append(tail, b)
		if b != '\n' {
			continue
		}
		if !bytes.HasSuffix(tail, []byte(want)) {
			return fmt.Errorf("%w: the echo of %q ends in %q", errNotHMP, line, tail)
		}
		return nil
	}
}

// readHMPOutput reads up to and through the next prompt and returns what
// came before it, at most max bytes; on error, what it read.
func readHMPOutput(r io.ByteReader, max int) (string, error) {
	var buf []byte
	for {
		b, err := r.ReadByte()
		if err != nil {
			return string(buf), err
		}
		buf = append(buf, b)
		if b == ' ' && bytes.HasSuffix(buf, []byte(hmpPrompt)) {
			start := len(buf) - len(hmpPrompt)
			if start == 0 || buf[start-1] == '\n' {
				return string(buf[:start]), nil
			}
		}
		if len(buf) > max+len(hmpPrompt) {
			return string(buf[:min(len(buf), 64)]), ErrMessageTooLarge
		}
	}
}

// hmpCommand spells one QMP command in HMP.
type hmpCommand struct {
	// line builds the command line from the QMP arguments; every value
	// is checked on the way (see hmpLine).
	line func(args map[string]any) (string, error)
	// result takes the command's output to the QMP return value; nil for
	// a command that prints nothing when it succeeds ("{}").
	result func(out string) (json.RawMessage, error)
}

// hmpCommands are the QMP commands this package sends, and their HMP
// spellings (QEMU 7.2).
var hmpCommands = map[string]hmpCommand{
	// Equivalent to: getfd tapsync-fd3-0 (the fd in SCM_RIGHTS with the line)
	"getfd": {line: hmpPositional("getfd", "fdname")},
	// Equivalent to: closefd tapsync-fd3-0
	"closefd": {line: hmpPositional("closefd", "fdname")},
	// Equivalent to: netdev_add tap,id=tapsync-netdev3,fds=tapsync-fd3-0:tapsync-fd3-1
	"netdev_add": {line: hmpOptions("netdev_add", "type")},
	// Equivalent to: netdev_del tapsync-netdev3
	"netdev_del": {line: hmpPositional("netdev_del", "id")},
	// Equivalent to: device_add virtio-net-pci,id=tapsync-net3,bus=pci-bridge-0,addr=0x1e,mac=...,netdev=...,romfile=
	"device_add": {line: hmpOptions("device_add", "driver")},
	// Equivalent to: device_del tapsync-net3
	"device_del": {line: hmpPositional("device_del", "id")},
	// Equivalent to: qom-get /machine/peripheral/tapsync-net3 type
	// (it prints the value as JSON).
	"qom-get": {line: hmpPositional("qom-get", "path", "property"), result: func(out string) (json.RawMessage, error) {
		v := json.RawMessage(strings.TrimSpace(out))
		if !json.Valid(v) {
			return nil, fmt.Errorf("%w: qom-get printed %.200q, not JSON", errNotHMP, out)
		}
		return v, nil
	}},
	// The command line itself, e.g. info qtree.
	"human-monitor-command": {line: hmpHuman, result: func(out string) (json.RawMessage, error) { return json.Marshal(out) }},
	// Equivalent to: info cpus
	"query-cpus-fast": {line: hmpPositional("info cpus"), result: hmpCPUs},
}

// hmpPositional spells a command whose arguments are words, in order: the
// QMP arguments named by keys, and no others.
func hmpPositional(cmd string, keys ...string) func(map[string]any) (string, error) {
	return func(args map[string]any) (string, error) {
		l := newHMPLine(cmd)
		for _, k := range keys {
			v, ok := args[k]
			if !ok {
				return "", fmt.Errorf("argument %q missing", k)
			}
			l.word(k, v)
		}
		for k := range args {
			if !slices.Contains(keys, k) {
				return "", fmt.Errorf("argument %q has no HMP spelling here", k)
			}
		}
		return l.String()
	}
}

// hmpOptions spells a command that takes one QemuOpts argument, first the
// value of key first (the netdev's type, the device's driver), then id,
// then the other arguments by name.
func hmpOptions(cmd, first string) func(map[string]any) (string, error) {
	return func(args map[string]any) (string, error) {
		v, ok := args[first]
		if !ok {
			return "", fmt.Errorf("argument %q missing", first)
		}
		keys := make([]string, 0, len(args))
		for k := range args {
			if k != first && k != "id" {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		if _, ok := args["id"]; ok {
			keys = append([]string{"id"}, keys...)
		}
		l := newHMPLine(cmd)
		l.word(first, v)
		for _, k := range keys {
			l.option(k, args[k])
		}
		return l.String()
	}
}

// hmpHuman spells human-monitor-command: its command line, word by word.
func hmpHuman(args map[string]any) (string, error) {
	cl, ok := args["command-line"].(string)
	if !ok || len(args) != 1 {
		return "", errors.New(`want only the argument "command-line", a string`)
	}
	words := strings.Split(cl, " ")
	l := newHMPLine(words[0])
	for _, w := range words[1:] {
		l.word("command-line", w)
	}
	return l.String()
}

// hmpCPUs takes "info cpus" to query-cpus-fast's return value (its
// cpu-index only). QEMU 7.2 prints a line per vCPU, the current one
// starred: "* CPU #0: thread_id=3878\r\n  CPU #1: thread_id=3879\r\n".
func hmpCPUs(out string) (json.RawMessage, error) {
	type cpu struct {
		CPUIndex int `json:"cpu-index"`
	}
	var cpus []cpu
	for _, l := range strings.Split(strings.TrimRight(out, "\r\n"), "\n") {
		rest, ok := strings.CutPrefix(strings.TrimLeft(l, "* "), "CPU #")
		n, _, found := strings.Cut(rest, ":")
		i, err := strconv.Atoi(n)
		if !ok || !found || err != nil {
			return nil, fmt.Errorf("%w: info cpus line %.80q", errNotHMP, l)
		}
		cpus = append(cpus, cpu{i})
	}
	return json.Marshal(cpus)
}

// hmpLine builds one HMP command line. HMP has no quoting: a space ends an
// argument, a comma starts another option, a quote or a control character
// means something else again, so a value that could carry one (any string
// not made here) could add arguments nobody meant. Every word and value
// goes through hmpSafe on the way in; the first that fails is the line's
// error, naming it.
type hmpLine struct {
	b   strings.Builder
	err error
}

// newHMPLine starts a line with the command's words ("device_add", "info cpus").
func newHMPLine(cmd string) *hmpLine {
	l := &hmpLine{}
	for _, w := range strings.Split(cmd, " ") {
		l.word("command", w)
	}
	return l
}

// word adds a positional argument; what names it in errors.
func (l *hmpLine) word(what string, v any) {
	s, err := hmpValue(v)
	if err == nil && s == "" {
		err = errors.New("empty")
	}
	if err == nil {
		err = hmpSafe(s)
	}
	if err != nil {
		l.fail(what, v, err)
		return
	}
	if l.b.Len() > 0 {
		l.b.WriteByte(' ')
	}
	l.b.WriteString(s)
}

// option adds key=value to the option argument the last word started.
// The value may be empty (romfile=).
func (l *hmpLine) option(key string, v any) {
	s, err := hmpValue(v)
	if err == nil {
		err = hmpSafe(s)
	}
	if key == "" || hmpSafe(key) != nil || strings.ContainsAny(key, ":/") {
		err = errors.New("not an option name")
	}
	if err != nil {
		l.fail(key, v, err)
		return
	}
	l.b.WriteString("," + key + "=" + s)
}

func (l *hmpLine) fail(what string, v any, err error) {
	if l.err == nil {
		l.err = fmt.Errorf("%s %q cannot go on an HMP command line: %w", what, fmt.Sprint(v), err)
	}
}

// String returns the line, or the first value refused.
func (l *hmpLine) String() (string, error) {
	if l.err != nil {
		return "", l.err
	}
	if l.b.Len() > hmpMaxLine {
		return "", fmt.Errorf("HMP command line of %d bytes, longer than %d: %.80q…", l.b.Len(), hmpMaxLine, l.b.String())
	}
	return l.b.String(), nil
}

// hmpValue spells a QMP argument value as HMP takes it: strings as they
// are, booleans on/off, whole numbers in decimal.
func hmpValue(v any) (string, error) {
	switch v := v.(type) {
	case string:
		return v, nil
	case bool:
		if v {
			return "on", nil
		}
		return "off", nil
	case int:
		return strconv.Itoa(v), nil
	case json.Number:
		if _, err := v.Int64(); err != nil {
			return "", errors.New("not a whole number")
		}
		return v.String(), nil
	}
	return "", fmt.Errorf("a %T, not a string, boolean or whole number", v)
}

// hmpSafe accepts what QEMU's own names and numbers are made of (ids,
// MACs, bus names, QOM paths, fd lists a:b, 0x1e): letters, digits and
// "-_.:/". Nothing else can end an argument or an option.
func hmpSafe(s string) error {
	for i := 0; i < len(s); i++ {
		switch b := s[i]; {
		case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9':
		case b == '-' || b == '_' || b == '.' || b == ':' || b == '/':
		default:
			return fmt.Errorf("character %q at %d (HMP has no quoting)", s[i:i+1], i)
		}
	}
	return nil
}

// hmpArgs takes a command's QMP arguments (a map, or JSON from Run) to a
// map whose numbers are json.Number or int.
func hmpArgs(args any) (map[string]any, error) {
	switch a := args.(type) {
	case nil:
		return map[string]any{}, nil
	case map[string]any:
		return a, nil
	}
	b, ok := args.(json.RawMessage)
	if !ok {
		var err error
		if b, err = json.Marshal(args); err != nil {
			return nil, err
		}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("arguments %.200q: %w", b, err)
	}
	if m == nil {
		m = map[string]any{}
	}
	return m, nil
}

// runHMP is run over HMP: cmd and args become the command line of
// hmpCommands (refused, with nothing sent, when a value cannot be put on
// it), and what QEMU prints becomes the return value QMP would give, or an
// *Error carrying the description QMP would give.
func (c *Client) runHMP(ctx context.Context, cmd, name string, args any, file *os.File) (json.RawMessage, error) {
	hc, ok := hmpCommands[cmd]
	if !ok {
		return nil, fmt.Errorf("hmp %s on %s: %w: no HMP spelling of this QMP command here", name, c.path, errors.ErrUnsupported)
	}
	a, err := hmpArgs(args)
	if err != nil {
		return nil, fmt.Errorf("hmp %s on %s: %w", name, c.path, err)
	}
	line, err := hc.line(a)
	if err != nil {
		return nil, fmt.Errorf("hmp %s on %s: %w", name, c.path, err)
	}
	r, err := c.exchange(ctx, name, &call{line: line, reply: make(chan response, 1)}, []byte(line+"\n"), file)
	if err != nil {
		return nil, err
	}
	if e := hmpError(name, r.text, hc.result == nil); e != nil {
		return nil, e
	}
	if hc.result == nil {
		return json.RawMessage("{}"), nil
	}
	ret, err := hc.result(r.text)
	if err != nil {
		return nil, fmt.Errorf("hmp %s on %s: %w", name, c.path, err)
	}
	return ret, nil
}

// checkHMP refuses, over HMP, arguments that cannot be spelled on an HMP
// command line, before anything is sent: a command that comes after others
// (device_add after getfd and netdev_add) is checked first. Over QMP every
// value can be sent.
func (c *Client) checkHMP(cmd string, args map[string]any) error {
	hc, ok := hmpCommands[cmd]
	if c.proto != ProtocolHMP || !ok {
		return nil // run refuses a command without an HMP spelling
	}
	if _, err := hc.line(args); err != nil {
		return fmt.Errorf("hmp %s: %w", cmd, err)
	}
	return nil
}

// hmpError reads the output of a command as an error, or nil when it is
// not one. QEMU 7.2 prints (the descriptions are QMP's, so classify reads
// them alike):
//
//	Error: Device 'tapsync-net7' not found                          device_del, netdev_del
//	Error: Device '/machine/peripheral/tapsync-net7' not found      qom-get
//	Error: Duplicate device ID 'tapsync-net1'                       device_add
//	Error: Bus 'nobus' not found                                    device_add
//	Error: Duplicate ID 'tapsync-netdev7'                           netdev_add, the id taken by a netdev made over QMP
//	Try "help netdev_add" for more information                      netdev_add, the id taken by a netdev made over HMP
//	unknown command: 'bogus'
//
// "Try help" is HMP's parser refusing the line before the command ran;
// the reason ("Duplicate ID 'tapsync-netdev1' for netdev", the options
// HMP's netdev_add keeps per netdev) goes to QEMU's stderr, not the
// monitor.
// For a command that prints nothing when it succeeds (silent), any other
// output but warnings is an error too.
func hmpError(name, out string, silent bool) *Error {
	text := strings.TrimSpace(strings.ReplaceAll(out, "\r\n", "\n"))
	e := &Error{Cmd: name, Class: ClassGeneric, Desc: text, hmp: true}
	switch {
	case strings.HasPrefix(text, "Error: "):
		e.Desc = strings.TrimPrefix(text, "Error: ")
		e.Class = classify(e.Desc)
	case strings.HasPrefix(text, "unknown command: "):
		e.Class = ClassCommandNotFound
	case strings.HasPrefix(text, `Try "help `):
		e.Desc = "arguments refused (QEMU printed why on its stderr; for netdev_add, an id in use): " + text
	case !silent:
		return nil
	default:
		var other []string
		for _, l := range strings.Split(text, "\n") {
			if l != "" && !strings.HasPrefix(l, "warning: ") {
				other = append(other, l)
			}
		}
		if len(other) == 0 {
			return nil
		}
	}
	return e
}
