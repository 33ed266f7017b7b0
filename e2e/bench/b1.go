package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
	"github.com/tapsync/tapsync/qmp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// b1Result holds one wirer's samples (ms).
type b1Result struct {
	add, remove []float64
	ack         []float64 // the guest's share of each removal, left out of remove
	whole       []float64 // each removal with the guest's share: deletion → done
	// A removal in two parts around the guest's share: the link's
	// deletion → QEMU receives device_del, and the guest's ack (over QMP
	// DEVICE_DELETED, over HMP the ACPI eject) → netdev deleted and tap
	// gone.
	toAsk, afterAck []float64
	// The add's monitor time, summed over its commands: QEMU executing
	// them (received → answered) and between them (answered → next
	// received: the client, and over HMP QEMU's echo of the next line).
	busy, between []float64
	// Over QMP: the ACPI eject (the guest's ack, HMP's mark) →
	// DEVICE_DELETED (QEMU finalized the device). Over HMP: the eject →
	// the qom-get that found the device gone (the poll's share of
	// afterAck).
	ejectLead, pollLag []float64
	cmdsAdd            map[string]int // monitor commands, QMP or HMP
	cmdsRemove         map[string]int
}

// b1Pair is B1 for tapsync and the floor over one kind of monitor.
type b1Pair struct{ tapsync, floor b1Result }

// b1Set is B1 over each kind of monitor: QMP and HMP sockets on QEMU's
// command line, and the QMP socket tapsync-qemu adds to it.
type b1Set struct{ qmp, hmp, wrapper b1Pair }

// wirer is what B1 measures: tapsync or the floor, on its own sandbox,
// over QMP or HMP, or over the QMP monitor of a VM started through
// tapsync-qemu.
type wirer struct {
	name    string
	monitor string // qmp.ProtocolQMP or qmp.ProtocolHMP
	wrapped bool   // the VM starts through tapsync-qemu; sock is the wrapper's
	sock    string // the monitor socket it is given
	peer    string // the veth peer's name in the peer netns
	sb      *sandbox
	tapGone chan time.Time // DELLINK of a tsn<N> tap in the sandbox
	settle  func() error   // waits until the wirer finished its pass
	stop    func()
	res     b1Result
}

func (w *wirer) hmp() bool { return w.monitor == qmp.ProtocolHMP }

// watchTaps reports when a tsn<N> tap leaves the sandbox netns.
func watchTaps(sb *sandbox, done <-chan struct{}) (chan time.Time, error) {
	updates := make(chan netlink.LinkUpdate, 64)
	ns := sb.ns
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{Namespace: &ns}); err != nil {
		return nil, fmt.Errorf("subscribe to links in %s: %w", sb.path, err)
	}
	gone := make(chan time.Time, 16)
	go func() {
		for u := range updates {
			if _, tap := datapath.ParseTapName(u.Link.Attrs().Name); tap && u.Header.Type == unix.RTM_DELLINK {
				gone <- time.Now()
			}
		}
	}()
	return gone, nil
}

// startFloor runs the floor program on the wirer's sandbox and waits for
// its "ready".
func (w *wirer) startFloor(bin string) error {
	args := []string{"-netns", w.sb.path, "-qmp", w.sock, "-bus", testvm.BridgeID}
	if w.hmp() {
		args = append(args, "-hmp")
	}
	cmd := exec.Command(bin, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = os.Stderr
	if err := testproc.Start(cmd); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	stop := func() { stdin.Close(); _ = cmd.Wait() }
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		stop()
		return fmt.Errorf("floor did not get ready: %q %v", line, err)
	}
	go io.Copy(io.Discard, stdout)
	w.stop = stop
	w.settle = func() error { return nil } // the floor's pass ends with device_add / the tap's removal
	return nil
}

