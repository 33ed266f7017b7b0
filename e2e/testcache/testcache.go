// Package testcache owns the cache in which the e2e harnesses keep what
// they build once per machine (testvm's guest images, testcri's
// containerd, crictl and pause image): where it is, the lock its builders
// take, how an entry is written so that no reader ever sees half of it,
// and the go command and module root that builds from this module's
// source start from. What goes into an entry is each harness's business.
// It is test support only: nothing in the daemon imports it.
package testcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// EnvDir names the cache directory, overriding DefaultDir.
	EnvDir = "TAPSYNC_E2E_CACHE"
	// DefaultDir is the cache directory when EnvDir is not set.
	DefaultDir = "/var/cache/tapsync-e2e"
)

// Dir is the cache directory: $TAPSYNC_E2E_CACHE, else DefaultDir.
func Dir() string {
	if dir := os.Getenv(EnvDir); dir != "" {
		return dir
	}
	return DefaultDir
}

// Lock takes an exclusive flock on <dir>/.lock, polling so that ctx can
// cancel the wait. The lock dies with the process, so a killed build never
// wedges the cache.
func Lock(ctx context.Context, dir string) (unlock func(), err error) {
	path := filepath.Join(dir, ".lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing the fd releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for lock %s (another build running?): %w", path, ctx.Err())
		case <-tick.C:
		}
	}
}

// WriteFileSync writes and fsyncs, so that the rename that publishes a
// file never exposes data still in flight.
func WriteFileSync(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	return nil
}

// Publish renames from to to and makes the rename durable, so that a
// crash cannot leave a directory entry without the data behind it.
func Publish(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return fmt.Errorf("install %s: %w", to, err)
	}
	if d, err := os.Open(filepath.Dir(to)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// ModuleRoot finds the tapsync module's directory: from this source file
// when the binary was built without -trimpath (go test), else from the
// working directory.
//
// Equivalent to: dirname "$(go env GOMOD)"
func ModuleRoot(ctx context.Context) (string, error) {
	dir := ""
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		if st, err := os.Stat(filepath.Dir(file)); err == nil && st.IsDir() {
			dir = filepath.Dir(file)
		}
	}
	cmd := exec.CommandContext(ctx, GoTool(), "env", "GOMOD")
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside a Go module (dir %q)", dir)
	}
	return filepath.Dir(gomod), nil
}

// GoTool is the go command: from $PATH, else the toolchain this binary was
// built with (sudo often drops /usr/local/go/bin from $PATH), else plain
// "go", which fails to start.
func GoTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := runtime.GOROOT(); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
