package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"testing/iotest"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

func addTestdataSeeds(f *testing.F, wrap func([]byte) []byte) {
	f.Helper()
	files, _ := filepath.Glob(filepath.Join("testdata", "*.json"))
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(wrap(b))
	}
}

// FuzzReadMessages feeds bytes to the QMP reader and dispatcher as if QEMU
// sent them: no panic, no more held than the cap, replies go only to the
// waiting command, events reach waiters and streams.
func FuzzReadMessages(f *testing.F) {
	f.Add([]byte(greetingOOB + "\n" + `{"return": {}, "id": "1"}` + "\n"))
	f.Add([]byte(event("DEVICE_DELETED", map[string]any{"device": "tapsync-net3"}) + "\n" + qmpError("GenericError", "x") + "\n"))
	f.Add([]byte(`{"event": "X", "data": 5, "timestamp": {"seconds": -1, "microseconds": 1e300}}`))
	f.Add([]byte(`{"return": [1, {"id": "1"}], "id": 1}{"QMP": null}`))
	f.Add([]byte(`{"return": "` + strings.Repeat("x", 5<<10+1) + `"}`)) // past the cap below; odd: a byte a read
	addTestdataSeeds(f, func(b []byte) []byte {
		return append(append([]byte(`{"return": `), bytes.TrimSpace(b)...), []byte(`, "id": "1"}`)...)
	})
	const limit = 4 << 10
	f.Fuzz(func(t *testing.T, data []byte) {
		c := &Client{path: "fuzz", waiters: map[*waiter]struct{}{}, streams: map[chan goqmpEvent]struct{}{}}
		p := &call{id: "1", reply: make(chan response, 1)}
		c.pending = p
		events, stop := c.waitEvent(func(e Event) bool { return e.Name == "DEVICE_DELETED" })
		defer stop()
		stream := make(chan goqmpEvent, 1)
		c.streams[stream] = struct{}{}

		var r io.Reader = bytes.NewReader(data)
		if len(data)%2 == 1 {
			r = iotest.OneByteReader(r) // messages split across reads
		}
		mr := newMsgReader(r, limit)
		for {
			m, err := mr.next()
			if cap(mr.buf) > limit {
				t.Fatalf("the reader holds %d bytes, past a cap of %d", cap(mr.buf), limit)
			}
			if len(mr.fr.open) > maxDepth {
				t.Fatalf("the reader holds %d open brackets, past %d", len(mr.fr.open), maxDepth)
			}
			if err != nil {
				// A buffer of exactly limit bytes with no end in it is too
				// large, even if the stream would have ended there.
				if errors.Is(err, ErrMessageTooLarge) && len(data) < limit {
					t.Fatalf("%d bytes in all, yet ErrMessageTooLarge", len(data))
				}
				break
			}
			if m.Event != "" {
				c.dispatch(m)
			} else {
				c.deliver(m)
			}
		}
		select {
		case r := <-p.reply:
			if m := r.m; m.ID != nil && string(m.ID) != `"1"` {
				t.Errorf("reply with id %s delivered to command 1", m.ID)
			}
		default:
		}
		select {
		case e := <-events:
			if e.Name != "DEVICE_DELETED" {
				t.Errorf("waiter got %q", e.Name)
			}
		default:
		}
	})
}

// FuzzReaderAgreesWithJSON: the reader splits a stream where a JSON
// decoder would, and decodes each message as encoding/json decodes it
// into a message. Where encoding/json refuses a message, the reader
// refuses it too, unless the fault is in a string "return" only, which it
// keeps raw for the caller's decoding: then unquoteJSON must refuse that
// return (as encoding/json does, after it). Member names match as QEMU
// writes them: input with a name encoding/json would match by folding
// case is left out of the comparison. Odd-length input reaches the reader
// a byte at a time.
func FuzzReaderAgreesWithJSON(f *testing.F) {
	f.Add([]byte(greetingOOB + "\r\n" + `{"return": {}, "id": "1"}` + "\r\n"))
	f.Add([]byte(event("DEVICE_DELETED", map[string]any{"device": "tapsync-net3"}) + "\n" + qmpError("GenericError", "x")))
	f.Add([]byte(`{"return": "a\\\"b\\\\", "id": "7"} {"return": [1, {"a": "}"}], "x": null}`))
	f.Add([]byte(`{"return": "\x01", "id": 1}`))
	f.Add([]byte(`{"return": "\q", "id": 1}`))
	f.Add([]byte(`{"x\u0001": 1, "return": {}}`))
	f.Add([]byte(`{"return": {"a": [1}, "id": 1}{"return": {}}`))
	addTestdataSeeds(f, func(b []byte) []byte {
		return append(append([]byte(`{"return": `), bytes.TrimSpace(b)...), []byte(`, "id": "1"}`)...)
	})
	known := []string{"QMP", "id", "return", "error", "event", "data", "timestamp"}
	f.Fuzz(func(t *testing.T, data []byte) {
		var r io.Reader = bytes.NewReader(data)
		if len(data)%2 == 1 {
			r = iotest.OneByteReader(r)
		}
		dec := json.NewDecoder(bytes.NewReader(data))
		mr := newMsgReader(r, MaxMessage)
		for n := 0; ; n++ {
			var raw json.RawMessage
			jerr := dec.Decode(&raw)
			got, err := mr.next()
			if jerr != nil {
				if err == nil {
					// Taken by the reader, refused by the decoder: only a
					// string return the caller's decoding refuses may be why.
					if len(got.Return) == 0 || got.Return[0] != '"' || json.Valid(got.Return) {
						t.Fatalf("message %d: reader took %+v; encoding/json: %v", n, got, jerr)
					}
					if _, ok := unquoteJSON(got.Return); ok {
						t.Fatalf("message %d: unquoteJSON takes its return %s", n, got.Return)
					}
				}
				return // past here the two need not agree on where messages end
			}
			var members map[string]json.RawMessage
			if raw[0] != '{' || json.Unmarshal(raw, &members) != nil {
				// Not an object (null among them, which encoding/json
				// would decode into a message as nothing at all).
				if err == nil {
					t.Fatalf("message %d %q is no object, yet the reader took it", n, raw)
				}
				return
			}
			for name := range members {
				for _, k := range known {
					if name != k && strings.EqualFold(name, k) {
						return
					}
				}
			}
			var want message
			werr := json.Unmarshal(raw, &want)
			switch {
			case err != nil && werr == nil:
				t.Fatalf("message %d %q: reader: %v; encoding/json decodes it", n, raw, err)
			case err == nil && werr != nil:
				t.Fatalf("message %d %q: reader took it; encoding/json: %v", n, raw, werr)
			case err != nil:
				return
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("message %d %q:\nreader        %+v\nencoding/json %+v", n, raw, got, want)
			}
		}
	})
}

