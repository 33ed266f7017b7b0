package datapath

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// rtextFilterSkipStats (RTEXT_FILTER_SKIP_STATS) asks the kernel to leave
// a link's counters out of a link dump: nothing here reads them.
const rtextFilterSkipStats = 1 << 3

// decodedDump runs one dump of typ on the Netns's own socket, with the
// request data data, and decodes each answer of type resType with parse
// (a nil result is skipped); see parsedDump.
func decodedDump[T comparable](n *Netns, typ int, resType uint16, parse func([]byte) (T, error), data ...nl.NetlinkRequestData) ([]T, error) {
	var none T
	return parsedDump(n.dumper, typ, resType, func(m []byte) (T, bool, error) {
		v, err := parse(m)
		return v, err == nil && v != none, err
	}, data...)
}

// parsedDump runs one dump of typ on socket s, with the request data
// data, and decodes each answer of type resType with parse, which says
// which results to keep; it is repeated while the kernel reports the dump
// interrupted. After parse's first failure the rest of the dump is
// drained unread, and that failure is returned. parse must keep no part
// of the message: the buffer is reused.
func parsedDump[T any](s *nlSocket, typ int, resType uint16, parse func([]byte) (T, bool, error), data ...nl.NetlinkRequestData) ([]T, error) {
	return dump(func() ([]T, error) {
		req := nl.NewNetlinkRequest(typ, unix.NLM_F_DUMP)
		for _, d := range data {
			req.AddData(d)
		}
		var (
			out    []T
			failed bool
		)
		err := s.exchange(req, resType, func(m []byte) error {
			if failed {
				return nil // the rest is drained unread: the first error stands
			}
			v, keep, err := parse(m)
			if err != nil {
				failed = true
				return err
			}
			if keep {
				out = append(out, v)
			}
			return nil
		})
		return out, err
	})
}

// dumpLinks lists the links of the netns in one dump on the Netns's own
// socket, decoded by parseLink.
// Equivalent to: ip -n <netns> link show
func (n *Netns) dumpLinks() ([]netlink.Link, error) {
	return decodedDump(n, unix.RTM_GETLINK, unix.RTM_NEWLINK, parseLink, linkDumpRequest()...)
}

// linkDumpRequest is the request data of every link dump: all families,
// no statistics.
func linkDumpRequest() []nl.NetlinkRequestData {
	return []nl.NetlinkRequestData{nl.NewIfInfomsg(unix.AF_UNSPEC), nl.NewRtAttr(unix.IFLA_EXT_MASK, nl.Uint32Attr(rtextFilterSkipStats))}
}

// observedLink is a link of Observe's link dump, and whether its root
// qdisc is a plain one (plainRootQdiscs).
type observedLink struct {
	link  netlink.Link
	plain bool
}

// dumpObservation starts Observe's observation with its link dump, each
// link with whether its root qdisc is plain, which tells Observe whether
// it needs the qdisc dump at all. (The dump's links are collected first
// and only then kept: a dump the kernel interrupts is read again.)
func (n *Netns) dumpObservation() (*observation, error) {
	ls, err := parsedDump(n.dumper, unix.RTM_GETLINK, unix.RTM_NEWLINK, func(m []byte) (observedLink, bool, error) {
		l, plain, err := parseLinkQdisc(m)
		return observedLink{l, plain}, err == nil && l != nil, err
	}, linkDumpRequest()...)
	if err != nil {
		return nil, fmt.Errorf("list links in netns %s: %w", n.path, err)
	}
	o := &observation{links: make([]netlink.Link, len(ls)), plainRoot: make(map[int]bool, len(ls)), filters: map[int][]netlink.Filter{}}
	for i, l := range ls {
		o.links[i] = l.link
		if l.plain {
			o.plainRoot[l.link.Attrs().Index] = true
		}
	}
	return o, nil
}

// parseLink decodes an RTM_NEWLINK message into the netlink library's
// types, with the fields this package reads: the attributes of every link,
// a tap's or tun's flags and queues, a macvtap's mode, and the kind, which
// Type() returns as the library's own decoding would. It copies what it
// keeps, so the message's buffer may be reused.
func parseLink(m []byte) (netlink.Link, error) {
	l, _, err := parseLinkQdisc(m)
	return l, err
}

