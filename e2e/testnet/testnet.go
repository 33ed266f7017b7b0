// Package testnet builds throwaway network namespaces and links for
// privileged tests, with iproute2, and removes them when the test ends,
// pass or fail. It is test support only: nothing in the daemon imports it.
package testnet

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// SkipUnlessRoot skips t with a clear message when not running as root.
func SkipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root for network namespaces, taps and tc (run `make test` as root)")
	}
}

// NS is a throwaway named network namespace.
type NS struct {
	Name string
	Path string // /var/run/netns/<Name>
}

// NewNS creates a network namespace with a unique name and deletes it
// in t.Cleanup. Loopback is brought up.
func NewNS(t testing.TB, prefix string) NS {
	t.Helper()
	SkipUnlessRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	name := prefix + "-" + hex.EncodeToString(b)
	IP(t, "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Logf("cleanup: ip netns del %s: %v: %s", name, err, out)
		}
	})
	IP(t, "-n", name, "link", "set", "lo", "up")
	return NS{Name: name, Path: "/var/run/netns/" + name}
}

// Run runs a command and fails t with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Output runs a command and returns its standard output alone; it fails
// t with its error output if it fails. iproute2 writes notes about
// namespaces other than the one shown to stderr (an nsid of a netns that
// another process is still mounting: "Peer netns reference is invalid"):
// they are not what the command shows.
func Output(t testing.TB, name string, args ...string) string {
	t.Helper()
	var stderr strings.Builder
	cmd := exec.Command(name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// IP runs the ip command and returns what it shows: its standard output
// (see Output), so that what a test compares or parses never holds a
// note about another test's netns.
func IP(t testing.TB, args ...string) string {
	t.Helper()
	return Output(t, "ip", args...)
}

// Veth creates a veth pair: name (with mac, if given) inside ns, and
// peer inside peerNS, both up. The pair disappears with either netns.
func Veth(t testing.TB, ns NS, name string, mac net.HardwareAddr, peerNS NS, peer string) {
	t.Helper()
	args := []string{"-n", ns.Name, "link", "add", "name", name}
	if mac != nil {
		args = append(args, "address", mac.String())
	}
	args = append(args, "type", "veth", "peer", "name", peer, "netns", peerNS.Name)
	IP(t, args...)
	IP(t, "-n", ns.Name, "link", "set", name, "up")
	IP(t, "-n", peerNS.Name, "link", "set", peer, "up")
}
