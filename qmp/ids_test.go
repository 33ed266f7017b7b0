package qmp

import "testing"

func TestIDs(t *testing.T) {
	if got := DeviceID(3); got != "tapsync-net3" {
		t.Errorf("DeviceID(3) = %q", got)
	}
	if got := NetdevID(3); got != "tapsync-netdev3" {
		t.Errorf("NetdevID(3) = %q", got)
	}
	if got := fdName(3, 1); got != "tapsync-fd3-1" {
		t.Errorf("fdName(3, 1) = %q", got)
	}
	if got := vhostFDName(3, 0); got != "tapsync-vhostfd3-0" {
		t.Errorf("vhostFDName(3, 0) = %q", got)
	}
}

func TestParseDeviceID(t *testing.T) {
	for _, tc := range []struct {
		id string
		n  int
		ok bool
	}{
		{"tapsync-net0", 0, true},
		{"tapsync-net3", 3, true},
		{"tapsync-net42", 42, true},
		{"tapsync-net", 0, false},
		{"tapsync-net03", 0, false},
		{"tapsync-net-1", 0, false},
		{"tapsync-net+1", 0, false},
		{"tapsync-netdev3", 0, false},
		{"tapsync-net3x", 0, false},
		{"tapsync-net99999999999999999999", 0, false},
		{"virtio-net-pci.2", 0, false},
		{"", 0, false},
	} {
		n, ok := ParseDeviceID(tc.id)
		if n != tc.n || ok != tc.ok {
			t.Errorf("ParseDeviceID(%q) = %d, %v; want %d, %v", tc.id, n, ok, tc.n, tc.ok)
		}
		if ok && DeviceID(n) != tc.id {
			t.Errorf("DeviceID(ParseDeviceID(%q)) = %q", tc.id, DeviceID(n))
		}
	}
}