// FuzzParseInfoNetwork: any HMP text gives netdev ids that are names.
func FuzzParseInfoNetwork(f *testing.F) {
	var captured string
	b, err := os.ReadFile(filepath.Join("testdata", "info-network-q35.json"))
	if err == nil && json.Unmarshal(b, &captured) == nil {
		f.Add(captured)
	}
	f.Add("hub 0\r\n \\ hp0: user0: index=0,type=user,net=10.0.2.0\r\n")
	f.Add("tapsync-netdev3: index=0,type=tap,fd=13\r\n")
	f.Fuzz(func(t *testing.T, out string) {
		seen := map[string]bool{}
		for _, id := range parseInfoNetwork(out) {
			if id == "" || strings.ContainsAny(id, "\r\n") || seen[id] {
				t.Fatalf("parseInfoNetwork(%q) gave id %q (dup %v)", out, id, seen[id])
			}
			seen[id] = true
		}
		nics, _ := parseNetwork(out)
		for i, n := range nics {
			if len(n.MAC) != 6 || slices.ContainsFunc(nics[:i], func(o NICInfo) bool { return o.ID == n.ID }) {
				t.Fatalf("parseNetwork(%q) gave NIC %+v (MAC of 6 bytes, ids unique)", out, n)
			}
			if idx, owned := ParseDeviceID(n.ID); owned != n.Owned || owned && n.Index != idx {
				t.Fatalf("parseNetwork(%q) gave NIC %+v: ownership not its id's", out, n)
			}
		}
	})
}

// FuzzChoosePlacement: over any query-pci reply, a placement is a free,
// unreserved slot of a bus the policy allows, or ErrNoFreeSlot.
func FuzzChoosePlacement(f *testing.F) {
	addTestdataSeeds(f, func(b []byte) []byte { return b })
	f.Add([]byte(`[{"bus": 0, "devices": [{"slot": 2, "qdev_id": "br1", "pci_bridge": {"bus": {"secondary": 1}, "devices": [{"bus": 1, "slot": 31}]}}]}]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var buses []pciBus
		if json.Unmarshal(data, &buses) != nil {
			return
		}
		types := map[string]string{}
		var name func(devs []pciDevice)
		name = func(devs []pciDevice) {
			for _, d := range devs {
				switch {
				case strings.HasPrefix(d.QdevID, "rp"):
					types[d.QdevID] = "pcie-root-port"
				case strings.HasPrefix(d.QdevID, "br"):
					types[d.QdevID] = "pci-bridge"
				}
				if d.PCIBridge != nil {
					name(d.PCIBridge.Devices)
				}
			}
		}
		for _, b := range buses {
			name(b.Devices)
		}
		for _, p := range []Placement{{}, {Hotplug: HotplugRootPort}, {Hotplug: HotplugAny, Reserved: SlotRange{1, 16}}} {
			got, err := choosePlacement(buses, types, p)
			if err != nil {
				if !errors.Is(err, ErrNoFreeSlot) {
					t.Fatalf("%s: error %v does not wrap ErrNoFreeSlot", p, err)
				}
				continue
			}
			port := types[got.bus] == "pcie-root-port"
			switch {
			case got.slot < 0 || got.slot > 31 || len(got.path) == 0:
				t.Fatalf("%s: placement %+v", p, got)
			case port && p.policy() == HotplugBridge, !port && p.policy() == HotplugRootPort:
				t.Fatalf("%s: placement %+v on a bus the policy excludes", p, got)
			case !port && p.Reserved.contains(got.slot):
				t.Fatalf("%s: placement %+v in the reserved range", p, got)
			case !port && got.slot == 0:
				t.Fatalf("%s: placement %+v in slot 0", p, got)
			}
			if c := survey(buses, types, p); c.Free() == 0 {
				t.Fatalf("%s: placed %+v but Capacity says nothing is free: %s", p, got, c)
			}
		}
	})
}

type goqmpEvent = goqmp.Event
