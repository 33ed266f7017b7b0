// Command tapsync-bench measures how fast the daemon wires a new NIC: it
// boots a guest, runs `tapsync run` on it, adds and removes a veth in the
// sandbox netns many times, and prints the trigger → converged latency the
// daemon reports for each (median, p90, p99, max). Run it as root
// (`make bench`); it is a measurement, not a test, and asserts nothing.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/tapsync/tapsync/e2e/testproc"
	"github.com/tapsync/tapsync/e2e/testvm"
)

func main() {
	n := flag.Int("n", 30, "add/remove cycles")
	bin := flag.String("tapsync", "bin/tapsync", "tapsync binary")
	flag.Parse()
	if err := run(*n, *bin); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func sh(args ...string) error {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

type converged struct {
	latency   float64 // ms
	mutations int
}

func run(cycles int, bin string) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root")
	}
	ctx := context.Background()
	img, err := testvm.Build(ctx, "", nil)
	if err != nil {
		return err
	}
	ns := fmt.Sprintf("tapsync-bench-%d", os.Getpid())
	if err := sh("ip", "netns", "add", ns); err != nil {
		return err
	}
	defer sh("ip", "netns", "del", ns)
	nsPath := "/var/run/netns/" + ns
	vm, err := testvm.Start(ctx, testvm.Options{Image: &img, NetNS: nsPath, SelfConfig: true})
	if err != nil {
		return err
	}
	defer vm.Stop()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := vm.WaitReady(rctx); err != nil {
		return err
	}
	stateDir, err := os.MkdirTemp("", "tapsync-bench-state-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stateDir)
	cfg := filepath.Join(stateDir, "config.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("state_dir = %q\nmetrics_address = \"\"\n[containerd]\nenabled = false\n[discovery]\nproc = false\n"+
		"[[sandbox]]\nid = \"bench\"\nnetns = %q\nqmp = %q\n", stateDir+"/s", nsPath, vm.QMP)), 0o600)
	cmd := exec.Command(bin, "run", "--config", cfg, "--log-format", "json")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := testproc.Start(cmd); err != nil { // dies with the bench
		return err
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	events := make(chan converged, 16)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var m struct {
				Message   string  `json:"message"`
				Latency   float64 `json:"latency_ms"`
				Mutations int     `json:"mutations"`
			}
			if json.Unmarshal(sc.Bytes(), &m) == nil && m.Message == "converged" {
				events <- converged{m.Latency, m.Mutations}
			}
		}
		close(events)
	}()
	wait := func() (converged, error) {
		select {
		case c, ok := <-events:
			if !ok {
				return c, errors.New("daemon exited")
			}
			return c, nil
		case <-time.After(time.Minute):
			return converged{}, errors.New("no converged event within a minute")
		}
	}
	var adds, removes []float64
	for i := range cycles {
		mac := testvm.TestMAC(1 + i%200).String()
		if err := sh("ip", "-n", ns, "link", "add", "name", "eth0", "address", mac, "type", "veth", "peer", "name", "peer0"); err != nil {
			return err
		}
		c, err := wait()
		if err != nil {
			return err
		}
		adds = append(adds, c.latency)
		if err := sh("ip", "-n", ns, "link", "del", "eth0"); err != nil {
			return err
		}
		if c, err = wait(); err != nil {
			return err
		}
		removes = append(removes, c.latency)
	}
	fmt.Printf("trigger → converged latency over %d cycles (daemon-reported, TCG guest, %s)\n\n", cycles, time.Now().Format(time.DateOnly))
	tw := tabwriter.NewWriter(os.Stdout, 4, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "operation\tn\tmedian ms\tp90 ms\tp99 ms\tmax ms\t")
	for _, row := range []struct {
		name string
		v    []float64
	}{{"add NIC (veth appears)", adds}, {"remove NIC (veth deleted)", removes}} {
		slices.Sort(row.v)
		q := func(p float64) float64 { return row.v[min(len(row.v)-1, int(p*float64(len(row.v))))] }
		fmt.Fprintf(tw, "%s\t%d\t%.1f\t%.1f\t%.1f\t%.1f\t\n", row.name, len(row.v), q(0.5), q(0.9), q(0.99), row.v[len(row.v)-1])
	}
	return tw.Flush()
}
