package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NsidSocket asks one netns (its home) for the ids it gives other
// network namespaces (nsids), on a socket of its own: the netlink
// library's calls each left a 64 KB buffer of garbage, two per sandbox a
// watch begins. Its calls may come from any goroutine, one at a time.
type NsidSocket struct{ s *nlSocket }

// OpenNsidSocket opens an NsidSocket in the netns at home ("": the
// caller's own).
func OpenNsidSocket(home string) (*NsidSocket, error) {
	var s *nlSocket
	err := InNetns(home, func() error {
		var err error
		s, err = openNLSocket()
		return err
	})
	if err != nil {
		if s != nil {
			s.Close()
		}
		return nil, err
	}
	return &NsidSocket{s}, nil
}

// Close closes the socket.
func (n *NsidSocket) Close() error { return n.s.Close() }

// InNetns runs fn on an OS thread in the netns at path ("": here, on the
// calling goroutine), as Netns.Do does: for what the kernel ties to the
// calling thread's netns, a socket made.
func InNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	return OnThread(func() error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter netns %s: %w", path, err)
		}
		return nil
	}, fn)
}

// Nsid is the nsid home gives the netns open at fd, assigning one (the
// kernel picks it) when it has none and assign is set; -1 when it has
// none and assign is not set.
// Equivalent to: ip netns set <name> auto; ip netns list-id
func (n *NsidSocket) Nsid(fd int, assign bool) (int32, error) {
	if assign {
		// EEXIST: the netns has one. Asking first saves a lookup for each
		// netns of a start, when none has one yet.
		if err := n.s.ack(nsidRequest(unix.RTM_NEWNSID, unix.NLM_F_ACK, fd, -1)); err != nil && !errors.Is(err, unix.EEXIST) {
			return 0, fmt.Errorf("assign nsid: %w", err)
		}
	}
	id, found := int32(-1), false
	hdr := nl.NewRtGenMsg().Len()
	err := n.s.exchange(nsidRequest(unix.RTM_GETNSID, 0, fd, 0), unix.RTM_NEWNSID, func(m []byte) error {
		return walkAttrs(m[min(len(m), hdr):], func(typ uint16, v []byte) error {
			if typ == unix.NETNSA_NSID && len(v) >= 4 {
				id, found = int32(binary.NativeEndian.Uint32(v)), true
			}
			return nil
		})
	})
	switch {
	case err != nil:
		return 0, fmt.Errorf("get nsid: %w", err)
	case !found:
		return 0, errors.New("get nsid: the kernel's answer has none")
	case id < 0 && assign:
		return 0, errors.New("assign nsid: kernel assigned none")
	}
	return id, nil
}

// nsidRequest is an RTM_NEWNSID (with nsid: -1, the kernel picks) or an
// RTM_GETNSID about the netns open at fd.
func nsidRequest(typ, flags, fd int, nsid int32) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(typ, flags)
	req.AddData(nl.NewRtGenMsg())
	req.AddData(nl.NewRtAttr(unix.NETNSA_FD, nl.Uint32Attr(uint32(fd))))
	if typ == unix.RTM_NEWNSID {
		req.AddData(nl.NewRtAttr(unix.NETNSA_NSID, nl.Uint32Attr(uint32(nsid))))
	}
	return req
}
