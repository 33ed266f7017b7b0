package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tapsync/tapsync/e2e/testagent/control"
	"github.com/tapsync/tapsync/e2e/testcni"
	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
)

// B5, time to a usable network: a real CNI ADD (libcni, bridge +
// host-local) of a second network, net1, into a running sandbox whose
// guest runs the test agent, wired by tapsync (with the sandbox's agent)
// or by the floor's B5 mode, each on its own sandbox, alternating round
// by round; each round adds net1 and deletes it with CNI DEL, waiting
// for the wirer to finish between the two.
//
// Every time comes from its source, on one axis, the host's clock: the
// CNI ADD's return (the bench, around libcni's call), the link's first
// RTM_NEWLINK (the bench's own netlink subscription in the sandbox
// netns, stamped as its reader takes it), QEMU's trace (QMP commands,
// the guest's accesses to the ACPI hot-plug registers), and the guest
// agent's timeline (its link events, its calls, the guest kernel's
// messages, the ping's reply) on the guest's clock, moved to the host's
// by the offset measured that round (Clock calls; the one with the
// shortest round trip).

// b5Rounds is the default of -b5-rounds.
const b5Rounds = 20

// b5PingInterval is how often the guest sends another echo while none
// is answered.
const b5PingInterval = 50 * time.Millisecond

// clockSamples are the Clock calls of each of a round's two skew
// measurements.
const clockSamples = 5

// b5Steps are the points of a round after device_add answered, in the
// order a hot-plug goes through them, as the report names them.
var b5Steps = []string{
	"device_add received", "guest's ACPI handler", "PCI device found", "virtio driver binds", "agent sees link",
	"UpdateInterface received", "UpdateInterface finds link", "UpdateInterface with the address received", "address set",
	"UpdateRoutes received", "UpdateRoutes done", "first ping reply",
}

// b5Daemon are the points of tapsync's passes its log shows, in the
// order of a round.
var b5Daemon = []string{
	"trigger", "create-tap", "add-redirects", "plug-nic", "configure-guest", "first pass ends",
	"configure-guest with the address", "update-guest-routes after it", "last pass ends",
}

// Guest kernel messages that mark steps: the PCI core reporting a new
// virtio device ("pci 0000:01:1f.0: [1af4:1000] type 00 class
// 0x020000"), and the virtio-pci driver taking it ("virtio-pci
// 0000:01:1f.0: enabling device (0000 -> 0003)").
var (
	kmsgPCIFound  = regexp.MustCompile(`^pci [0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]: \[1af4:`)
	kmsgVirtioPCI = regexp.MustCompile(`^virtio-pci [0-9a-f]{4}:`)
)

// b5Result is one wirer's B5 samples (ms).
type b5Result struct {
	accel string
	// (a) CNI ADD returned → the guest interface has its address; (b) →
	// the first ping reply through it; (c) the link's first RTM_NEWLINK
	// → device_add answered.
	toAddr, toPing, toPlug []float64
	// The link's first RTM_NEWLINK → the guest interface has its address:
	// (a) from where the wirer can start, whenever CNI returns.
	linkToAddr []float64
	// (a) split: the guest's share (device_add answered → the link
	// exists in the guest) and the rest, the wirer's.
	guest, own []float64
	// Of the wirer's share, the agent's work on the request that set the
	// address, from when it had both that request and the link (the
	// later of the two) to its reply; and the rest, the wirer's own.
	agentWork, wirerOwn []float64
	// The guest's clock less the host's, and the uncertainty of each
	// round's measurement.
	skew, skewErr []float64
	cniAdd        []float64 // the CNI ADD itself
	linkToReturn  []float64 // RTM_NEWLINK → CNI ADD returned
	steps         map[string][]float64
	missing       map[string]int
	ifCalls       []float64 // UpdateInterface calls for net1 per round
	routeCalls    []float64 // UpdateRoutes calls per round
	kernelClock   []float64 // the guest's printk clock mapping: marker's uncertainty, ms
	kernelVsMono  []float64 // how far CLOCK_MONOTONIC's mapping differs from the marker's, ms
	// tapsync's passes, from its log (ms after the bench's RTM_NEWLINK;
	// b5Daemon names them), and the passes that changed something.
	daemon map[string][]float64
	passes []float64
}

