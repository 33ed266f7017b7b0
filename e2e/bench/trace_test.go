package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Lines as QEMU 7.2 writes them with -msg timestamp=on and the two trace
// events; the last one is cut mid-line, as a read can find it.
const traceSample = `31456@1796039536.400000:monitor_qmp_respond mon 0x55a7 resp: {"QMP": {"version": {}}}
31467@1796039536.401000:handle_qmp_command mon 0x55a7 req: {"execute": "device_add", "arguments": {"id": "tapsync-net1"}, "id": "7"}
31467@1796039536.401500:handle_qmp_command mon 0x99 req: {"execute": "query-status", "id": "7"}
31456@1796039536.403000:monitor_qmp_respond mon 0x55a7 resp: {"return": {}, "id": "7"}
31456@1796039536.403100:monitor_qmp_respond mon 0x99 resp: {"id": "7", "error": {"class": "GenericError", "desc": "x"}}
31467@1796039536.410000:handle_qmp_command mon 0x55a7 req: {"execute": "device_del", "arguments": {"id": "tapsync-net1"}, "id": 8}
31456@1796039536.410200:monitor_qmp_respond mon 0x55a7 resp: {"return": {}, "id": 8}
31456@1796039536.480000:monitor_qmp_respond mon 0x55a7 resp: {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/tapsync-net1/virtio-backend"}}
31456@1796039536.480100:monitor_qmp_respond mon 0x55a7 resp: {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"device": "tapsync-net1", "path": "/machine/peripheral/tapsync-net1"}}
31467@1796039536.490000:handle_qmp_com`

func TestTrace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.log")
	if err := os.WriteFile(path, []byte(traceSample), 0o644); err != nil {
		t.Fatal(err)
	}
	tr := newTrace(path)
	if err := tr.poll(); err != nil {
		t.Fatal(err)
	}
	at := func(us int) time.Time { return time.Unix(1796039536, int64(us)*1000) }
	if got := okReplies(tr.Recs, "device_add"); len(got) != 1 || !got[0].Equal(at(403000)) {
		t.Errorf("device_add answered at %v, want %v", got, at(403000))
	}
	if got := okReplies(tr.Recs, "query-status"); len(got) != 0 {
		t.Errorf("an error reply on another monitor counted as success: %v", got)
	}
	if got := requests(tr.Recs, "device_del"); len(got) != 1 || !got[0].Equal(at(410000)) {
		t.Errorf("device_del received at %v", got)
	}
	if got, ok := deviceDeleted(tr.after(at(410000))); !ok || !got.Equal(at(480100)) {
		t.Errorf("DEVICE_DELETED of the device at %v (%v), want %v", got, ok, at(480100))
	}
	if got := commandCounts(tr.Recs); got["device_add"] != 1 || got["query-status"] != 1 || got["device_del"] != 1 || len(got) != 3 {
		t.Errorf("command counts %v", got)
	}
	// The cut line completes on the next read.
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`mand mon 0x55a7 req: {"execute": "netdev_del", "id": "9"}` + "\n")
	f.Close()
	if err := tr.poll(); err != nil {
		t.Fatal(err)
	}
	if got := requests(tr.after(at(480101)), "netdev_del"); len(got) != 1 || !got[0].Equal(at(490000)) {
		t.Errorf("netdev_del across two reads: %v", got)
	}
}

func TestQuantile(t *testing.T) {
	v := []float64{5, 1, 4, 2, 3, 6, 7, 8, 9, 10}
	for p, want := range map[float64]float64{0.5: 5, 0.9: 9, 1: 10, 0: 1} {
		if got := quantile(v, p); got != want {
			t.Errorf("quantile(%v) = %v, want %v", p, got, want)
		}
	}
}
