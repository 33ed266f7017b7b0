// Package qmp owns the QEMU side of an endpoint: one monitor connection
// per sandbox, over QMP or, where QMP cannot be had, HMP; NIC hot-add
// (getfd, netdev_add, device_add), hot-remove (device_del, DEVICE_DELETED,
// netdev_del), listing the VM's NICs and dispatching QMP events.
//
// It never touches the host network and never decides what should be
// plugged; its objects are recognised by the fixed "tapsync-" id prefix.
package qmp