// b5Pair is B5 for tapsync and the floor.
type b5Pair struct{ tapsync, floor b5Result }

// b5Wirer is one side of B5 on its own sandbox.
type b5Wirer struct {
	name       string
	id         string // the CNI container ID
	sb         *sandbox
	cni        *testcni.Plugins
	eth0, net1 testcni.Network
	net1Subnet netip.Prefix
	ctl        *testvm.Control // the guest agent's control service, held open
	links      chan linkEvent
	// settle waits until the wirer is done with ifname added (with
	// address addr) or deleted.
	settle func(ctx context.Context, ifname string, added bool, addr netip.Addr) error
	d      *daemon // tapsync's
	seq    uint64  // the guest timeline's events read so far
	res    b5Result
}

// linkEvent is an RTM_NEWLINK or RTM_DELLINK in a sandbox netns, stamped
// as the bench's reader took it.
type linkEvent struct {
	t    time.Time
	name string
	mac  string
	new  bool
}

// watchLinks stamps every link event of the sandbox netns.
func watchLinks(sb *sandbox, done <-chan struct{}) (chan linkEvent, error) {
	updates := make(chan netlink.LinkUpdate, 256)
	ns := sb.ns
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{Namespace: &ns}); err != nil {
		return nil, fmt.Errorf("subscribe to links in %s: %w", sb.path, err)
	}
	out := make(chan linkEvent, 1024)
	go func() {
		for u := range updates {
			e := linkEvent{t: time.Now(), name: u.Link.Attrs().Name, mac: u.Link.Attrs().HardwareAddr.String(), new: u.Header.Type == unix.RTM_NEWLINK}
			select {
			case out <- e:
			default: // a full channel: the rounds read only the first events
			}
		}
	}()
	return out, nil
}

// runB5 measures B5 for tapsync and the floor.
func runB5(ctx context.Context, cfg benchConfig, base string) (pair b5Pair, err error) {
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	img, err := testvm.Build(bctx, "", nil)
	cancel()
	if err != nil {
		return pair, err
	}
	nodeName := fmt.Sprintf("tsb%d-b5node", os.Getpid())
	nodePath, nodeNS, err := newNetns(nodeName)
	if err != nil {
		return pair, err
	}
	nodeNS.Close()
	defer sh("ip", "netns", "del", nodeName)
	if err := sh("ip", "-n", nodeName, "link", "set", "lo", "up"); err != nil {
		return pair, err
	}
	cni, err := testcni.Open(testcni.Config{
		Node:     testnet.NS{Name: nodeName, Path: nodePath},
		IPAMDir:  filepath.Join(base, "b5-ipam"),
		CacheDir: filepath.Join(base, "b5-cni-cache"),
	})
	if err != nil {
		return pair, err
	}
	defer cni.Close()

	done := make(chan struct{})
	defer close(done)
	ws := []*b5Wirer{{name: "tapsync"}, {name: "floor"}}
	for i, w := range ws {
		w.cni, w.id = cni, fmt.Sprintf("b5-%s-%d", w.name, os.Getpid())
		w.res.steps, w.res.missing, w.res.daemon = map[string][]float64{}, map[string]int{}, map[string][]float64{}
		dir := filepath.Join(base, "b5-"+w.name)
		// The accelerator as testvm's probe decides it (KVM when a guest
		// boots under it, else TCG).
		opts := testvm.Options{Image: &img, RootPorts: 1, Args: append(ejectTraceArgs(), acpiTraceArgs()...)}
		sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		sb, err := newSandbox(sctx, "b5-"+w.name, fmt.Sprintf("tsb%d-b5%s", os.Getpid(), w.name), dir, opts)
		if err == nil {
			defer sb.close()
			err = sb.vm.WaitReady(sctx)
		}
		cancel()
		if err != nil {
			return pair, err
		}
		w.sb, w.res.accel = sb, sb.vm.Accel
		if w.ctl, err = sb.vm.OpenControl(ctx); err != nil {
			return pair, err
		}
		defer w.ctl.Close()
		if err := sh("ip", "-n", sb.name, "link", "set", "lo", "up"); err != nil {
			return pair, err
		}
		if w.links, err = watchLinks(sb, done); err != nil {
			return pair, err
		}
		// eth0 takes the default route; net1 a /16 of its own through
		// its gateway, as a second network that must not take the pod's
		// default route does.
		w.eth0 = testcni.Bridge(fmt.Sprintf("b5%s0-%d", w.name[:1], os.Getpid()), fmt.Sprintf("b5%s0", w.name[:1]), testcni.Subnet4())
		w.net1Subnet = testcni.Subnet4()
		w.net1 = testcni.Bridge(fmt.Sprintf("b5%s1-%d", w.name[:1], os.Getpid()), fmt.Sprintf("b5%s1", w.name[:1]), w.net1Subnet,
			testcni.WithRoutes(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(196 + i), 0, 0}), 16)))
	}
	for _, w := range ws {
		var stop func()
		if w.name == "tapsync" {
			stop, err = w.startTapsync(ctx, cfg.tapsync, base)
		} else {
			stop, err = w.startFloor(cfg.floor)
		}
		if stop != nil {
			defer stop()
		}
		if err != nil {
			return pair, err
		}
	}
	// The sandbox's first network, wired before the rounds.
	for _, w := range ws {
		actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		res, err := cni.Add(actx, w.eth0, w.id, w.sb.path, "eth0")
		if err == nil {
			var addr netip.Addr
			if _, addr, err = b5FromResult(res, w.sb.path, "eth0"); err == nil {
				err = w.settle(actx, "eth0", true, addr)
			}
		}
		cancel()
		if err != nil {
			return pair, fmt.Errorf("B5 %s: eth0: %w", w.name, err)
		}
	}
	for round := range cfg.b5Rounds {
		order := ws
		if round%2 == 1 {
			order = []*b5Wirer{ws[1], ws[0]}
		}
		for _, w := range order {
			if err := w.round(ctx, round); err != nil {
				return pair, fmt.Errorf("B5 %s round %d: %w", w.name, round, err)
			}
		}
	}
	return b5Pair{tapsync: ws[0].res, floor: ws[1].res}, nil
}

