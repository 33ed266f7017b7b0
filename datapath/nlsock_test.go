package datapath

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// nlMsg builds one netlink message: header fields and payload.
func nlMsg(typ, flags uint16, seq, pid uint32, payload []byte) []byte {
	ln := unix.NLMSG_HDRLEN + len(payload)
	b := make([]byte, (ln+3)&^3)
	binary.NativeEndian.PutUint32(b, uint32(ln))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint16(b[6:], flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	binary.NativeEndian.PutUint32(b[12:], pid)
	copy(b[unix.NLMSG_HDRLEN:], payload)
	return b
}

func errnoPayload(errno int32, rest ...byte) []byte {
	b := binary.NativeEndian.AppendUint32(nil, uint32(errno))
	return append(b, rest...)
}

// An exchange reads the answers with its own sequence number and port,
// in order, and ends where the kernel says: a dump's end, an
// acknowledgement, an error with its reason, a single reply. What another
// exchange left behind is skipped; a dump reported interrupted says so.
func TestNLAnswers(t *testing.T) {
	const seq, pid = 7, 4242
	reason := nl.NewRtAttr(nl.NLMSGERR_ATTR_MSG, append([]byte("Unknown device type"), 0)).Serialize()
	capped := nlMsg(unix.RTM_NEWLINK, unix.NLM_F_REQUEST, seq, pid, nil)[:unix.NLMSG_HDRLEN]
	binary.NativeEndian.PutUint32(capped, 64) // the request's own length, its payload left out
	for _, tc := range []struct {
		name     string
		datagram [][]byte
		got      []string // payloads passed on
		done     bool
		intr     bool
		err      string // "" none
	}{
		{"a dump in two datagrams", [][]byte{
			append(nlMsg(unix.RTM_NEWLINK, unix.NLM_F_MULTI, seq, pid, []byte("a")), nlMsg(unix.RTM_NEWLINK, unix.NLM_F_MULTI, seq, pid, []byte("b"))...),
			nlMsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, pid, errnoPayload(0)),
		}, []string{"a", "b"}, true, false, ""},
		{"what an earlier exchange left is skipped", [][]byte{
			append(nlMsg(unix.RTM_NEWLINK, unix.NLM_F_MULTI, seq-1, pid, []byte("old")), nlMsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq-1, pid, errnoPayload(0))...),
			append(nlMsg(unix.RTM_NEWLINK, unix.NLM_F_MULTI, seq, pid, []byte("new")), nlMsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, pid, errnoPayload(0))...),
		}, []string{"new"}, true, false, ""},
		{"answers of another type are left out", [][]byte{
			append(nlMsg(unix.RTM_NEWADDR, unix.NLM_F_MULTI, seq, pid, []byte("x")), nlMsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, pid, nil)...),
		}, nil, true, false, ""},
		{"an interrupted dump", [][]byte{
			append(nlMsg(unix.RTM_NEWLINK, unix.NLM_F_MULTI|unix.NLM_F_DUMP_INTR, seq, pid, []byte("a")), nlMsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, pid, nil)...),
		}, []string{"a"}, true, true, ""},
		{"an acknowledgement", [][]byte{nlMsg(unix.NLMSG_ERROR, 0, seq, pid, errnoPayload(0))}, nil, true, false, ""},
		{"a single reply", [][]byte{nlMsg(unix.RTM_NEWLINK, 0, seq, pid, []byte("one"))}, []string{"one"}, true, false, ""},
		{"an error with the kernel's reason", [][]byte{
			nlMsg(unix.NLMSG_ERROR, unix.NLM_F_CAPPED|unix.NLM_F_ACK_TLVS, seq, pid, errnoPayload(-int32(unix.EOPNOTSUPP), append(capped, reason...)...)),
		}, nil, true, false, "operation not supported: Unknown device type"},
		{"an error without a reason", [][]byte{nlMsg(unix.NLMSG_ERROR, 0, seq, pid, errnoPayload(-int32(unix.ENODEV)))}, nil, true, false, "no such device"},
		{"a dump that ends in an error", [][]byte{nlMsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, pid, errnoPayload(-int32(unix.EBUSY)))}, nil, true, false, "device or resource busy"},
		{"a malformed length", [][]byte{nlMsg(unix.RTM_NEWLINK, unix.NLM_F_MULTI, seq, pid, []byte("abcd"))[:18]}, nil, true, false, "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &nlSocket{seq: seq, pid: pid}
			var got []string
			var fnErr error
			intr, done := false, false
			var err error
			for _, d := range tc.datagram {
				if done, err = s.answers(d, unix.RTM_NEWLINK, func(m []byte) error { got = append(got, string(m)); return nil }, &fnErr, &intr); done {
					break
				}
			}
			if strings.Join(got, ",") != strings.Join(tc.got, ",") || done != tc.done || intr != tc.intr {
				t.Errorf("passed on %q, done %v, interrupted %v; want %q, %v, %v", got, done, intr, tc.got, tc.done, tc.intr)
			}
			if (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("error %v; want %q", err, tc.err)
			}
		})
	}
}

// The kernel's own error comes back with its errno and, where it gives
// one, its reason; the socket then serves the next exchange.
func TestNLSocketKernelError(t *testing.T) {
	n := richNetns(t)
	err := n.rtnl().request(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL,
		nl.NewIfInfomsg(unix.AF_UNSPEC),
		nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated("bad0")),
		linkInfo("no-such-kind"))
	if err == nil || !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOENT) {
		t.Fatalf("adding a link of an unknown kind: %v; want the kernel's EOPNOTSUPP (or ENOENT)", err)
	}
	t.Logf("the kernel's error: %v", err)
	if _, lerr := n.dumpLinks(); lerr != nil {
		t.Fatalf("a dump after the error: %v", lerr)
	}
	if err := n.rtnl().request(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL,
		nl.NewIfInfomsg(unix.AF_UNSPEC), nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated("tsi9")), linkInfo("ifb")); err != nil {
		t.Fatalf("adding an ifb after the error: %v", err)
	}
	l, err := libOf(t, n).LinkByName("tsi9")
	if err != nil || l.Type() != "ifb" {
		t.Fatalf("the ifb added: %v, %v", l, err)
	}
}

func linkInfo(kind string) *nl.RtAttr {
	li := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	li.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated(kind))
	return li
}

// Whatever a datagram holds, reading it does not panic.
func FuzzNLAnswers(f *testing.F) {
	f.Add(nlMsg(unix.NLMSG_ERROR, unix.NLM_F_ACK_TLVS, 1, 1, errnoPayload(-1, 16, 0, 0, 0)))
	f.Add(append(nlMsg(unix.RTM_NEWLINK, unix.NLM_F_MULTI, 1, 1, []byte("ab")), nlMsg(unix.NLMSG_DONE, 0, 1, 1, nil)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := &nlSocket{seq: 1, pid: 1}
		var fnErr error
		var intr bool
		_, _ = s.answers(b, 0, func([]byte) error { return nil }, &fnErr, &intr)
	})
}

// libOf is n's library handle, opened if it was not.
func libOf(t testing.TB, n *Netns) *netlink.Handle {
	t.Helper()
	h, err := n.lib()
	if err != nil {
		t.Fatal(err)
	}
	return h
}
