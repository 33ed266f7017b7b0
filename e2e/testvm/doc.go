// Package testvm owns the QEMU guest that tapsync's end-to-end tests and demo
// plug NICs into: building a tiny bootable image (Debian's cloud kernel,
// static busybox, the virtio-net and virtio-serial modules, the test agent
// built from e2e/testagent/cmd/tapsync-testagent, and an /init that keeps
// that agent running and reports on the serial console), running QEMU with
// spare PCIe root ports and a Kata-like pci-bridge (BridgeID), two QMP sockets and two agent sockets inside a
// given network namespace, and waiting for what the guest prints.
//
// As on a Kata node, only the agent configures guest NICs, when asked over
// VM.Agent (the code under test) or VM.TestAgent (the test). For tests of
// the host side alone, Options.SelfConfig makes /init give every new NIC an
// address derived from its MAC (GuestIP) and announce NICs coming and going
// (NICUpRE, NICGoneRE).
//
// The guest agent also makes traffic through the guest's NICs when the test
// asks (VM.GuestTCPSend, VM.GuestTCPReceive, VM.GuestPing), so that rate
// limits and MTUs are measured where the guest sees them.
//
// It never hot-plugs anything and never touches host networking: the code
// under test does that through VM.QMP, the test watches through VM.TestQMP,
// VM.TestAgent and the serial markers (MarkerReady, AgentStartRE, ...).
package testvm