// startTapsync runs the daemon with the wirer's sandbox and its agent.
func (w *b5Wirer) startTapsync(ctx context.Context, bin, base string) (func(), error) {
	dir, state := filepath.Join(base, "b5-"+w.name), filepath.Join(base, "state", "b5-"+w.name)
	conf, metrics, err := writeConfig(dir, state, []sandboxConf{{id: "b5", netns: w.sb.path, qmp: w.sb.vm.QMP, agent: w.sb.vm.Agent}})
	if err != nil {
		return nil, err
	}
	d, err := startDaemon(bin, conf, metrics, filepath.Join(dir, "daemon.log"))
	if err != nil {
		return nil, err
	}
	w.d = d
	// Done: a pass made changes ("converged", as B1 waits for); after an
	// add, a pass has ended ("reconciled") after the guest interface was
	// configured with addr and the routes through it were sent (the
	// passes before may configure it without its address or send the
	// routes before CNI has added them); and status shows every
	// endpoint wired, its guest configured and nothing pending, with an
	// endpoint on ifname after an add and none after a deletion.
	w.settle = func(ctx context.Context, ifname string, added bool, addr netip.Addr) error {
		select {
		case <-d.converged:
		case <-d.exited:
			return errors.New("tapsync exited")
		case <-time.After(time.Minute):
			return errors.New("tapsync logged no \"converged\" within a minute")
		}
		return eventually(ctx, time.Minute, 20*time.Millisecond, "tapsync done", func() (bool, string, error) {
			if added && !configuredWith(d.peekLines(), ifname, addr) {
				return false, fmt.Sprintf("no pass has ended that configured the guest's %s with %s", ifname, addr), nil
			}
			st, err := daemonStatus(state)
			if err != nil {
				return false, err.Error(), nil
			}
			if len(st) != 1 {
				return false, fmt.Sprint(st), nil
			}
			s := st[0]
			ok := s.LastError == "" && len(s.Pending) == 0 && s.Guest == ""
			has := false
			for _, e := range s.Endpoints {
				ok = ok && !e.Removing && e.Guest == "configured"
				has = has || e.Link == ifname
			}
			return ok && has == added, fmt.Sprintf("%+v", s), nil
		})
	}
	stop := func() { d.stop(unix.SIGTERM) }
	err = eventually(ctx, time.Minute, 20*time.Millisecond, "tapsync's first pass", func() (bool, string, error) {
		st, err := daemonStatus(state)
		if err != nil {
			return false, err.Error(), nil
		}
		return len(st) == 1 && st[0].LastReconcile != nil, fmt.Sprint(st), nil
	})
	return stop, err
}

