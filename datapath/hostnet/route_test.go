package hostnet

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"
)

// TestObservedMessage: a route message is let through by its header
// alone when it is a unicast route of the main table that the kernel did
// not derive and that is not cloned; a payload too short for a header is
// left to the parser.
func TestObservedMessage(t *testing.T) {
	msg := func(table, typ, proto uint8, flags uint32) []byte {
		b := make([]byte, unix.SizeofRtMsg+8) // room for an attribute
		b[0], b[4], b[5], b[7] = unix.AF_INET, table, proto, typ
		binary.NativeEndian.PutUint32(b[8:12], flags)
		return b
	}
	for _, c := range []struct {
		name string
		data []byte
		want bool
	}{
		{"main, unicast, boot", msg(unix.RT_TABLE_MAIN, unix.RTN_UNICAST, unix.RTPROT_BOOT, 0), true},
		{"main, unicast, static", msg(unix.RT_TABLE_MAIN, unix.RTN_UNICAST, unix.RTPROT_STATIC, 0), true},
		{"main, the kernel's", msg(unix.RT_TABLE_MAIN, unix.RTN_UNICAST, unix.RTPROT_KERNEL, 0), false},
		{"main, local", msg(unix.RT_TABLE_MAIN, unix.RTN_LOCAL, unix.RTPROT_BOOT, 0), false},
		{"local table", msg(unix.RT_TABLE_LOCAL, unix.RTN_UNICAST, unix.RTPROT_BOOT, 0), false},
		{"table 100", msg(100, unix.RTN_UNICAST, unix.RTPROT_BOOT, 0), false},
		{"a table past 255", msg(unix.RT_TABLE_COMPAT, unix.RTN_UNICAST, unix.RTPROT_BOOT, 0), false},
		{"cloned", msg(unix.RT_TABLE_MAIN, unix.RTN_UNICAST, unix.RTPROT_BOOT, unix.RTM_F_CLONED), false},
		{"other flags", msg(unix.RT_TABLE_MAIN, unix.RTN_UNICAST, unix.RTPROT_BOOT, unix.RTM_F_NOTIFY), true},
		{"too short", make([]byte, unix.SizeofRtMsg-1), true},
	} {
		if got := ObservedMessage(c.data); got != c.want {
			t.Errorf("%s: ObservedMessage = %v, want %v", c.name, got, c.want)
		}
	}
}
