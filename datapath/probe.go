package datapath

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ProbeKernel checks, in a fresh anonymous network namespace that
// disappears afterwards, that this kernel has what the tcfilter model
// needs: veth, multiqueue taps with vnet_hdr, the ingress qdisc, the u32
// classifier and the mirred action. It returns nil or an error naming the
// first missing piece.
func ProbeKernel() error {
	return OnThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("create a network namespace: %w", err)
		}
		return nil
	}, probeHere)
}

// probeHere runs on a thread inside the throwaway namespace.
func probeHere() error {
	h, err := netlink.NewHandleAt(netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	dumper, err := openNLSocket()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer dumper.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}, PeerName: "probe1"}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth (CONFIG_VETH): %w", err)
	}
	f, err := openTunQueue(TapName(0), unix.IFF_TAP|unix.IFF_NO_PI|unix.IFF_VNET_HDR|unix.IFF_MULTI_QUEUE)
	if err != nil {
		return fmt.Errorf("multiqueue tap (CONFIG_TUN, /dev/net/tun): %w", err)
	}
	defer f.Close()
	n := &Netns{path: "(probe)", h: h, dumper: dumper}
	tap, err := h.LinkByName(TapName(0))
	if err != nil {
		return fmt.Errorf("tap: %w", err)
	}
	link, err := h.LinkByName("probe0")
	if err != nil {
		return err
	}
	if _, _, err := n.ensureIngress(link); err != nil {
		return fmt.Errorf("ingress qdisc (CONFIG_NET_SCH_INGRESS): %w", err)
	}
	if err := n.ensureRedirect(link, tap); err != nil {
		return fmt.Errorf("u32 filter with mirred redirect (CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED): %w", err)
	}
	return nil
}
