// Command tapsync-demo shows tapsync's job on one machine, end to end: it
// boots a small Linux guest in QEMU inside a pod-like network namespace,
// starts `tapsync run` on it, adds a container link that the daemon wires
// into the running guest by itself, pings the guest through it, adds and
// removes a second link, prints `tapsync status`, and cleans everything
// up. Run it as root (`make demo`).
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
)

var tapsyncBin = flag.String("tapsync", "bin/tapsync", "the tapsync binary to run")

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }
func info(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }

// sh runs a command, returning its combined output in the error on failure.
func sh(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func run() error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the demo creates network namespaces, taps and tc filters")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var cleanups []func()
	defer func() {
		step("cleaning up")
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		info("done: no namespace, tap, filter or QEMU process of the demo is left")
	}()

	step("building the guest (Debian cloud kernel + busybox initramfs, cached after the first run)")
	img, err := testvm.Build(ctx, "", func(f string, a ...any) { info(f, a...) })
	if err != nil {
		return err
	}
	info("kernel %s", img.Kernel)

	b := make([]byte, 3)
	rand.Read(b)
	suffix := hex.EncodeToString(b)
	sandboxNS, nodeNS := "tapsync-demo-pod-"+suffix, "tapsync-demo-node-"+suffix
	step("creating the pod's network namespace %s and a node-side namespace %s", sandboxNS, nodeNS)
	for _, ns := range []string{sandboxNS, nodeNS} {
		if _, err := sh("ip", "netns", "add", ns); err != nil {
			return err
		}
		cleanups = append(cleanups, func() { sh("ip", "netns", "del", ns) })
		sh("ip", "-n", ns, "link", "set", "lo", "up")
	}
	nsPath := "/var/run/netns/" + sandboxNS

	step("booting the guest in QEMU inside the pod namespace (software emulation: a few seconds)")
	vm, err := testvm.Start(ctx, testvm.Options{Image: &img, NetNS: nsPath, SelfConfig: true, Logf: func(f string, a ...any) { info(f, a...) }})
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { vm.Stop() })
	readyCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := vm.WaitReady(readyCtx); err != nil {
		return err
	}
	info("guest is up (QEMU pid %d, QMP socket %s)", vm.Pid, vm.QMP)

	stateDir, err := os.MkdirTemp("", "tapsync-demo-state-")
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { os.RemoveAll(stateDir) })
	cfgPath := filepath.Join(stateDir, "config.toml")
	cfg := fmt.Sprintf(`# demo: one static sandbox, nothing else
state_dir = %q
metrics_address = ""
[containerd]
enabled = false
[discovery]
proc = false
[[sandbox]]
id = "demo-pod"
netns = %q
qmp = %q
`, filepath.Join(stateDir, "run"), nsPath, vm.QMP)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	step("starting the daemon: %s run --config %s", *tapsyncBin, cfgPath)
	for _, l := range strings.Split(strings.TrimSpace(cfg), "\n") {
		info("  %s", l)
	}
	daemon := exec.Command(*tapsyncBin, "run", "--config", cfgPath, "--log-format", "console")
	logs, err := daemon.StderrPipe()
	if err != nil {
		return err
	}
	if err := testproc.Start(daemon); err != nil { // dies with the demo
		return fmt.Errorf("start %s (run `make build` first): %w", *tapsyncBin, err)
	}
	daemonDone := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(logs)
		for sc.Scan() {
			fmt.Printf("    tapsync| %s\n", sc.Text())
		}
		daemon.Wait()
		close(daemonDone)
	}()
	cleanups = append(cleanups, func() {
		daemon.Process.Signal(syscall.SIGTERM) // by pid: the daemon this demo started
		select {
		case <-daemonDone:
		case <-time.After(10 * time.Second):
			daemon.Process.Kill()
			<-daemonDone
		}
	})
	cli := func(args ...string) (string, error) {
		return sh(*tapsyncBin, append(args, "--state-dir", filepath.Join(stateDir, "run"))...)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := cli("status"); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("daemon did not come up: %w", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	links := map[string]net.HardwareAddr{"eth0": testvm.TestMAC(1), "net1": testvm.TestMAC(2)}
	addLink := func(name string) error {
		mac := links[name]
		peer := "node-" + name
		if _, err := sh("ip", "-n", sandboxNS, "link", "add", "name", name, "address", mac.String(), "type", "veth", "peer", "name", peer, "netns", nodeNS); err != nil {
			return err
		}
		sh("ip", "-n", sandboxNS, "link", "set", name, "up")
		sh("ip", "-n", nodeNS, "link", "set", peer, "up")
		_, err := sh("ip", "-n", nodeNS, "addr", "add", fmt.Sprintf("%s/%d", testvm.PeerIP(mac), testvm.PrefixLen), "dev", peer)
		info("CNI-style veth %s (MAC %s) is in the pod; its peer %s has %s", name, mac, peer, testvm.PeerIP(mac))
		return err
	}
	waitGuest := func(re *regexp.Regexp, off int64) error {
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		m, err := vm.WaitSerialFrom(wctx, off, re)
		if err == nil {
			info("guest console: %s", strings.TrimSpace(m[0]))
		}
		return err
	}
	ping := func(name string) error {
		ip := testvm.GuestIP(links[name]).String()
		deadline := time.Now().Add(30 * time.Second)
		for {
			out, err := sh("ip", "netns", "exec", nodeNS, "ping", "-c", "3", "-i", "0.3", "-W", "1", ip)
			if err == nil {
				for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
					if strings.Contains(l, "bytes from") || strings.Contains(l, "packet loss") {
						info("  %s", l)
					}
				}
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("guest %s not reachable over %s: %w", ip, name, err)
			}
		}
	}

	step("a CNI plugin puts eth0 into the pod; nobody tells tapsync, it notices by itself")
	off := vm.SerialOffset()
	if err := addLink("eth0"); err != nil {
		return err
	}
	if err := waitGuest(testvm.NICUpRE(links["eth0"]), off); err != nil {
		return err
	}
	step("pinging the guest from the node side through eth0 ⇄ tap0_kata ⇄ virtio-net")
	if err := ping("eth0"); err != nil {
		return err
	}
	out, _ := sh("tc", "-n", sandboxNS, "filter", "show", "dev", "eth0", "ingress")
	info("the redirect on eth0, as tc shows it:")
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		info("  %s", l)
	}

	step("a second network appears (Multus-style): net1")
	off = vm.SerialOffset()
	if err := addLink("net1"); err != nil {
		return err
	}
	if err := waitGuest(testvm.NICUpRE(links["net1"]), off); err != nil {
		return err
	}
	if err := ping("net1"); err != nil {
		return err
	}

	step("tapsync plan: what a reconcile would do now")
	out, err = cli("plan")
	if err != nil {
		return err
	}
	info("%s", strings.TrimSpace(out))

	step("net1 is deleted from the pod; tapsync unplugs it from the guest first, then removes tap and filters")
	off = vm.SerialOffset()
	if _, err := sh("ip", "-n", sandboxNS, "link", "del", "net1"); err != nil {
		return err
	}
	if err := waitGuest(testvm.NICGoneRE(links["net1"]), off); err != nil {
		return err
	}
	if err := ping("eth0"); err != nil {
		return err
	}

	step("tapsync status")
	out, err = cli("status")
	if err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		info("%s", l)
	}
	return nil
}
