package testvm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

const (
	// EnvAgent names a prebuilt static agent binary to put into the image
	// instead of building one, for programs run outside the source tree.
	EnvAgent = "TAPSYNC_E2E_AGENT"

	// agentPackage is the guest agent, relative to the module root.
	agentPackage = "./e2e/testagent/cmd/tapsync-testagent"
	// agentGuestPath is where init.sh expects it.
	agentGuestPath = "bin/tapsync-testagent"
)

// buildAgent returns the static guest agent binary: $TAPSYNC_E2E_AGENT if
// set, else a fresh build from this module's source.
//
// The build must give the same bytes for the same source, because they go
// into the image cache key: -trimpath drops local paths, -buildvcs=false
// keeps the commit and dirty flag out (a new commit elsewhere in the tree
// must not rebuild the image), and -s -w drops symbols the guest never
// needs. The guest is x86_64 (qemu-system-x86_64) whatever the host is.
//
// Equivalent to: CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath -buildvcs=false -ldflags='-s -w' -o agent ./e2e/testagent/cmd/tapsync-testagent
func buildAgent(ctx context.Context) ([]byte, error) {
	if p := os.Getenv(EnvAgent); p != "" {
		bin, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read agent from $%s: %w", EnvAgent, err)
		}
		if err := checkStatic(bin); err != nil {
			return nil, fmt.Errorf("agent %s from $%s: %w (build it with CGO_ENABLED=0)", p, EnvAgent, err)
		}
		return bin, nil
	}
	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "tapsync-testagent-")
	if err != nil {
		return nil, fmt.Errorf("create agent build dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, "tapsync-testagent")
	cmd := exec.CommandContext(ctx, goTool(), "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", out, agentPackage)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if _, err := runCmd(cmd, "golang (or set $"+EnvAgent+")"); err != nil {
		return nil, fmt.Errorf("build guest agent: %w", err)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		return nil, fmt.Errorf("read built guest agent: %w", err)
	}
	if err := checkStatic(bin); err != nil {
		return nil, fmt.Errorf("built guest agent: %w", err)
	}
	return bin, nil
}

// moduleRoot finds the tapsync module's directory: from this source file
// when the binary was built without -trimpath (go test), else from the
// working directory.
func moduleRoot(ctx context.Context) (string, error) {
	dir := ""
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		if st, err := os.Stat(filepath.Dir(file)); err == nil && st.IsDir() {
			dir = filepath.Dir(file)
		}
	}
	cmd := exec.CommandContext(ctx, goTool(), "env", "GOMOD")
	cmd.Dir = dir
	out, err := runCmd(cmd, "golang")
	if err != nil {
		return "", fmt.Errorf("find the module to build the guest agent from: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find the module to build the guest agent from: not inside a Go module (dir %q); run from the tapsync source tree or set $%s", dir, EnvAgent)
	}
	return filepath.Dir(gomod), nil
}

// goTool is the go command: from $PATH, else the toolchain this binary was
// built with (sudo often drops /usr/local/go/bin from $PATH).
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := runtime.GOROOT(); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go" // fails in runCmd with "install golang"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