// startTapsync runs the daemon with one static sandbox, the wirer's,
// state on tmpfs, and waits for its first pass.
func (w *wirer) startTapsync(ctx context.Context, bin, base string) error {
	dir, state := filepath.Join(base, "b1-"+w.name), filepath.Join(base, "state", w.name)
	id := "b1"
	switch {
	case w.hmp():
		id = "b1-hmp"
	case w.wrapped:
		id = "b1-wrapper"
	}
	conf, metrics, err := writeConfig(dir, state, []sandboxConf{{id: id, netns: w.sb.path, qmp: w.sock, monitor: w.monitor}})
	if err != nil {
		return err
	}
	d, err := startDaemon(bin, conf, metrics, filepath.Join(dir, "daemon.log"))
	if err != nil {
		return err
	}
	w.stop = func() { d.stop(unix.SIGTERM) }
	// The pass that wired a NIC ends with a "converged" log line; the
	// next operation starts after it, so a measurement never includes
	// the tail of the previous pass.
	w.settle = func() error {
		select {
		case <-d.converged:
			return nil
		case <-d.exited:
			return errors.New("tapsync exited")
		case <-time.After(time.Minute):
			return errors.New("tapsync logged no \"converged\" within a minute")
		}
	}
	// The daemon's first pass over the empty sandbox converges nothing;
	// wait for that pass before the first round.
	return eventually(ctx, time.Minute, 20*time.Millisecond, w.name+"'s first pass", func() (bool, string, error) {
		st, err := daemonStatus(state)
		if err != nil {
			return false, err.Error(), nil
		}
		return len(st) == 1 && st[0].LastReconcile != nil, fmt.Sprint(st), nil
	})
}

// runB1 measures add and remove latency for tapsync and the floor, over
// QMP and (unless skipped) over HMP and over tapsync-qemu's QMP socket,
// in rounds that rotate their order, each wirer on its own sandbox with a
// booted TCG guest.
func runB1(ctx context.Context, cfg benchConfig, base string, peerNS netns.NsHandle) (set b1Set, err error) {
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	img, err := testvm.Build(bctx, "", nil)
	cancel()
	if err != nil {
		return set, err
	}
	var wrapper wrapperInstall
	if !cfg.skipWrapper {
		if wrapper, err = installWrapper(cfg.wrapper, base); err != nil {
			return set, err
		}
	}
	done := make(chan struct{})
	defer close(done)
	ws := []*wirer{
		{name: "tapsync", monitor: qmp.ProtocolQMP, peer: "pt"},
		{name: "floor", monitor: qmp.ProtocolQMP, peer: "pf"},
	}
	if !cfg.skipHMP {
		ws = append(ws,
			&wirer{name: "tapsync-hmp", monitor: qmp.ProtocolHMP, peer: "pth"},
			&wirer{name: "floor-hmp", monitor: qmp.ProtocolHMP, peer: "pfh"})
	}
	if !cfg.skipWrapper {
		ws = append(ws,
			&wirer{name: "tapsync-wrapper", monitor: qmp.ProtocolQMP, wrapped: true, peer: "ptw"},
			&wirer{name: "floor-wrapper", monitor: qmp.ProtocolQMP, wrapped: true, peer: "pfw"})
	}
	for _, w := range ws {
		dir := filepath.Join(base, "b1-"+w.name)
		opts := testvm.Options{Image: &img, RootPorts: 1, Accel: "tcg", Args: ejectTraceArgs()}
		if w.hmp() {
			// As Kata's runtime-rs serves its debug monitor.
			w.sock = filepath.Join(dir, "hmp.sock")
			opts.Args = append(opts.Args, "-monitor", "unix:path="+w.sock+",server=on,wait=off")
			opts.Args = append(opts.Args, hmpTraceArgs()...)
		}
		if w.wrapped {
			// As Kata starts QEMU after install-kata: through the
			// wrapper, which adds the only monitor the wirer is given.
			// (testvm's own two QMP sockets stay on the command line,
			// unused by the wirer.)
			w.sock = wrapper.vmOptions(&opts, fmt.Sprintf("b1-%s-%d", w.name, os.Getpid()))
		}
		sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		sb, err := newSandbox(sctx, w.name, fmt.Sprintf("tsb%d-b1%s", os.Getpid(), w.name), dir, opts)
		if err == nil {
			defer sb.close()
			err = sb.vm.WaitReady(sctx)
		}
		if err == nil && w.wrapped {
			err = waitGreeting(sctx, sb.vm, w.sock)
		}
		cancel()
		if err != nil {
			return set, err
		}
		w.sb = sb
		if w.sock == "" {
			w.sock = sb.vm.QMP
		}
		if w.tapGone, err = watchTaps(sb, done); err != nil {
			return set, err
		}
	}
	for _, w := range ws {
		if strings.HasPrefix(w.name, "tapsync") {
			err = w.startTapsync(ctx, cfg.tapsync, base)
		} else {
			err = w.startFloor(cfg.floor)
		}
		if w.stop != nil {
			defer w.stop()
		}
		if err != nil {
			return set, err
		}
		w.res.cmdsAdd, w.res.cmdsRemove = map[string]int{}, map[string]int{}
	}

	for round := range cfg.rounds {
		// Each wirer first, second, … in turn (AB, BA with two).
		k := round % len(ws)
		for _, w := range append(slices.Clone(ws[k:]), ws[:k]...) {
			if err := w.addRemove(ctx, round, peerNS); err != nil {
				return set, fmt.Errorf("B1 %s round %d: %w", w.name, round, err)
			}
		}
	}
	for _, w := range ws {
		p := &set.qmp
		switch {
		case w.hmp():
			p = &set.hmp
		case w.wrapped:
			p = &set.wrapper
		}
		if strings.HasPrefix(w.name, "tapsync") {
			p.tapsync = w.res
		} else {
			p.floor = w.res
		}
	}
	return set, nil
}

