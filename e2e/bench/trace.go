package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// traceArgs make QEMU log, with wall-clock microsecond timestamps, every
// QMP command it receives and every reply and event it sends: QEMU's own
// view of when a device was added or deleted, with no client polling it.
func traceArgs(file string) []string {
	return []string{"-msg", "timestamp=on", "-D", file,
		"-trace", "handle_qmp_command", "-trace", "monitor_qmp_respond"}
}

// hmpTraceArgs make QEMU also log what marks the traffic of a human
// monitor, for which QEMU 7.2 fires neither QMP event above:
//
//	handle_hmp_command mon 0x55e0c4d1abb0 cmdline: device_add virtio-net-pci,id=…   the line received, after its echo
//	monitor_suspend mon 0x55e0c4d1abb0: -1      the monitor takes input again: the command ran, the prompt is written
//
// monitor_suspend fires around every QMP command too, and QMP's
// human-monitor-command runs its line on a monitor of its own (another
// address, never suspended), so a command's answer is the next
// monitor_suspend -1 of the same monitor. Neither says whether the
// command succeeded: the bench asks the VM afterwards (see checkVM).
func hmpTraceArgs() []string {
	return []string{"-trace", "handle_hmp_command", "-trace", "monitor_suspend"}
}

// ejectTraceArgs make QEMU log when the guest ejects a hot-plugged slot
// through ACPI (acpi_pci_eject_slot bsel: 1 slot: 31), its
// acknowledgement of a device_del: QEMU unplugs the device there, well
// before DEVICE_DELETED (sent when it finalizes the device). The first
// eject after a device_del counts; a guest may eject the emptied slot again.
func ejectTraceArgs() []string { return []string{"-trace", "acpi_pci_eject_slot"} }

// acpiTraceArgs make QEMU log the guest's accesses to the ACPI PCI
// hot-plug registers: after a device_add QEMU raises the hot-plug GPE,
// and the guest's ACPI handler (the PCNT method) selects each hot-plug
// bus (acpi_pci_sel_write) and reads which of its slots gained a device
// (acpi_pci_up_read): the first access after a device_add is the guest's
// handler running.
func acpiTraceArgs() []string {
	return []string{"-trace", "acpi_pci_sel_write", "-trace", "acpi_pci_up_read"}
}

// acpiRecord is one guest access to the ACPI PCI hot-plug registers.
type acpiRecord struct {
	T     time.Time
	Event string // acpi_pci_sel_write or acpi_pci_up_read
	Args  string // the trace line's arguments, as QEMU wrote them
}

// qmpRecord is one QMP message in a QEMU trace.
type qmpRecord struct {
	T      time.Time
	Mon    string // the monitor's address: one per QMP socket
	Req    bool   // a command QEMU received; else a reply or an event QEMU sent
	Cmd    string // the command (for a reply: of its request)
	OK     bool   // a reply with "return"
	Event  string // an event's name
	Device string // the event's data.device
}

// qemuTrace reads one QEMU's trace file as it grows. Lines look like
//
//	1234@1796038578.587202:handle_qmp_command mon 0x55ec74d619b0 req: {"execute": ...}
//	1234@1796038578.587575:monitor_qmp_respond mon 0x55ec74d619b0 resp: {"return": {}, "id": "a"}
type qemuTrace struct {
	path    string
	off     int64
	rest    []byte
	pending map[string]string // mon+id → command
	Recs    []qmpRecord
	HMP     []hmpRecord
	Ejects  []time.Time // acpi_pci_eject_slot
	ACPI    []acpiRecord
}

// hmpRecord is one human monitor line in a QEMU trace: a command line
// QEMU received, or a monitor taking input again (its answer).
type hmpRecord struct {
	T    time.Time
	Mon  string
	Line string // the command line; "" for an answer
}

func newTrace(path string) *qemuTrace {
	return &qemuTrace{path: path, pending: map[string]string{}}
}

// poll reads what QEMU appended since the last call.
func (t *qemuTrace) poll() error {
	f, err := os.Open(t.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Seek(t.off, io.SeekStart); err != nil {
		return err
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return err
	}
	t.off += int64(len(b))
	b = append(t.rest, b...)
	for {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			break
		}
		t.parse(b[:i])
		b = b[i+1:]
	}
	t.rest = append([]byte(nil), b...)
	return nil
}

