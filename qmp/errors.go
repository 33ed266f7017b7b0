package qmp

import (
	"errors"
	"strings"
)

// Error classes. DeviceNotFound, CommandNotFound and GenericError are
// QEMU's own; DuplicateID and UnplugPending are tapsync's names for
// descriptions that QEMU sends as GenericError but callers must tell apart
// (see classOf).
const (
	ClassGeneric         = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
	ClassDeviceNotFound  = "DeviceNotFound"
	ClassDuplicateID     = "DuplicateID"
	ClassUnplugPending   = "UnplugPending"
)

// Error is an error reply from QEMU to one command.
type Error struct {
	Cmd   string // command and the arguments that name its object, e.g. "device_del id=tapsync-net3"
	Class string // QEMU's class, refined by classOf; one of the Class constants or another QEMU class
	Desc  string // QEMU's description, verbatim (over HMP, what it printed, "Error: " taken off)

	hmp bool // the reply came over HMP
}

func (e *Error) Error() string {
	proto := ProtocolQMP
	if e.hmp {
		proto = ProtocolHMP
	}
	return proto + " " + e.Cmd + ": " + e.Class + ": " + e.Desc
}

// IsNotFound reports whether err is QEMU saying that the device, netdev or
// QOM path it was asked about does not exist. Deleting what is gone is
// success for callers.
func IsNotFound(err error) bool { return hasClass(err, ClassDeviceNotFound) }

func hasClass(err error, class string) bool {
	var e *Error
	return errors.As(err, &e) && e.Class == class
}

// isNotANetdev matches netdev_del's answer for an id that is in QEMU's list
// of network clients but not registered as a netdev. QEMU 7.2 leaves such a
// client behind when netdev_add of a multiqueue tap fails after its first
// queue was set up; nothing short of a VM restart removes it.
func isNotANetdev(err error) bool {
	var e *Error
	return errors.As(err, &e) && strings.HasSuffix(e.Desc, "is not a netdev")
}

// classOf refines QEMU's error class: GenericError (or no class) becomes a
// more precise class when the description is one callers rely on.
func classOf(qemuClass, desc string) string {
	if qemuClass != "" && qemuClass != ClassGeneric {
		return qemuClass
	}
	return classify(desc)
}

// classify derives a class from a description alone. The descriptions
// matched are those of QEMU 7.2 (measured) and earlier spellings:
//
//	Device 'tapsync-net3' not found                          device_del, netdev_del, qom-get path (DeviceNotFound)
//	The command foo has not been found                       (CommandNotFound)
//	Duplicate ID 'tapsync-netdev3'                           netdev_add (7.2; older: "... for netdev")
//	Duplicate device ID 'tapsync-net3'                       device_add (7.2; older: "Duplicate ID '...' for device")
//	Device tapsync-net3 is already in the process of unplug  device_del while a native PCIe unplug is pending
func classify(desc string) string {
	switch {
	case strings.HasPrefix(desc, "Device '") && strings.HasSuffix(desc, "' not found"):
		return ClassDeviceNotFound
	case strings.HasPrefix(desc, "The command ") && strings.HasSuffix(desc, " has not been found"):
		return ClassCommandNotFound
	case strings.Contains(desc, "Duplicate ID") || strings.Contains(desc, "Duplicate device ID"):
		return ClassDuplicateID
	case strings.Contains(desc, "unplug") &&
		(strings.Contains(desc, "process of unplug") || strings.Contains(desc, "in progress")):
		return ClassUnplugPending
	}
	return ClassGeneric
}