// exchanges returns the wirer's monitor commands QEMU received from t on.
func (w *wirer) exchanges(t time.Time) []exchange {
	if w.hmp() {
		return hmpExchanges(w.sb.trace.hmpAfter(t))
	}
	return qmpExchanges(w.sb.trace.after(t))
}

// addRemove adds eth0 and measures until QEMU answered device_add, then
// deletes it and measures until netdev_del is answered and the tap is
// gone, minus the time QEMU waited for the guest to acknowledge the unplug
// (device_del received → DEVICE_DELETED sent; over HMP → the ACPI eject).
// Over HMP, whose trace does not tell success from failure, the VM is
// asked after each operation whether it did what the trace says.
func (w *wirer) addRemove(ctx context.Context, round int, peerNS netns.NsHandle) error {
	sb := w.sb
	if err := sb.trace.poll(); err != nil {
		return err
	}
	t0 := time.Now()
	if err := sb.addLink("eth0", testvm.TestMAC(1+round%200), w.peer, peerNS); err != nil {
		return err
	}
	added, err := w.answered(ctx, t0, "device_add")
	if err != nil {
		return err
	}
	if err := w.settle(); err != nil {
		return err
	}
	_ = sb.trace.poll()
	exs := w.exchanges(t0)
	if w.hmp() {
		for k, v := range exchangeCounts(exs) {
			w.res.cmdsAdd[k] += v
		}
		if err := checkVM(ctx, sb, hmpArg(added.Line, "id"), hmpArg(added.Line, "netdev"), true); err != nil {
			return fmt.Errorf("after device_add: %w", err)
		}
	} else {
		for k, v := range commandCounts(sb.trace.after(t0)) {
			w.res.cmdsAdd[k] += v
		}
	}
	busy, between := monitorTime(exs, added.Mon)
	w.res.add = append(w.res.add, ms(added.Ans.Sub(t0)))
	w.res.busy = append(w.res.busy, ms(busy))
	w.res.between = append(w.res.between, ms(between))

	for len(w.tapGone) > 0 {
		<-w.tapGone
	}
	t1 := time.Now()
	if err := sb.delLink("eth0"); err != nil {
		return err
	}
	var tapGone time.Time
	select {
	case tapGone = <-w.tapGone:
	case <-time.After(time.Minute):
		return errors.New("tap not removed within a minute")
	}
	netdevGone, err := w.answered(ctx, t1, "netdev_del")
	if err != nil {
		return err
	}
	if err := w.settle(); err != nil {
		return err
	}
	_ = sb.trace.poll()
	exs = w.exchanges(t1)
	asked, ok := firstExchange(exs, "device_del")
	if !ok {
		return fmt.Errorf("no device_del in QEMU's trace: %v", exs)
	}
	eject, ejected := sb.trace.ejectAfter(asked.Req)
	var acked time.Time
	if w.hmp() {
		if !ejected {
			return errors.New("no ACPI eject after device_del in QEMU's trace")
		}
		acked = eject
		for k, v := range exchangeCounts(exs) {
			w.res.cmdsRemove[k] += v
		}
		// The poll that found the device gone: the last qom-get before
		// netdev_del.
		var found time.Time
		for _, e := range exs {
			if e.Cmd == "qom-get" && e.Req.Before(netdevGone.Req) {
				found = e.Req
			}
		}
		if !found.IsZero() {
			w.res.pollLag = append(w.res.pollLag, ms(found.Sub(eject)))
		}
		if err := checkVM(ctx, sb, hmpArg(asked.Line, ""), hmpArg(netdevGone.Line, ""), false); err != nil {
			return fmt.Errorf("after netdev_del: %w", err)
		}
	} else {
		recs := sb.trace.after(t1)
		if acked, ok = deviceDeleted(recs); !ok {
			return fmt.Errorf("no device_del → DEVICE_DELETED in QEMU's trace: %v", recs)
		}
		for k, v := range commandCounts(recs) {
			w.res.cmdsRemove[k] += v
		}
		if ejected {
			w.res.ejectLead = append(w.res.ejectLead, ms(acked.Sub(eject)))
		}
	}
	end := netdevGone.Ans
	if tapGone.After(end) {
		end = tapGone
	}
	guest := acked.Sub(asked.Req)
	w.res.remove = append(w.res.remove, ms(end.Sub(t1)-guest))
	w.res.ack = append(w.res.ack, ms(guest))
	w.res.whole = append(w.res.whole, ms(end.Sub(t1)))
	w.res.toAsk = append(w.res.toAsk, ms(asked.Req.Sub(t1)))
	w.res.afterAck = append(w.res.afterAck, ms(end.Sub(acked)))
	return nil
}

