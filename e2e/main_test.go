//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
)

// The test binary doubles as a one-shot reconciler process, so crash tests
// can SIGKILL a real process in the middle of a reconcile.
const helperEnv = "TAPSYNC_E2E_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "reconcile" {
		os.Exit(reconcileOnce())
	}
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath)) // the tapsync binary built for the daemon tests
	}
	os.Exit(code)
}

// reconcileOnce runs one reconcile of the sandbox described by the
// environment (TAPSYNC_E2E_MODEL: its model), or with
// TAPSYNC_E2E_TEARDOWN=1 its teardown. With TAPSYNC_E2E_CRASH_AFTER=k it
// SIGKILLs itself right after the k-th completed action. It prints
// "mutations=N" on success (0 for a teardown, which ends the sandbox).
func reconcileOnce() int {
	log := zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, NoColor: true}).With().Timestamp().Logger()
	ctx := log.WithContext(context.Background())
	store, err := state.Open(os.Getenv("TAPSYNC_E2E_STATE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	r := reconcile.New(store)
	defer r.Close()
	queues, _ := strconv.Atoi(os.Getenv("TAPSYNC_E2E_QUEUES"))
	sb := reconcile.Sandbox{
		ID: os.Getenv("TAPSYNC_E2E_SANDBOX"), Netns: os.Getenv("TAPSYNC_E2E_NETNS"), QMP: os.Getenv("TAPSYNC_E2E_QMP"),
		Queues: queues, UnplugTimeout: 20 * time.Second, Model: os.Getenv("TAPSYNC_E2E_MODEL"),
	}
	if _, err := r.Register(sb, reconcile.SourceConfig); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if k, err := strconv.Atoi(os.Getenv("TAPSYNC_E2E_CRASH_AFTER")); err == nil && k > 0 {
		done := 0
		r.AfterAction = func(a reconcile.Action) {
			if done++; done == k {
				log.Warn().Str("action", a.String()).Msg("crashing now (SIGKILL)")
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {} // never returns
			}
		}
	}
	if os.Getenv("TAPSYNC_E2E_TEARDOWN") == "1" {
		if err := r.Teardown(ctx, sb.ID); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println("mutations=0")
		return 0
	}
	if err := r.Reconcile(ctx, sb.ID); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("mutations=%d\n", r.Status()[0].Mutations)
	return 0
}
