// Package testvm owns the QEMU guest that tapsync's end-to-end tests and demo
// plug NICs into: building a tiny bootable image (Debian's cloud kernel,
// static busybox, the virtio-net modules and an /init that gives every new
// NIC an address derived from its MAC and reports NICs coming and going on
// the serial console), running QEMU with spare PCIe root ports and two QMP
// sockets inside a given network namespace, and waiting for what the guest
// prints.
//
// It never hot-plugs anything and never touches host networking: the code
// under test does that through VM.QMP, the test watches through VM.TestQMP
// and the serial markers (MarkerReady, NICUpRE, NICGoneRE).
package testvm