func (t *qemuTrace) parse(line []byte) {
	at := bytes.IndexByte(line, '@')
	colon := bytes.IndexByte(line, ':')
	if at < 0 || colon < at {
		return
	}
	ts, err := strconv.ParseFloat(string(line[at+1:colon]), 64)
	if err != nil {
		return
	}
	sec := int64(ts)
	r := qmpRecord{T: time.Unix(sec, int64((ts-float64(sec))*1e9+0.5)).Round(time.Microsecond)}
	rest := line[colon+1:]
	if t.parseHMP(r.T, rest) {
		return
	}
	var kind string
	switch {
	case bytes.HasPrefix(rest, []byte("handle_qmp_command mon ")):
		kind, r.Req = " req: ", true
		rest = rest[len("handle_qmp_command mon "):]
	case bytes.HasPrefix(rest, []byte("monitor_qmp_respond mon ")):
		kind = " resp: "
		rest = rest[len("monitor_qmp_respond mon "):]
	default:
		return
	}
	k := bytes.Index(rest, []byte(kind))
	if k < 0 {
		return
	}
	r.Mon = string(rest[:k])
	var m struct {
		Execute string          `json:"execute"`
		ID      json.RawMessage `json:"id"`
		Return  json.RawMessage `json:"return"`
		Event   string          `json:"event"`
		Data    struct {
			Device string `json:"device"`
		} `json:"data"`
	}
	if json.Unmarshal(rest[k+len(kind):], &m) != nil {
		return
	}
	key := r.Mon + string(m.ID)
	switch {
	case r.Req:
		r.Cmd = m.Execute
		t.pending[key] = m.Execute
	case m.Event != "":
		r.Event, r.Device = m.Event, m.Data.Device
	default:
		r.Cmd, r.OK = t.pending[key], m.Return != nil
		delete(t.pending, key)
	}
	t.Recs = append(t.Recs, r)
}

// parseHMP takes a line of hmpTraceArgs, ejectTraceArgs or acpiTraceArgs
// (rest is what follows the timestamp) and reports whether it was one.
func (t *qemuTrace) parseHMP(at time.Time, rest []byte) bool {
	switch {
	case bytes.HasPrefix(rest, []byte("handle_hmp_command mon ")):
		mon, line, ok := strings.Cut(string(rest[len("handle_hmp_command mon "):]), " cmdline: ")
		if ok && line != "" {
			t.HMP = append(t.HMP, hmpRecord{T: at, Mon: mon, Line: line})
		}
	case bytes.HasPrefix(rest, []byte("monitor_suspend mon ")):
		// Only -1 exactly: QEMU writes its own messages into the same
		// file, and one can follow without a newline.
		if mon, n, ok := strings.Cut(string(rest[len("monitor_suspend mon "):]), ": "); ok && n == "-1" {
			t.HMP = append(t.HMP, hmpRecord{T: at, Mon: mon})
		}
	case bytes.HasPrefix(rest, []byte("acpi_pci_eject_slot ")):
		// A guest's write of an empty slot mask traces slot 32 and
		// ejects nothing.
		_, slot, _ := strings.Cut(string(rest), " slot: ")
		if n, err := strconv.Atoi(strings.TrimSpace(slot)); err == nil && n < 32 {
			t.Ejects = append(t.Ejects, at)
		}
	case bytes.HasPrefix(rest, []byte("acpi_pci_sel_write ")), bytes.HasPrefix(rest, []byte("acpi_pci_up_read ")):
		ev, args, _ := strings.Cut(string(rest), " ")
		t.ACPI = append(t.ACPI, acpiRecord{T: at, Event: ev, Args: strings.TrimSpace(args)})
	default:
		return false
	}
	return true
}

// acpiAfter returns the first guest access to the ACPI PCI hot-plug
// registers from `from` on.
func (t *qemuTrace) acpiAfter(from time.Time) (acpiRecord, bool) {
	for _, a := range t.ACPI {
		if !a.T.Before(from) {
			return a, true
		}
	}
	return acpiRecord{}, false
}

// hmpAfter returns the human monitor records from `from` on.
func (t *qemuTrace) hmpAfter(from time.Time) []hmpRecord {
	for i, r := range t.HMP {
		if !r.T.Before(from) {
			return t.HMP[i:]
		}
	}
	return nil
}

// ejectAfter returns the first ACPI eject from `from` on.
func (t *qemuTrace) ejectAfter(from time.Time) (time.Time, bool) {
	for _, e := range t.Ejects {
		if !e.Before(from) {
			return e, true
		}
	}
	return time.Time{}, false
}

// exchange is one monitor command: when QEMU received it and when it
// answered. Over HMP the answer says nothing of success (OK is true).
type exchange struct {
	Cmd  string // QMP's command; over HMP the line's first word ("info qtree": two)
	Line string // over HMP, the command line
	Mon  string
	Req  time.Time
	Ans  time.Time
	OK   bool
}

// qmpExchanges pairs each QMP command with the next reply to it on the
// same monitor (a qmp.Client, and the floor, wait for each reply before
// the next command). A command not answered yet is left out.
func qmpExchanges(recs []qmpRecord) []exchange {
	var exs []exchange
	for i, r := range recs {
		if !r.Req {
			continue
		}
		for _, a := range recs[i+1:] {
			if !a.Req && a.Event == "" && a.Mon == r.Mon && a.Cmd == r.Cmd {
				exs = append(exs, exchange{Cmd: r.Cmd, Mon: r.Mon, Req: r.T, Ans: a.T, OK: a.OK})
				break
			}
		}
	}
	return exs
}

