package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"
)

// traceArgs make QEMU log, with wall-clock microsecond timestamps, every
// QMP command it receives and every reply and event it sends: QEMU's own
// view of when a device was added or deleted, with no client polling it.
func traceArgs(file string) []string {
	return []string{"-msg", "timestamp=on", "-D", file,
		"-trace", "handle_qmp_command", "-trace", "monitor_qmp_respond"}
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