// answered waits for QEMU's first successful answer to cmd from t on in
// the wirer's sandbox's trace and returns that exchange.
func (w *wirer) answered(ctx context.Context, t time.Time, cmd string) (exchange, error) {
	var ex exchange
	err := eventually(ctx, time.Minute, 2*time.Millisecond, cmd+" answered", func() (bool, string, error) {
		if err := w.sb.trace.poll(); err != nil {
			return false, "", err
		}
		exs := w.exchanges(t)
		e, ok := firstExchange(exs, cmd)
		if !ok {
			return false, fmt.Sprint(exs), nil
		}
		ex = e
		return true, "", nil
	})
	return ex, err
}

// checkVM asks the VM, on its test QMP socket, whether device id (with
// netdev) and netdev exist (want true) or are both gone (want false). It
// runs between operations, outside every measured interval.
//
// Equivalent to: info qtree; info network (human-monitor-command).
func checkVM(ctx context.Context, sb *sandbox, id, netdev string, want bool) error {
	if id == "" || netdev == "" {
		return fmt.Errorf("device %q, netdev %q: not read from the trace", id, netdev)
	}
	c, err := qmp.Dial(ctx, sb.vm.TestQMP, qmp.Options{})
	if err != nil {
		return err
	}
	defer c.Close()
	vm, err := c.ReadVM(ctx)
	if err != nil {
		return err
	}
	dev := slices.ContainsFunc(vm.NICs, func(n qmp.NICInfo) bool { return n.ID == id && (!want || n.Netdev == netdev) })
	nd := slices.Contains(vm.Netdevs, netdev)
	if dev != want || nd != want {
		return fmt.Errorf("the VM has device %s: %v, netdev %s: %v; want %v for both (an HMP answer in the trace says nothing of success: see the daemon's log or the floor's stderr)", id, dev, netdev, nd, want)
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// quantile of samples (nearest rank); NaN-free for non-empty input.
func quantile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.999999) - 1
	return s[max(0, min(len(s)-1, i))]
}