// parseLinkQdisc is parseLink, and whether the kind of the link's root
// qdisc (IFLA_QDISC, which the library's types have no field for) is a
// plain one (plainRootQdiscs; no IFLA_QDISC is not).
func parseLinkQdisc(m []byte) (netlink.Link, bool, error) {
	if len(m) < unix.SizeofIfInfomsg {
		return nil, false, fmt.Errorf("short link message (%d bytes)", len(m))
	}
	msg := nl.DeserializeIfInfomsg(m)
	a := netlink.NewLinkAttrs()
	a.Index, a.RawFlags, a.Flags = int(msg.Index), msg.Flags, linkFlags(msg.Flags)
	var kind string
	var data []byte
	plain := false
	err := walkAttrs(m[unix.SizeofIfInfomsg:], func(typ uint16, v []byte) error {
		switch typ {
		case unix.IFLA_IFNAME:
			a.Name = cstring(v)
		case unix.IFLA_QDISC:
			plain = plainRootQdiscs[string(bytes.TrimRight(v, "\x00"))] // no copy made
		case unix.IFLA_ADDRESS:
			if slices.ContainsFunc(v, func(b byte) bool { return b != 0 }) {
				a.HardwareAddr = net.HardwareAddr(append([]byte(nil), v...))
			}
		case unix.IFLA_MTU:
			a.MTU = int(u32(v))
		case unix.IFLA_LINK:
			a.ParentIndex = int(u32(v))
		case unix.IFLA_MASTER:
			a.MasterIndex = int(u32(v))
		case unix.IFLA_TXQLEN:
			a.TxQLen = int(u32(v))
		case unix.IFLA_NUM_TX_QUEUES:
			a.NumTxQueues = int(u32(v))
		case unix.IFLA_NUM_RX_QUEUES:
			a.NumRxQueues = int(u32(v))
		case unix.IFLA_OPERSTATE:
			if len(v) >= 1 {
				a.OperState = netlink.LinkOperState(v[0])
			}
		case unix.IFLA_LINK_NETNSID:
			if len(v) >= 4 {
				a.NetNsID = int(int32(u32(v)))
			}
		case unix.IFLA_PROP_LIST:
			a.AltNames = []string{}
			return walkAttrs(v, func(typ uint16, v []byte) error {
				if typ == unix.IFLA_ALT_IFNAME {
					a.AltNames = append(a.AltNames, cstring(v))
				}
				return nil
			})
		case unix.IFLA_LINKINFO:
			var err error
			kind, data, err = kindAndData(v, unix.IFLA_INFO_KIND, unix.IFLA_INFO_DATA)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("link message for ifindex %d (%s): %w", msg.Index, a.Name, err)
	}
	switch kind {
	case "":
		return &netlink.Device{LinkAttrs: a}, plain, nil
	case "tun":
		t, err := tuntapOf(a, data)
		if err != nil {
			return nil, false, err
		}
		return t, plain, nil
	case "macvtap":
		m := &netlink.Macvtap{Macvlan: netlink.Macvlan{LinkAttrs: a}}
		err := walkAttrs(data, func(typ uint16, v []byte) error {
			if typ == unix.IFLA_MACVLAN_MODE {
				m.Mode = macvlanModeOf[u32(v)]
			}
			return nil
		})
		if err != nil {
			return nil, false, fmt.Errorf("link %s: macvtap data: %w", a.Name, err)
		}
		return m, plain, nil
	}
	return &netlink.GenericLink{LinkAttrs: a, LinkType: kind}, plain, nil
}

// tuntapOf is a tun or tap device with its IFLA_TUN_* data.
func tuntapOf(a netlink.LinkAttrs, data []byte) (*netlink.Tuntap, error) {
	t := &netlink.Tuntap{LinkAttrs: a}
	on := func(v []byte) bool { return len(v) >= 1 && v[0] == 1 }
	err := walkAttrs(data, func(typ uint16, v []byte) error {
		switch typ {
		case unix.IFLA_TUN_OWNER:
			t.Owner = u32(v)
		case unix.IFLA_TUN_GROUP:
			t.Group = u32(v)
		case unix.IFLA_TUN_TYPE:
			if len(v) >= 1 {
				t.Mode = netlink.TuntapMode(v[0])
			}
		case unix.IFLA_TUN_PI:
			if len(v) >= 1 && v[0] == 0 {
				t.Flags |= netlink.TUNTAP_NO_PI
			}
		case unix.IFLA_TUN_VNET_HDR:
			if on(v) {
				t.Flags |= netlink.TUNTAP_VNET_HDR
			}
		case unix.IFLA_TUN_PERSIST:
			t.NonPersist = len(v) >= 1 && v[0] == 0
		case unix.IFLA_TUN_MULTI_QUEUE:
			if on(v) {
				t.Flags |= netlink.TUNTAP_MULTI_QUEUE
			}
		case unix.IFLA_TUN_NUM_QUEUES:
			t.Queues = int(u32(v))
		case unix.IFLA_TUN_NUM_DISABLED_QUEUES:
			t.DisabledQueues = int(u32(v))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("link %s: tun data: %w", a.Name, err)
	}
	return t, nil
}

// dumpQdiscs lists every qdisc of the netns in one dump on the Netns's
// own socket, each as a GenericQdisc: its link, handle, parent and kind
// are all this package reads of a listing.
// Equivalent to: tc -n <netns> qdisc show
func (n *Netns) dumpQdiscs() ([]netlink.Qdisc, error) {
	return decodedDump(n, unix.RTM_GETQDISC, unix.RTM_NEWQDISC, parseQdisc, &nl.TcMsg{Family: unix.AF_UNSPEC})
}

// parseQdisc decodes an RTM_NEWQDISC message.
func parseQdisc(m []byte) (netlink.Qdisc, error) {
	if len(m) < nl.SizeofTcMsg {
		return nil, fmt.Errorf("short qdisc message (%d bytes)", len(m))
	}
	msg := nl.DeserializeTcMsg(m)
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: int(msg.Ifindex), Handle: msg.Handle, Parent: msg.Parent, Refcnt: msg.Info,
	}}
	err := walkAttrs(m[nl.SizeofTcMsg:], func(typ uint16, v []byte) error {
		if typ == unix.TCA_KIND {
			q.QdiscType = cstring(v)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("qdisc %s on link %d: %w", netlink.HandleStr(msg.Handle), msg.Ifindex, err)
	}
	return q, nil
}

// parseHTBClass decodes an RTM_NEWTCLASS message: an HTB class with its
// parameters, as the library reads them (a 64-bit rate or ceiling, when
// the kernel sends one, over the 32-bit one); nil for a class of another
// kind.
func parseHTBClass(m []byte) (*netlink.HtbClass, error) {
	if len(m) < nl.SizeofTcMsg {
		return nil, fmt.Errorf("short class message (%d bytes)", len(m))
	}
	msg := nl.DeserializeTcMsg(m)
	kind, opts, err := kindAndData(m[nl.SizeofTcMsg:], unix.TCA_KIND, unix.TCA_OPTIONS)
	if err != nil {
		return nil, fmt.Errorf("class %s on link %d: %w", netlink.HandleStr(msg.Handle), msg.Ifindex, err)
	}
	if kind != "htb" {
		return nil, nil
	}
	c := &netlink.HtbClass{ClassAttrs: netlink.ClassAttrs{LinkIndex: int(msg.Ifindex), Handle: msg.Handle, Parent: msg.Parent}}
	var rate64, ceil64 []byte
	err = walkAttrs(opts, func(typ uint16, v []byte) error {
		switch typ {
		case nl.TCA_HTB_PARMS:
			if len(v) < nl.SizeofTcHtbCopt {
				return fmt.Errorf("htb parameters of %d bytes", len(v))
			}
			opt := nl.DeserializeTcHtbCopt(v)
			c.Rate, c.Ceil = uint64(opt.Rate.Rate), uint64(opt.Ceil.Rate)
			c.Buffer, c.Cbuffer, c.Quantum, c.Level, c.Prio = opt.Buffer, opt.Cbuffer, opt.Quantum, opt.Level, opt.Prio
		case nl.TCA_HTB_RATE64:
			rate64 = v
		case nl.TCA_HTB_CEIL64:
			ceil64 = v
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("htb class %s on link %d: %w", netlink.HandleStr(msg.Handle), msg.Ifindex, err)
	}
	if len(rate64) >= 8 {
		c.Rate = binary.NativeEndian.Uint64(rate64)
	}
	if len(ceil64) >= 8 {
		c.Ceil = binary.NativeEndian.Uint64(ceil64)
	}
	return c, nil
}

// dumpFilters lists the filters at parent on link in one dump on the
// Netns's own socket: u32 filters with their mirred actions (what this
// package adds and reads), any other kind as a GenericFilter.
// Equivalent to: tc -n <netns> filter show dev LINK parent PARENT
func (n *Netns) dumpFilters(link netlink.Link, parent uint32) ([]netlink.Filter, error) {
	return decodedDump(n, unix.RTM_GETTFILTER, unix.RTM_NEWTFILTER, parseFilter,
		&nl.TcMsg{Family: unix.AF_UNSPEC, Ifindex: int32(link.Attrs().Index), Parent: parent})
}

// parseFilter decodes an RTM_NEWTFILTER message: its attributes, and for
// a u32 filter its mirred actions (other actions are left out). It is
// nil for a message that describes no filter.
func parseFilter(m []byte) (netlink.Filter, error) {
	if len(m) < nl.SizeofTcMsg {
		return nil, fmt.Errorf("short filter message (%d bytes)", len(m))
	}
	msg := nl.DeserializeTcMsg(m)
	fa := netlink.FilterAttrs{LinkIndex: int(msg.Ifindex), Handle: msg.Handle, Parent: msg.Parent}
	fa.Priority, fa.Protocol = netlink.MajorMinor(msg.Info)
	fa.Protocol = nl.Swap16(fa.Protocol)
	var (
		kind    string
		actions []netlink.Action
		// A message without options (a u32 without a selector: a hash
		// table) is a chain's or table's, not a filter's: skipped, as
		// the library skips it.
		filter bool
	)
	err := walkAttrs(m[nl.SizeofTcMsg:], func(typ uint16, v []byte) error {
		switch typ {
		case unix.TCA_KIND:
			kind = cstring(v)
		case unix.TCA_CHAIN:
			if len(v) >= 4 {
				c := u32(v)
				fa.Chain = &c
			}
		case unix.TCA_OPTIONS:
			if kind != "u32" {
				filter = true
				return nil
			}
			return walkAttrs(v, func(typ uint16, v []byte) error {
				if typ == nl.TCA_U32_SEL {
					filter = true
				}
				if typ != nl.TCA_U32_ACT {
					return nil
				}
				return walkAttrs(v, func(_ uint16, v []byte) error {
					a, err := parseMirred(v)
					if a != nil {
						actions = append(actions, a)
					}
					return err
				})
			})
		}
		return nil
	})
	switch {
	case err != nil:
		return nil, fmt.Errorf("filter prio %d on link %d: %w", fa.Priority, msg.Ifindex, err)
	case !filter:
		return nil, nil
	case kind == "u32":
		return &netlink.U32{FilterAttrs: fa, Actions: actions}, nil
	}
	return &netlink.GenericFilter{FilterAttrs: fa, FilterType: kind}, nil
}

// parseMirred decodes one action of a filter's action list: a mirred
// action, or nil for any other kind.
func parseMirred(b []byte) (*netlink.MirredAction, error) {
	kind, opts, err := kindAndData(b, nl.TCA_ACT_KIND, nl.TCA_ACT_OPTIONS)
	if err != nil || kind != "mirred" {
		return nil, err
	}
	a := &netlink.MirredAction{}
	err = walkAttrs(opts, func(typ uint16, v []byte) error {
		if typ != nl.TCA_MIRRED_PARMS {
			return nil
		}
		// struct tc_mirred: index, capab, action, refcnt, bindcnt,
		// eaction, ifindex.
		if len(v) < 7*4 {
			return fmt.Errorf("mirred parameters of %d bytes", len(v))
		}
		f := func(i int) uint32 { return binary.NativeEndian.Uint32(v[4*i:]) }
		a.ActionAttrs = netlink.ActionAttrs{Index: int(f(0)), Capab: int(f(1)), Action: netlink.TcAct(int32(f(2))),
			Refcnt: int(int32(f(3))), Bindcnt: int(int32(f(4)))}
		a.MirredAction, a.Ifindex = netlink.MirredAct(int32(f(5))), int(f(6))
		return nil
	})
	return a, err
}

// kindAndData reads, from the attributes in b, a kind (the attribute of
// type kindType, a C string) and that kind's own attributes (dataType):
// the shape of a link's IFLA_LINKINFO, a tc object's TCA_KIND and
// TCA_OPTIONS, and an action's TCA_ACT_KIND and TCA_ACT_OPTIONS.
func kindAndData(b []byte, kindType, dataType uint16) (kind string, data []byte, err error) {
	err = walkAttrs(b, func(typ uint16, v []byte) error {
		switch typ {
		case kindType:
			kind = cstring(v)
		case dataType:
			data = v
		}
		return nil
	})
	return kind, data, err
}

// macvlanModeOf maps the kernel's MACVLAN_MODE_* bits to the library's
// modes.
var macvlanModeOf = map[uint32]netlink.MacvlanMode{
	nl.MACVLAN_MODE_PRIVATE:  netlink.MACVLAN_MODE_PRIVATE,
	nl.MACVLAN_MODE_VEPA:     netlink.MACVLAN_MODE_VEPA,
	nl.MACVLAN_MODE_BRIDGE:   netlink.MACVLAN_MODE_BRIDGE,
	nl.MACVLAN_MODE_PASSTHRU: netlink.MACVLAN_MODE_PASSTHRU,
	nl.MACVLAN_MODE_SOURCE:   netlink.MACVLAN_MODE_SOURCE,
}

// linkFlags turns a link's IFF_* flags into net.Flags.
func linkFlags(raw uint32) net.Flags {
	var f net.Flags
	for _, b := range [...]struct {
		iff  uint32
		flag net.Flags
	}{
		{unix.IFF_UP, net.FlagUp}, {unix.IFF_BROADCAST, net.FlagBroadcast}, {unix.IFF_LOOPBACK, net.FlagLoopback},
		{unix.IFF_POINTOPOINT, net.FlagPointToPoint}, {unix.IFF_MULTICAST, net.FlagMulticast}, {unix.IFF_RUNNING, net.FlagRunning},
	} {
		if raw&b.iff != 0 {
			f |= b.flag
		}
	}
	return f
}

// cstring is a NUL-terminated attribute as a string.
func cstring(v []byte) string { return strings.TrimRight(string(v), "\x00") }
