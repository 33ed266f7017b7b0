package qmp

import (
	"fmt"
	"testing"
)

func TestClassify(t *testing.T) {
	// Descriptions as QEMU 7.2 sends them (measured), plus older spellings.
	for _, tc := range []struct{ desc, class string }{
		{"Device 'tapsync-net3' not found", ClassDeviceNotFound},
		{"Device 'tapsync-netdev9' not found", ClassDeviceNotFound},
		{"Device '/machine/peripheral/nope' not found", ClassDeviceNotFound},
		{"The command nope has not been found", ClassCommandNotFound},
		{"Duplicate ID 'tapsync-netdev1'", ClassDuplicateID},
		{"Duplicate ID 'tapsync-netdev1' for netdev", ClassDuplicateID},
		{"Duplicate device ID 'tapsync-net1'", ClassDuplicateID},
		{"Device tapsync-net1 is already in the process of unplug", ClassUnplugPending},
		{"Device 'tapsync-netdev3' is not a netdev", ClassGeneric},
		{"File descriptor named 'tapsync-fd1-0' not found", ClassGeneric},
		{"Bus 'pcie.0' does not support hotplugging", ClassGeneric},
		{"PCI: slot 1 function 0 not available for virtio-net-pci, in use by virtio-net-pci,id=n3", ClassGeneric},
		{"", ClassGeneric},
	} {
		if got := classify(tc.desc); got != tc.class {
			t.Errorf("classify(%q) = %s, want %s", tc.desc, got, tc.class)
		}
	}
}

func TestErrorString(t *testing.T) {
	e := &Error{Cmd: "device_del id=tapsync-net3", Class: ClassDeviceNotFound, Desc: "Device 'tapsync-net3' not found"}
	want := "qmp device_del id=tapsync-net3: DeviceNotFound: Device 'tapsync-net3' not found"
	if e.Error() != want {
		t.Errorf("Error() = %q, want %q", e.Error(), want)
	}
	wrapped := fmt.Errorf("remove: %w", e)
	if !IsNotFound(wrapped) {
		t.Errorf("IsNotFound(%v) = false", wrapped)
	}
	if IsNotFound(&Error{Class: ClassGeneric}) || IsNotFound(nil) || IsNotFound(fmt.Errorf("Device 'x' not found")) {
		t.Error("IsNotFound true for an error that is not a DeviceNotFound reply")
	}
	if !isNotANetdev(&Error{Class: ClassGeneric, Desc: "Device 'tapsync-netdev3' is not a netdev"}) {
		t.Error("isNotANetdev false for QEMU's orphan answer")
	}
}
