package qmp

import (
	"fmt"
	"strconv"
	"strings"
)

// QEMU object ids of endpoint N. The fixed "tapsync-" prefix is how an
// object is recognised as ours; nothing without it is ever removed.
const (
	devicePrefix = "tapsync-net"
	netdevPrefix = "tapsync-netdev"
)

// DeviceID is the qdev id of the guest NIC of endpoint n: "tapsync-net<n>".
func DeviceID(n int) string { return devicePrefix + strconv.Itoa(n) }

// NetdevID is the id of the tap backend of endpoint n: "tapsync-netdev<n>".
func NetdevID(n int) string { return netdevPrefix + strconv.Itoa(n) }

// ParseDeviceID returns n for an id made by DeviceID(n). Only the canonical
// spelling is accepted ("tapsync-net03" and "tapsync-netdev3" are not ours).
func ParseDeviceID(id string) (n int, ok bool) {
	s, found := strings.CutPrefix(id, devicePrefix)
	if !found || s == "" || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, false
	}
	return n, true
}

// fdName names queue q's tap fd of endpoint n in the monitor's fd table (getfd).
func fdName(n, q int) string { return fmt.Sprintf("tapsync-fd%d-%d", n, q) }

// vhostFDName names queue q's vhost-net fd of endpoint n (getfd).
func vhostFDName(n, q int) string { return fmt.Sprintf("tapsync-vhostfd%d-%d", n, q) }
