package testvm

import (
	"fmt"
	"net"
	"regexp"
)

// Markers the guest's /init prints on the serial console, one per line.
// init.sh spells the same words; TestInitScriptMarkers keeps the two in step.
const (
	// MarkerReady: modules are loaded, lo is up, and the agent has been
	// started (with Options.SelfConfig, the NIC scan loop runs too).
	MarkerReady = "TAPSYNC-READY"
	// MarkerAgentStart <n>: /init starts the guest agent for the nth time
	// (1 at boot, 2 after the first exit, ...). The agent serves its ports
	// soon after; a client that connects earlier simply waits.
	MarkerAgentStart = "TAPSYNC-AGENT-START"
	// MarkerAgentExit <n> <status>: the nth agent process exited.
	MarkerAgentExit = "TAPSYNC-AGENT-EXIT"

	// The NIC markers below come only with Options.SelfConfig.

	// MarkerNICUp <ifname> <mac> <ip>: a new interface got GuestIP(mac)/24 and is up.
	MarkerNICUp = "TAPSYNC-NIC-UP"
	// MarkerNICGone <ifname> <mac>: an interface the guest had announced disappeared.
	MarkerNICGone = "TAPSYNC-NIC-GONE"
	// MarkerNICError <ifname> <mac> <ip>: configuring a new interface failed;
	// the lines before it on the console say why.
	MarkerNICError = "TAPSYNC-NIC-ERROR"
)

// PrefixLen is the prefix length of GuestIP and PeerIP on their shared /24.
const PrefixLen = 24

// ReadyRE matches the READY line.
func ReadyRE() *regexp.Regexp {
	return regexp.MustCompile(regexp.QuoteMeta(MarkerReady) + `\s*$`)
}

// AgentStartRE matches the line announcing the nth start of the guest
// agent, or any start when n is 0. Submatch [1] is the start count.
func AgentStartRE(n int) *regexp.Regexp {
	count := `(\d+)`
	if n > 0 {
		count = fmt.Sprintf("(%d)", n)
	}
	return regexp.MustCompile(regexp.QuoteMeta(MarkerAgentStart) + " " + count + `\s*$`)
}

// AgentExitRE matches the line announcing that the nth agent process
// exited, or any when n is 0. Submatches: [1] the start count, [2] the
// exit status.
func AgentExitRE(n int) *regexp.Regexp {
	count := `(\d+)`
	if n > 0 {
		count = fmt.Sprintf("(%d)", n)
	}
	return regexp.MustCompile(regexp.QuoteMeta(MarkerAgentExit) + " " + count + ` (\d+)\s*$`)
}

// NICUpRE matches the line announcing the guest NIC with this MAC.
// Submatches: [1] guest interface name, [2] its IP.
func NICUpRE(mac net.HardwareAddr) *regexp.Regexp {
	return regexp.MustCompile(regexp.QuoteMeta(MarkerNICUp) + ` (\S+) ` +
		regexp.QuoteMeta(mac.String()) + ` (\S+)\s*$`)
}

// NICGoneRE matches the line announcing that the guest NIC with this MAC
// disappeared. Submatch [1] is the interface name it had.
func NICGoneRE(mac net.HardwareAddr) *regexp.Regexp {
	return regexp.MustCompile(regexp.QuoteMeta(MarkerNICGone) + ` (\S+) ` +
		regexp.QuoteMeta(mac.String()) + `\s*$`)
}

// GuestIP is the address the guest gives the NIC with this MAC:
// 10.99.<mac[4]>.<mac[5]>. Deriving it from the MAC lets a test know the
// address without talking to the guest. Nil unless mac is 6 bytes long.
func GuestIP(mac net.HardwareAddr) net.IP {
	if len(mac) != 6 {
		return nil
	}
	return net.IPv4(10, 99, mac[4], mac[5]).To4()
}

// PeerIP is the address a test gives the host side of the link to the NIC
// with this MAC: 10.99.<mac[4]>.1, on the same /24 as GuestIP. A MAC ending
// in :01 would collide with it; TestMAC never makes one.
func PeerIP(mac net.HardwareAddr) net.IP {
	if len(mac) != 6 {
		return nil
	}
	return net.IPv4(10, 99, mac[4], 1).To4()
}

// TestMAC returns 02:54:53:00:<n>:02 ("TS" in the middle, locally
// administered, unicast), so the guest takes 10.99.n.2 and the peer is
// 10.99.n.1. n must be in 0..255.
func TestMAC(n int) net.HardwareAddr {
	if n < 0 || n > 255 {
		panic(fmt.Sprintf("testvm.TestMAC(%d): n must be in 0..255", n))
	}
	return net.HardwareAddr{0x02, 0x54, 0x53, 0x00, byte(n), 0x02}
}