// hmpExchanges pairs each command line with the next answer of its
// monitor. A line never answered (not yet, or run by QMP's
// human-monitor-command) is left out.
func hmpExchanges(recs []hmpRecord) []exchange {
	var exs []exchange
	for i, r := range recs {
		if r.Line == "" {
			continue
		}
		for _, a := range recs[i+1:] {
			if a.Line == "" && a.Mon == r.Mon {
				exs = append(exs, exchange{Cmd: hmpCommandName(r.Line), Line: r.Line, Mon: r.Mon, Req: r.T, Ans: a.T, OK: true})
				break
			}
		}
	}
	return exs
}

// hmpCommandName is the command of an HMP line: its first word, or two
// for info.
func hmpCommandName(line string) string {
	f := strings.Fields(line)
	switch {
	case len(f) == 0:
		return ""
	case f[0] == "info" && len(f) > 1:
		return "info " + f[1]
	}
	return f[0]
}

// hmpArg returns, from an HMP line, the value of option key of its
// options argument (device_add virtio-net-pci,id=tapsync-net1,… → "id":
// tapsync-net1), or its first argument when key is "".
func hmpArg(line, key string) string {
	f := strings.Fields(line)
	if len(f) < 2 {
		return ""
	}
	if key == "" {
		return f[1]
	}
	for _, o := range strings.Split(f[1], ",") {
		if v, ok := strings.CutPrefix(o, key+"="); ok {
			return v
		}
	}
	return ""
}

// firstExchange returns the first answered exchange of cmd that succeeded.
func firstExchange(exs []exchange, cmd string) (exchange, bool) {
	for _, e := range exs {
		if e.Cmd == cmd && e.OK {
			return e, true
		}
	}
	return exchange{}, false
}

// monitorTime sums, over the exchanges of monitor mon, QEMU's time from
// receiving each command to answering it (busy), and the time from each
// answer to the next command received (between): the client's turn, and
// over HMP QEMU reading and echoing the next line byte by byte.
func monitorTime(exs []exchange, mon string) (busy, between time.Duration) {
	var last time.Time
	for _, e := range exs {
		if e.Mon != mon {
			continue
		}
		busy += e.Ans.Sub(e.Req)
		if !last.IsZero() {
			between += e.Req.Sub(last)
		}
		last = e.Ans
	}
	return busy, between
}

// exchangeCounts counts the exchanges, by command.
func exchangeCounts(exs []exchange) map[string]int {
	n := map[string]int{}
	for _, e := range exs {
		n[e.Cmd]++
	}
	return n
}

// after returns the records from t on.
func (t *qemuTrace) after(from time.Time) []qmpRecord {
	for i, r := range t.Recs {
		if !r.T.Before(from) {
			return t.Recs[i:]
		}
	}
	return nil
}

// okReplies returns the times of successful replies to cmd from `from` on.
func okReplies(recs []qmpRecord, cmd string) []time.Time {
	var ts []time.Time
	for _, r := range recs {
		if !r.Req && r.OK && r.Cmd == cmd {
			ts = append(ts, r.T)
		}
	}
	return ts
}

// requests returns the times QEMU received cmd.
func requests(recs []qmpRecord, cmd string) []time.Time {
	var ts []time.Time
	for _, r := range recs {
		if r.Req && r.Cmd == cmd {
			ts = append(ts, r.T)
		}
	}
	return ts
}

// deviceDeleted returns when QEMU emitted DEVICE_DELETED for a device
// with a qdev id (not the anonymous virtio backend's event).
func deviceDeleted(recs []qmpRecord) (time.Time, bool) {
	for _, r := range recs {
		if r.Event == "DEVICE_DELETED" && r.Device != "" {
			return r.T, true
		}
	}
	return time.Time{}, false
}

// mutating are the QMP commands that change a VM.
var mutating = map[string]bool{"getfd": true, "closefd": true, "netdev_add": true, "netdev_del": true, "device_add": true, "device_del": true}

// commandCounts counts the commands QEMU received, by name.
func commandCounts(recs []qmpRecord) map[string]int {
	n := map[string]int{}
	for _, r := range recs {
		if r.Req {
			n[r.Cmd]++
		}
	}
	return n
}

// monitorBusy is the time QEMU spent between receiving commands and
// replying to them (each command's request → reply), summed.
func monitorBusy(recs []qmpRecord) time.Duration {
	var busy time.Duration
	var since time.Time
	for _, r := range recs {
		switch {
		case r.Req:
			since = r.T
		case r.Event == "" && !since.IsZero():
			busy += r.T.Sub(since)
			since = time.Time{}
		}
	}
	return busy
}

func (r qmpRecord) String() string {
	switch {
	case r.Req:
		return fmt.Sprintf("%s req %s", r.T.Format("15:04:05.000000"), r.Cmd)
	case r.Event != "":
		return fmt.Sprintf("%s event %s %s", r.T.Format("15:04:05.000000"), r.Event, r.Device)
	}
	return fmt.Sprintf("%s reply %s ok=%v", r.T.Format("15:04:05.000000"), r.Cmd, r.OK)
}
