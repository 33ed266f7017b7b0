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
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// b1Result holds one wirer's samples (ms).
type b1Result struct {
	add, remove []float64
	ack         []float64 // the guest's share of each removal, left out of remove
	// A removal in two parts around the guest's share: the link's
	// deletion → QEMU receives device_del, and DEVICE_DELETED → netdev
	// deleted and tap gone.
	toAsk, afterAck []float64
	qmpAdd          map[string]int
	qmpRemove       map[string]int
}

// wirer is what B1 measures: tapsync or the floor, on its own sandbox.
type wirer struct {
	name    string
	sb      *sandbox
	tapGone chan time.Time // DELLINK of a tsn<N> tap in the sandbox
	settle  func() error   // waits until the wirer finished its pass
	stop    func()
	res     b1Result
}

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

// startFloor runs the floor program on sb and waits for its "ready".
func startFloor(bin string, sb *sandbox) (stop func(), err error) {
	cmd := exec.Command(bin, "-netns", sb.path, "-qmp", sb.vm.QMP, "-bus", testvm.BridgeID)
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
	stop = func() { stdin.Close(); _ = cmd.Wait() }
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		stop()
		return nil, fmt.Errorf("floor did not get ready: %q %v", line, err)
	}
	go io.Copy(io.Discard, stdout)
	return stop, nil
}

// runB1 measures add and remove latency for tapsync and the floor in
// alternating rounds, each on its own sandbox with a booted TCG guest.
func runB1(ctx context.Context, cfg benchConfig, base string, peerNS netns.NsHandle) (tapsync, floor b1Result, err error) {
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	img, err := testvm.Build(bctx, "", nil)
	cancel()
	if err != nil {
		return tapsync, floor, err
	}
	done := make(chan struct{})
	defer close(done)
	var ws []*wirer
	for _, name := range []string{"tapsync", "floor"} {
		dir := filepath.Join(base, "b1-"+name)
		sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		sb, err := newSandbox(sctx, name, fmt.Sprintf("tsb%d-b1%s", os.Getpid(), name), dir, testvm.Options{Image: &img, RootPorts: 1, Accel: "tcg"})
		if err == nil {
			defer sb.close()
			err = sb.vm.WaitReady(sctx)
		}
		cancel()
		if err != nil {
			return tapsync, floor, err
		}
		w := &wirer{name: name, sb: sb}
		if w.tapGone, err = watchTaps(sb, done); err != nil {
			return tapsync, floor, err
		}
		ws = append(ws, w)
	}

	// tapsync: the daemon, one static sandbox, state on tmpfs.
	tw := ws[0]
	conf, metrics, err := writeConfig(filepath.Join(base, "b1-tapsync"), filepath.Join(base, "state", "b1"), []sandboxConf{{"b1", tw.sb.path, tw.sb.vm.QMP}})
	if err != nil {
		return tapsync, floor, err
	}
	d, err := startDaemon(cfg.tapsync, conf, metrics, filepath.Join(base, "b1-tapsync", "daemon.log"))
	if err != nil {
		return tapsync, floor, err
	}
	tw.stop = func() { d.stop(unix.SIGTERM) }
	defer tw.stop()
	// The pass that wired a NIC ends with a "converged" log line; the
	// next operation starts after it, so a measurement never includes
	// the tail of the previous pass.
	tw.settle = func() error {
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
	if err := eventually(ctx, time.Minute, 20*time.Millisecond, "tapsync's first pass", func() (bool, string, error) {
		st, err := daemonStatus(filepath.Join(base, "state", "b1"))
		if err != nil {
			return false, err.Error(), nil
		}
		return len(st) == 1 && st[0].LastReconcile != nil, fmt.Sprint(st), nil
	}); err != nil {
		return tapsync, floor, err
	}

	fw := ws[1]
	if fw.stop, err = startFloor(cfg.floor, fw.sb); err != nil {
		return tapsync, floor, err
	}
	defer fw.stop()
	fw.settle = func() error { return nil } // the floor's pass ends with device_add / the tap's removal

	for _, w := range ws {
		w.res.qmpAdd, w.res.qmpRemove = map[string]int{}, map[string]int{}
	}
	for round := range cfg.rounds {
		order := ws
		if round%2 == 1 {
			order = []*wirer{ws[1], ws[0]}
		}
		for _, w := range order {
			if err := w.addRemove(ctx, round, peerNS); err != nil {
				return tapsync, floor, fmt.Errorf("B1 %s round %d: %w", w.name, round, err)
			}
		}
	}
	return ws[0].res, ws[1].res, nil
}

// addRemove adds eth0 and measures until QEMU answered device_add, then
// deletes it and measures until netdev_del is answered and the tap is
// gone, minus the time QEMU waited for the guest to acknowledge the unplug
// (device_del received → DEVICE_DELETED sent).
func (w *wirer) addRemove(ctx context.Context, round int, peerNS netns.NsHandle) error {
	sb := w.sb
	if err := sb.trace.poll(); err != nil {
		return err
	}
	t0 := time.Now()
	if err := sb.addLink("eth0", testvm.TestMAC(1+round%200), "p"+w.name[:1], peerNS); err != nil {
		return err
	}
	added, err := firstReply(ctx, sb, t0, "device_add")
	if err != nil {
		return err
	}
	if err := w.settle(); err != nil {
		return err
	}
	_ = sb.trace.poll()
	for k, v := range commandCounts(sb.trace.after(t0)) {
		w.res.qmpAdd[k] += v
	}
	w.res.add = append(w.res.add, ms(added.Sub(t0)))

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
	netdevGone, err := firstReply(ctx, sb, t1, "netdev_del")
	if err != nil {
		return err
	}
	if err := w.settle(); err != nil {
		return err
	}
	_ = sb.trace.poll()
	recs := sb.trace.after(t1)
	asked := requests(recs, "device_del")
	acked, ok := deviceDeleted(recs)
	if len(asked) == 0 || !ok {
		return fmt.Errorf("no device_del → DEVICE_DELETED in QEMU's trace: %v", recs)
	}
	for k, v := range commandCounts(recs) {
		w.res.qmpRemove[k] += v
	}
	end := netdevGone
	if tapGone.After(end) {
		end = tapGone
	}
	guest := acked.Sub(asked[0])
	w.res.remove = append(w.res.remove, ms(end.Sub(t1)-guest))
	w.res.ack = append(w.res.ack, ms(guest))
	w.res.toAsk = append(w.res.toAsk, ms(asked[0].Sub(t1)))
	w.res.afterAck = append(w.res.afterAck, ms(end.Sub(acked)))
	return nil
}

// firstReply waits for QEMU's first successful reply to cmd after t in
// sandbox sb's trace and returns its time.
func firstReply(ctx context.Context, sb *sandbox, t time.Time, cmd string) (time.Time, error) {
	var at time.Time
	err := eventually(ctx, time.Minute, 2*time.Millisecond, cmd+" answered", func() (bool, string, error) {
		if err := sb.trace.poll(); err != nil {
			return false, "", err
		}
		ts := okReplies(sb.trace.after(t), cmd)
		if len(ts) == 0 {
			return false, fmt.Sprint(sb.trace.after(t)), nil
		}
		at = ts[0]
		return true, "", nil
	})
	return at, err
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
