// Command tapsync-testagent is the agent process inside the e2e test guest
// (e2e/testvm puts it at /bin/tapsync-testagent, and the guest's /init
// starts it again whenever it exits). It serves the agent protocol of
// e2e/testagent on every virtio-serial port whose name starts with
// "agent.", one host session at a time per port, surviving the host
// disconnecting and reconnecting, plus a test-only control service
// (tapsync.testagent.Control): Restart makes the process exit, the
// traffic tools (TCPSink, TCPResult, TCPSend, Ping; traffic.go) let a test
// measure what crosses the guest's NICs, and Clock and Timeline
// (measure.go) let a benchmark time a hot-plug inside the guest.
//
// It never configures anything on its own: the guest's interfaces change
// only when a client asks, and it sends traffic only when a test asks.
package main

import (
	"context"
	"fmt"
	"os"
	"time"
)

// exitDelay leaves time for the Restart reply to reach the host before the
// process (and with it the port) goes away.
const exitDelay = 200 * time.Millisecond

func main() {
	ctx := context.Background()
	go watchKernel()
	serve, err := newSessionServer()
	if err != nil {
		logf("%v", err)
		os.Exit(1)
	}

	// Ports appear when the host announces them, which may be after we
	// start; keep looking, and serve each one once.
	served := map[string]bool{}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		ports, err := findPorts()
		if err != nil {
			logf("list virtio-serial ports: %v", err)
		}
		for _, p := range ports {
			if served[p.dev] {
				continue
			}
			served[p.dev] = true
			logf("serving %s on %s", p.name, p.dev)
			go servePort(ctx, p, serve)
		}
		select {
		case <-restart:
			time.Sleep(exitDelay)
			logf("exiting on request")
			os.Exit(0)
		case <-tick.C:
		}
	}
}

// logf writes one line to the console (init gave us /dev/console); used
// sparingly, since every line is on the test's serial log.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tapsync-testagent: "+format+"\n", args...)
}
