package testcni

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tapsync/tapsync/e2e/testnet"
)

// want is what CNI ADD should leave in the pod netns.
type want struct {
	kind   string       // netlink link type: veth, macvlan
	mtu    int          // 0: 1500
	addrs  int          // global addresses expected (each must be in the result)
	routes []string     // "dst via gw", the non-kernel routes on the link
	ping   []netip.Addr // filled from the result: addresses the node must reach
}

// A /30 leaves host-local exactly one address besides the gateway, so a
// second ADD succeeds only if DEL released the first lease.
func slash30() netip.Prefix { return netip.PrefixFrom(Subnet4().Addr(), 30) }

func TestNetworks(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	cases := []struct {
		name  string
		setup func(p *Plugins) (Network, want)
	}{
		{"bridge", func(p *Plugins) (Network, want) {
			s := slash30()
			return Bridge(UniqueName("net"), UniqueName("br"), s, WithMTU(1400)),
				want{kind: "veth", mtu: 1400, addrs: 1, routes: []string{"0.0.0.0/0 via " + Gateway(s).String()}}
		}},
		{"bridge-routes", func(p *Plugins) (Network, want) {
			s := slash30()
			wide := netip.PrefixFrom(s.Addr(), 16).Masked()
			return Bridge(UniqueName("net"), UniqueName("br"), s, WithRoutes(wide)),
				want{kind: "veth", addrs: 1, routes: []string{wide.String() + " via " + Gateway(s).String()}}
		}},
		{"bridge-dualstack", func(p *Plugins) (Network, want) {
			v4, v6 := slash30(), Subnet6()
			return BridgeDualStack(UniqueName("net"), UniqueName("br"), v4, v6),
				want{kind: "veth", addrs: 2, routes: []string{
					"0.0.0.0/0 via " + Gateway(v4).String(),
					"::/0 via " + Gateway(v6).String(),
				}}
		}},
		{"macvlan", func(p *Plugins) (Network, want) {
			s := slash30()
			master := UniqueName("mvm")
			p.AddMacvlanMaster(master, s)
			return Macvlan(UniqueName("net"), master, s, WithMTU(1400)),
				want{kind: "macvlan", mtu: 1400, addrs: 1, routes: []string{"0.0.0.0/0 via " + Gateway(s).String()}}
		}},
		{"l2only", func(p *Plugins) (Network, want) {
			return L2Only(UniqueName("net"), UniqueName("br"), WithMTU(1400)), want{kind: "veth", mtu: 1400}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			p := New(t)
			pod := testnet.NewNS(t, "cnipod")
			network, w := tc.setup(p)
			t.Logf("conflist: %s", network.Conf)

			res, err := p.Add(ctx, network, "ctr-a", pod.Path, "net1")
			if err != nil {
				t.Fatal(err)
			}
			// Whatever happens below, leave no attachment behind.
			t.Cleanup(func() { _ = p.Del(context.Background(), network, "ctr-a", pod.Path, "net1") })
			check(t, pod, "net1", res, w)
			for _, ip := range res.IPs {
				if err := p.Ping(ctx, netip.MustParseAddr(ip.Address.IP.String())); err != nil {
					t.Fatal(err)
				}
			}
			if w.addrs == 0 {
				pingL2(ctx, t, p, pod, network)
			}
			hostSideInNode(t, p, network)

			if err := p.Del(ctx, network, "ctr-a", pod.Path, "net1"); err != nil {
				t.Fatal(err)
			}
			if _, err := testnet.Handle(t, pod).LinkByName("net1"); !isNotFound(err) {
				t.Fatalf("net1 in %s after DEL: err=%v, want link not found", pod.Name, err)
			}
			if l, err := p.Leases(network); err != nil || len(l) != 0 {
				t.Fatalf("leases of %s after DEL: %v, %v; want none", network.Name, l, err)
			}
			if err := p.Del(ctx, network, "ctr-a", pod.Path, "net1"); err != nil {
				t.Fatalf("second DEL: %v", err)
			}

			// Another attachment (Multus adds with a new container ID after
			// a pod restart) gets an address again: on a /30 only if the
			// first lease was released.
			res2, err := p.Add(ctx, network, "ctr-b", pod.Path, "net1")
			if err != nil {
				t.Fatalf("ADD after DEL: %v", err)
			}
			t.Cleanup(func() { _ = p.Del(context.Background(), network, "ctr-b", pod.Path, "net1") })
			check(t, pod, "net1", res2, w)
			if err := p.Del(ctx, network, "ctr-b", pod.Path, "net1"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestSecondNetwork adds a network next to one the pod already has, under
// the same container ID, as Multus' dynamic networks controller does.
func TestSecondNetwork(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := New(t)
	pod := testnet.NewNS(t, "cnipod")
	s1, s2 := Subnet4(), Subnet4()
	n1 := Bridge(UniqueName("net"), UniqueName("br"), s1)
	n2 := Bridge(UniqueName("net"), UniqueName("br"), s2, WithRoutes(netip.MustParsePrefix("10.199.0.0/16")))
	r1, err := p.Add(ctx, n1, "ctr", pod.Path, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Del(context.Background(), n1, "ctr", pod.Path, "eth0") })
	r2, err := p.Add(ctx, n2, "ctr", pod.Path, "net1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Del(context.Background(), n2, "ctr", pod.Path, "net1") })
	check(t, pod, "eth0", r1, want{kind: "veth", addrs: 1, routes: []string{"0.0.0.0/0 via " + Gateway(s1).String()}})
	check(t, pod, "net1", r2, want{kind: "veth", addrs: 1, routes: []string{"10.199.0.0/16 via " + Gateway(s2).String()}})

	if err := p.Del(ctx, n2, "ctr", pod.Path, "net1"); err != nil {
		t.Fatal(err)
	}
	if _, err := testnet.Handle(t, pod).LinkByName("eth0"); err != nil {
		t.Fatalf("eth0 after DEL of net1: %v", err)
	}
	if err := p.Ping(ctx, netip.MustParseAddr(r1.IPs[0].Address.IP.String())); err != nil {
		t.Fatal(err)
	}
}

// TestDelAfterNetnsGone: a pod's netns may be gone before its networks are
// deleted; DEL still succeeds and releases the lease.
func TestDelAfterNetnsGone(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := New(t)
	pod := testnet.NewNS(t, "cnipod")
	network := Bridge(UniqueName("net"), UniqueName("br"), Subnet4())
	if _, err := p.Add(ctx, network, "ctr", pod.Path, "net1"); err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "netns", "del", pod.Name)
	if err := p.Del(ctx, network, "ctr", pod.Path, "net1"); err != nil {
		t.Fatal(err)
	}
	if l, err := p.Leases(network); err != nil || len(l) != 0 {
		t.Fatalf("leases after DEL: %v, %v; want none", l, err)
	}
}

func check(t *testing.T, pod testnet.NS, ifname string, res *types100.Result, w want) {
	t.Helper()
	h := testnet.Handle(t, pod)
	link, err := h.LinkByName(ifname)
	if err != nil {
		t.Fatalf("%s in %s: %v", ifname, pod.Name, err)
	}
	a := link.Attrs()
	if got := link.Type(); got != w.kind {
		t.Errorf("%s kind = %s, want %s", ifname, got, w.kind)
	}
	mtu := w.mtu
	if mtu == 0 {
		mtu = 1500
	}
	if a.MTU != mtu {
		t.Errorf("%s mtu = %d, want %d", ifname, a.MTU, mtu)
	}
	if a.OperState != netlink.OperUp && a.Flags&net.FlagUp == 0 {
		t.Errorf("%s is down (%s)", ifname, a.OperState)
	}

	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatalf("addresses of %s: %v", ifname, err)
	}
	var got []string
	for _, ad := range addrs {
		if ad.Scope == unix.RT_SCOPE_UNIVERSE {
			got = append(got, ad.IPNet.String())
		}
	}
	var fromResult []string
	for _, ip := range res.IPs {
		fromResult = append(fromResult, ip.Address.String())
	}
	slices.Sort(got)
	slices.Sort(fromResult)
	if len(got) != w.addrs || !slices.Equal(got, fromResult) {
		t.Errorf("%s global addresses = %v, result says %v, want %d", ifname, got, fromResult, w.addrs)
	}

	routes, err := h.RouteList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatalf("routes of %s: %v", ifname, err)
	}
	var gotRoutes []string
	for _, r := range routes {
		if r.Protocol == unix.RTPROT_KERNEL || r.Table != unix.RT_TABLE_MAIN {
			continue
		}
		gotRoutes = append(gotRoutes, routeString(r))
	}
	wantRoutes := slices.Clone(w.routes)
	slices.Sort(gotRoutes)
	slices.Sort(wantRoutes)
	if !slices.Equal(gotRoutes, wantRoutes) {
		t.Errorf("%s routes = %q, want %q", ifname, gotRoutes, wantRoutes)
	}
}

func routeString(r netlink.Route) string {
	dst := "0.0.0.0/0"
	if r.Family == unix.AF_INET6 {
		dst = "::/0"
	}
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	if r.Gw == nil {
		return dst
	}
	return dst + " via " + r.Gw.String()
}

// hostSideInNode checks that the plugins built their host side in the node
// netns and left the real host alone.
func hostSideInNode(t *testing.T, p *Plugins, network Network) {
	t.Helper()
	var conf struct {
		Plugins []struct {
			Type   string `json:"type"`
			Bridge string `json:"bridge"`
		} `json:"plugins"`
	}
	mustUnmarshal(t, network.Conf, &conf)
	for _, pl := range conf.Plugins {
		if pl.Type != "bridge" {
			continue
		}
		testnet.IP(t, "-n", p.Node.Name, "link", "show", pl.Bridge)
		if _, err := netlink.LinkByName(pl.Bridge); !isNotFound(err) {
			t.Errorf("bridge %s in the host's own netns (err=%v): plugin did not run in the node netns", pl.Bridge, err)
		}
	}
}

// pingL2 proves an address-less attachment carries traffic: it puts
// addresses on both ends by hand and pings across the bridge.
func pingL2(ctx context.Context, t *testing.T, p *Plugins, pod testnet.NS, network Network) {
	t.Helper()
	var conf struct {
		Plugins []struct {
			Bridge string `json:"bridge"`
		} `json:"plugins"`
	}
	mustUnmarshal(t, network.Conf, &conf)
	s := slash30()
	gw, podAddr := Gateway(s), Gateway(s).Next()
	testnet.IP(t, "-n", p.Node.Name, "addr", "add", netip.PrefixFrom(gw, 30).String(), "dev", conf.Plugins[0].Bridge)
	testnet.IP(t, "-n", pod.Name, "addr", "add", netip.PrefixFrom(podAddr, 30).String(), "dev", "net1")
	if err := p.Ping(ctx, podAddr); err != nil {
		t.Fatal(err)
	}
	testnet.IP(t, "-n", pod.Name, "addr", "del", netip.PrefixFrom(podAddr, 30).String(), "dev", "net1")
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

func mustUnmarshal(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("parse conflist %s: %v", strings.TrimSpace(string(b)), err)
	}
}

// TestOpenErrors: Open, for programs without a testing.TB, reports what
// it cannot use instead of failing later in a plugin.
func TestOpenErrors(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	dir := t.TempDir()
	if _, err := Open(Config{Node: testnet.NS{Name: "nope", Path: dir + "/nope"}, IPAMDir: dir, CacheDir: dir}); err == nil || !strings.Contains(err.Error(), dir+"/nope") {
		t.Errorf("Open with a missing node netns: err = %v, want one naming it", err)
	}
	if _, err := Open(Config{Node: testnet.NewNS(t, "cninode")}); err == nil {
		t.Error("Open without IPAM and cache dirs succeeded")
	}
}