// startFloor runs the floor's B5 mode on the wirer's sandbox: its lines
// "configured NAME" and "unwired NAME" tell when it is done.
func (w *b5Wirer) startFloor(bin string) (func(), error) {
	cmd := exec.Command(bin, "-netns", w.sb.path, "-qmp", w.sb.vm.QMP, "-bus", testvm.BridgeID,
		"-agent", w.sb.vm.Agent, "-bus-path", fmt.Sprintf("%02x", testvm.BridgeSlot))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	if err := testproc.Start(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	stop := func() { stdin.Close(); _ = cmd.Wait() }
	r := bufio.NewReader(stdout)
	if line, err := r.ReadString('\n'); strings.TrimSpace(line) != "ready" {
		stop()
		return nil, fmt.Errorf("floor did not get ready: %q %v", line, err)
	}
	lines := make(chan string, 64)
	go func() {
		defer close(lines)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				io.Copy(io.Discard, r)
				return
			}
			lines <- strings.TrimSpace(line)
		}
	}()
	w.settle = func(ctx context.Context, ifname string, added bool, _ netip.Addr) error {
		want := "configured " + ifname
		if !added {
			want = "unwired " + ifname
		}
		for {
			select {
			case line, ok := <-lines:
				if !ok {
					return errors.New("the floor exited")
				}
				if line == want {
					return nil
				}
			case <-time.After(time.Minute):
				return fmt.Errorf("the floor did not say %q within a minute", want)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	return stop, nil
}

// point is one step of a round on the host's clock.
type point struct {
	name string
	t    time.Time
}

// round adds net1 and measures, then deletes it.
func (w *b5Wirer) round(ctx context.Context, round int) error {
	sb := w.sb
	clock0, err := w.ctl.Clock(ctx, clockSamples)
	if err != nil {
		return err
	}
	if err := sb.trace.poll(); err != nil {
		return err
	}
	for len(w.links) > 0 {
		<-w.links
	}
	if w.d != nil {
		w.d.takeLines()
		for len(w.d.converged) > 0 {
			<-w.d.converged
		}
	}

	actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	// The guest waits for its address on net1's subnet before the add
	// begins, and pings net1's gateway the moment it has one.
	type pinged struct {
		r   control.PingReply
		err error
	}
	pingc := make(chan pinged, 1)
	go func() {
		pctx, cancel := context.WithTimeout(actx, 30*time.Second)
		defer cancel()
		r, err := w.ctl.PingWhenUp(pctx, w.net1Subnet, testcni.Gateway(w.net1Subnet), b5PingInterval)
		pingc <- pinged{r, err}
	}()
	added := time.Now()
	res, err := w.cni.Add(actx, w.net1, w.id, sb.path, "net1")
	returned := time.Now()
	if err != nil {
		return err
	}
	mac, addr, err := b5FromResult(res, sb.path, "net1")
	if err != nil {
		return err
	}
	p := <-pingc
	if p.err != nil {
		return p.err
	}
	if err := w.settle(actx, "net1", true, addr); err != nil {
		return err
	}
	clock1, err := w.ctl.Clock(ctx, clockSamples)
	if err != nil {
		return err
	}
	clock := clock0
	if clock1.Uncertainty() < clock0.Uncertainty() {
		clock = clock1
	}
	tl, err := w.ctl.Timeline(ctx, w.seq)
	if err != nil {
		return err
	}
	if tl.Dropped > 0 {
		// The guest's buffer overflowed: the round's steps are not all there.
		return fmt.Errorf("the guest's timeline lost %d events", tl.Dropped)
	}
	if n := len(tl.Events); n > 0 {
		w.seq = tl.Events[n-1].Seq
	}
	if err := sb.trace.poll(); err != nil {
		return err
	}
	var lines []logLine
	if w.d != nil {
		lines = w.d.takeLines()
	}
	newlink, ok := firstNewLink(w.links, "net1", mac)
	if !ok {
		return errors.New("the bench's subscription saw no RTM_NEWLINK of net1")
	}
	w.measure(round, clock, added, returned, newlink, mac, addr, p.r, tl.Events, lines)

	// CNI DEL, and the wirer's removal, outside the measurement.
	if err := w.cni.Del(actx, w.net1, w.id, sb.path, "net1"); err != nil {
		return err
	}
	return w.settle(actx, "net1", false, netip.Addr{})
}

// configuredWith reports whether tapsync's log has a pass that ended
// after the guest's ifname was configured with addr and routes through
// ifname were sent (B5's networks all have one).
func configuredWith(lines []logLine, ifname string, addr netip.Addr) bool {
	configured, routed := false, false
	for _, l := range lines {
		switch {
		case l.Action == "configure-guest" && strings.Contains(l.Message, " "+ifname+" ") && strings.Contains(l.Message, addr.String()+"/"):
			configured = true
		case l.Action == "update-guest-routes" && configured && strings.Contains(l.Message, " dev "+ifname):
			routed = true
		case routed && (l.Message == "reconciled" || l.Message == "pass failed"):
			return true
		}
	}
	return false
}

// b5FromResult reads the pod link's MAC and its IPv4 address from a CNI
// result.
func b5FromResult(res *types100.Result, netnsPath, ifname string) (mac string, addr netip.Addr, err error) {
	for _, i := range res.Interfaces {
		if i.Sandbox == netnsPath && i.Name == ifname {
			mac = strings.ToLower(i.Mac)
		}
	}
	for _, ip := range res.IPs {
		if a, ok := netip.AddrFromSlice(ip.Address.IP); ok && a.Unmap().Is4() {
			addr = a.Unmap()
			break
		}
	}
	if mac == "" || !addr.IsValid() {
		return "", addr, fmt.Errorf("CNI result without %s's MAC or IPv4 address: %v", ifname, res)
	}
	return mac, addr, nil
}

// firstNewLink takes the link events that came and returns the first
// RTM_NEWLINK of the link named name or with mac.
func firstNewLink(ch chan linkEvent, name, mac string) (time.Time, bool) {
	for {
		select {
		case e := <-ch:
			if e.new && (e.name == name || e.mac == mac) {
				for len(ch) > 0 {
					<-ch
				}
				return e.t, true
			}
		default:
			return time.Time{}, false
		}
	}
}

// measure turns one round's sources into samples.
func (w *b5Wirer) measure(round int, clock control.ClockSample, added, returned, newlink time.Time, mac string, addr netip.Addr,
	pong control.PingReply, events []control.Event, lines []logLine) {
	r := &w.res
	r.skew = append(r.skew, ms(clock.Offset()))
	r.skewErr = append(r.skewErr, ms(clock.Uncertainty()))
	r.cniAdd = append(r.cniAdd, ms(returned.Sub(added)))
	r.linkToReturn = append(r.linkToReturn, ms(returned.Sub(newlink)))
	miss := func(what string) { r.missing[what]++ }

	exs := qmpExchanges(w.sb.trace.after(added))
	plug, ok := firstExchange(exs, "device_add")
	if !ok {
		miss("device_add answered")
		return
	}
	r.toPlug = append(r.toPlug, ms(plug.Ans.Sub(newlink)))
	host := clock.Host
	var pts []point
	at := func(name string, t time.Time) {
		if t.IsZero() {
			miss(name)
			return
		}
		pts = append(pts, point{name, t})
	}
	// QEMU raises the hot-plug event while it realizes the device: the
	// guest's handler may run before the reply goes out.
	at(b5Steps[0], plug.Req)
	if a, ok := w.sb.trace.acpiAfter(plug.Req); ok {
		at(b5Steps[1], a.T)
	} else {
		miss(b5Steps[1])
	}
	// The guest's events from device_add received on (the kernel's
	// messages of the last unplug come before it).
	first := func(match func(e control.Event) bool) (control.Event, time.Time) {
		for _, e := range events {
			if t := host(e.T); !t.Before(plug.Req) && match(e) {
				return e, t
			}
		}
		return control.Event{}, time.Time{}
	}
	kind := func(k string) func(control.Event) bool {
		return func(e control.Event) bool { return e.Kind == k && strings.EqualFold(e.MAC, mac) }
	}
	kernel := func(re *regexp.Regexp) func(control.Event) bool {
		return func(e control.Event) bool { return e.Kind == control.EventKernel && re.MatchString(e.Detail) }
	}
	withAddr := func(k string) func(control.Event) bool {
		return func(e control.Event) bool {
			return kind(k)(e) && strings.Contains(e.Detail, addr.String()+"/") && !strings.HasPrefix(e.Detail, "error")
		}
	}
	_, tPCI := first(kernel(kmsgPCIFound))
	at(b5Steps[2], tPCI)
	_, tVirtio := first(kernel(kmsgVirtioPCI))
	at(b5Steps[3], tVirtio)
	_, tLink := first(kind(control.EventNewLink))
	at(b5Steps[4], tLink)
	_, tRecv := first(kind(control.EventUpdateInterface))
	at(b5Steps[5], tRecv)
	_, tFound := first(kind(control.EventInterfaceLinkFound))
	at(b5Steps[6], tFound)
	_, tRecvAddr := first(withAddr(control.EventUpdateInterface))
	at(b5Steps[7], tRecvAddr)
	_, tAddr := first(withAddr(control.EventUpdateInterfaceDone))
	at(b5Steps[8], tAddr)
	routes, tRoutes := first(func(e control.Event) bool {
		return e.Kind == control.EventUpdateRoutes && strings.Contains(e.Detail, " dev net1")
	})
	at(b5Steps[9], tRoutes)
	_, tRoutesDone := first(func(e control.Event) bool {
		return e.Kind == control.EventUpdateRoutesDone && e.Detail == routes.Detail && !host(e.T).Before(tRoutes)
	})
	if tRoutes.IsZero() {
		tRoutesDone = time.Time{}
	}
	at(b5Steps[10], tRoutesDone)
	at(b5Steps[11], host(pong.Replied))
	for _, p := range pts {
		r.steps[p.name] = append(r.steps[p.name], ms(p.t.Sub(plug.Ans)))
	}
	var ifCalls, routeCalls float64
	for _, e := range events {
		switch {
		case kind(control.EventUpdateInterface)(e):
			ifCalls++
		case e.Kind == control.EventUpdateRoutes && !host(e.T).Before(added):
			routeCalls++
		case e.Kind == control.EventKernelClock:
			var off, unc, mono int64
			if _, err := fmt.Sscanf(e.Detail, "offset %d uncertainty %d monotonic offset %d", &off, &unc, &mono); err == nil {
				r.kernelClock = append(r.kernelClock, float64(unc)/1e6)
				r.kernelVsMono = append(r.kernelVsMono, float64(mono-off)/1e6)
			}
		}
	}
	r.ifCalls = append(r.ifCalls, ifCalls)
	r.routeCalls = append(r.routeCalls, routeCalls)

	if !tAddr.IsZero() {
		r.toAddr = append(r.toAddr, ms(tAddr.Sub(returned)))
		r.linkToAddr = append(r.linkToAddr, ms(tAddr.Sub(newlink)))
		if !tLink.IsZero() {
			g := ms(tLink.Sub(plug.Ans))
			own := ms(tAddr.Sub(returned)) - g
			r.guest = append(r.guest, g)
			r.own = append(r.own, own)
			if !tFound.IsZero() && !tRecvAddr.IsZero() {
				work := ms(tAddr.Sub(later(tFound, tRecvAddr)))
				r.agentWork = append(r.agentWork, work)
				r.wirerOwn = append(r.wirerOwn, own-work)
			}
		}
	}
	if !pong.Replied.IsZero() {
		r.toPing = append(r.toPing, ms(host(pong.Replied).Sub(returned)))
	}
	if w.d != nil {
		w.daemonPasses(lines, newlink, addr)
	}
	if verbose {
		w.printRound(round, clock, added, returned, newlink, plug, pong, pts, events, lines)
	}
}

// daemonPasses reads tapsync's log of one round (b5Daemon): the first
// trigger (the first "converged" line's time less its latency), the
// first line of each step of the wiring, the first pass's end, the guest
// configured with the address and the routes sent after it, the last
// pass's end; all from the bench's RTM_NEWLINK. The log has milliseconds.
func (w *b5Wirer) daemonPasses(lines []logLine, newlink time.Time, addr netip.Addr) {
	pts := map[string]time.Time{}
	set := func(name string, t time.Time) {
		if _, ok := pts[name]; !ok {
			pts[name] = t
		}
	}
	passes := 0.0
	for _, l := range lines {
		switch {
		case l.Message == "converged":
			set("trigger", l.T.Add(-time.Duration(l.Latency*float64(time.Millisecond))))
		case l.Message == "reconciled":
			passes++
			set("first pass ends", l.T)
			pts["last pass ends"] = l.T
		case l.Action == "configure-guest" && strings.Contains(l.Message, addr.String()+"/"):
			set("configure-guest with the address", l.T)
			set(l.Action, l.T)
		case l.Action == "update-guest-routes" && !pts["configure-guest with the address"].IsZero():
			set("update-guest-routes after it", l.T)
		case l.Action != "":
			set(l.Action, l.T)
		}
	}
	w.res.passes = append(w.res.passes, passes)
	for name, t := range pts {
		w.res.daemon[name] = append(w.res.daemon[name], ms(t.Sub(newlink)))
	}
}

// verbose prints each B5 round's merged timeline on stderr (-b5-verbose).
var verbose bool

func (w *b5Wirer) printRound(round int, clock control.ClockSample, added, returned, newlink time.Time, plug exchange,
	pong control.PingReply, pts []point, events []control.Event, lines []logLine) {
	all := []point{{"CNI ADD called", added}, {"bench: RTM_NEWLINK net1", newlink}, {"CNI ADD returned", returned},
		{"device_add answered", plug.Ans},
		{"guest ping: address seen", clock.Host(pong.AddrSeen)},
		{fmt.Sprintf("guest ping: first echo sent (%d sent, rtt %.3f ms)", pong.Tries, ms(pong.RTT)), clock.Host(pong.FirstSent)}}
	all = append(all, pts...)
	for _, e := range events {
		all = append(all, point{"guest " + e.Kind + " " + e.MAC + " " + e.Detail, clock.Host(e.T)})
	}
	for _, l := range lines {
		all = append(all, point{"tapsync " + l.Message, l.T})
	}
	for _, r := range w.sb.trace.after(added) {
		all = append(all, point{"qemu " + r.String()[16:], r.T})
	}
	for _, a := range w.sb.trace.ACPI {
		if !a.T.Before(added) {
			all = append(all, point{"qemu " + a.Event + " " + a.Args, a.T})
		}
	}
	slices.SortStableFunc(all, func(a, b point) int { return a.t.Compare(b.t) })
	fmt.Fprintf(os.Stderr, "B5 %s round %d (guest clock %+.3f ms ± %.3f ms):\n", w.name, round, ms(clock.Offset()), ms(clock.Uncertainty()))
	for _, p := range all {
		fmt.Fprintf(os.Stderr, "  %+9.3f ms  %s\n", ms(p.t.Sub(plug.Ans)), p.name)
	}
}

// printB5 prints B5's rows: each stretch for tapsync and the floor, p50
// and p90, with the ratio; the skew; where the time goes.
func printB5(row func(m, v, g string), ratio func(a, b float64) string, b b5Pair) {
	t, f := b.tapsync, b.floor
	accel := fmt.Sprintf("accel: tapsync's guest %s, the floor's %s", t.accel, f.accel)
	plain := row
	row = func(m, v, g string) { plain(m, v+"; "+accel, g) }
	n := len(t.skew)
	// goal is the p50's; the goals name no p90.
	pair := func(m string, tv, fv []float64, goal string) {
		for _, p := range []struct {
			name string
			q    float64
		}{{"p50", 0.5}, {"p90", 0.9}} {
			a, c := quantile(tv, p.q), quantile(fv, p.q)
			row(fmt.Sprintf("B5: %s, %s (%d rounds)", m, p.name, n),
				fmt.Sprintf("tapsync %.1f ms, floor %.1f ms: **%s** (%d / %d samples)", a, c, ratio(a, c), len(tv), len(fv)), goal)
			goal = "-"
		}
	}
	pair("(a) CNI ADD returns → guest interface has its address", t.toAddr, f.toAddr, "≤ 100 ms p50 under KVM")
	pair("(a) of it the guest's share: device_add answered → link exists in the guest", t.guest, f.guest, "-")
	pair("(a) of it the wirer's share (the rest)", t.own, f.own, "≤ 1.2× the floor, ≤ 20 ms p50")
	pair("(a) of the wirer's share the agent's work: it has the link and the request with the address → address set", t.agentWork, f.agentWork, "-")
	pair("(a) of the wirer's share the wirer's own (less the agent's work)", t.wirerOwn, f.wirerOwn, "-")
	pair("(b) CNI ADD returns → first ping reply through it", t.toPing, f.toPing, "-")
	pair("(c) link's first RTM_NEWLINK → device_add answered", t.toPlug, f.toPlug, "-")
	pair("link's first RTM_NEWLINK → guest interface has its address", t.linkToAddr, f.linkToAddr, "-")
	row("B5: CNI ADD call / its link's RTM_NEWLINK → it returned, p50",
		fmt.Sprintf("tapsync's sandbox %.1f / %.1f ms, floor's %.1f / %.1f ms", quantile(t.cniAdd, 0.5), quantile(t.linkToReturn, 0.5),
			quantile(f.cniAdd, 0.5), quantile(f.linkToReturn, 0.5)), "-")
	row("B5: guest clock − host clock (skew), p50 [min, max]; its uncertainty (half the best Clock round trip), p50 / max",
		fmt.Sprintf("tapsync's guest %+.3f ms [%+.3f, %+.3f], ± %.3f / %.3f ms; floor's guest %+.3f ms [%+.3f, %+.3f], ± %.3f / %.3f ms",
			quantile(t.skew, 0.5), quantile(t.skew, 0), quantile(t.skew, 1), quantile(t.skewErr, 0.5), quantile(t.skewErr, 1),
			quantile(f.skew, 0.5), quantile(f.skew, 0), quantile(f.skew, 1), quantile(f.skewErr, 0.5), quantile(f.skewErr, 1)), "-")
	row("B5: guest kernel log clock: marker uncertainty p50; CLOCK_MONOTONIC's mapping − the marker's, p50",
		fmt.Sprintf("%.3f ms; %+.3f ms (tapsync's guest), %.3f ms; %+.3f ms (floor's)",
			quantile(t.kernelClock, 0.5), quantile(t.kernelVsMono, 0.5), quantile(f.kernelClock, 0.5), quantile(f.kernelVsMono, 0.5)), "-")
	var steps []string
	for _, s := range b5Steps {
		steps = append(steps, fmt.Sprintf("%s %.1f / %.1f", s, quantile(t.steps[s], 0.5), quantile(f.steps[s], 0.5)))
	}
	row("B5 where the time goes: ms after device_add answered, p50, tapsync / floor (QEMU's trace; the guest agent's timeline and the guest kernel's log)",
		strings.Join(steps, " → "), "-")
	row("B5: agent calls per add, p50 (tapsync / floor)",
		fmt.Sprintf("UpdateInterface for net1 %.0f / %.0f, UpdateRoutes %.0f / %.0f; tapsync's passes that changed something %.0f",
			quantile(t.ifCalls, 0.5), quantile(f.ifCalls, 0.5), quantile(t.routeCalls, 0.5), quantile(f.routeCalls, 0.5), quantile(t.passes, 0.5)), "-")
	var acts []string
	for _, a := range b5Daemon {
		if v, ok := t.daemon[a]; ok {
			acts = append(acts, fmt.Sprintf("%s %.0f", a, quantile(v, 0.5)))
		}
	}
	row("B5 tapsync's log: ms after the bench's RTM_NEWLINK, p50 (first line of each; the log has ms)", strings.Join(acts, " → "), "-")
	if missing := missingText(t.missing, f.missing); missing != "" {
		row("B5: steps not seen", missing, "-")
	}
}

func missingText(t, f map[string]int) string {
	var s []string
	for k, v := range t {
		s = append(s, fmt.Sprintf("tapsync %s ×%d", k, v))
	}
	for k, v := range f {
		s = append(s, fmt.Sprintf("floor %s ×%d", k, v))
	}
	slices.Sort(s)
	return strings.Join(s, ", ")
}

// later is the later of two times.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
