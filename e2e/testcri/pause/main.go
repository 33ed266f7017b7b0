// Command pause is the pod sandbox process of testcri's pause image: as
// PID 1 of a pod it holds the pod's namespaces, reaps the zombies that
// are reparented to it, and exits 0 on SIGTERM or SIGINT. It stands in
// for registry.k8s.io/pause, which no registry here can serve. It does
// nothing else: no flags, no output besides a line on exit.
package main

import (
	"fmt"
	"os"
	"os/signal"

	"golang.org/x/sys/unix"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGCHLD)
	for sig := range sigs {
		if sig != unix.SIGCHLD {
			fmt.Fprintf(os.Stderr, "pause: %v, exiting\n", sig)
			os.Exit(0)
		}
		reap()
	}
}

// reap waits for every exited child without blocking: one SIGCHLD may
// stand for several exits.
func reap() {
	for {
		var ws unix.WaitStatus
		// Equivalent to: while waitpid(-1, &status, WNOHANG) > 0
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
