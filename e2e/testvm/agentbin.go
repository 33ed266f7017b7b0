package testvm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/tapsync/tapsync/e2e/testcache"
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
	root, err := testcache.ModuleRoot(ctx)
	if err != nil {
		return nil, fmt.Errorf("find the module to build the guest agent from: %w; run from the tapsync source tree (go installed) or set $%s", err, EnvAgent)
	}
	tmp, err := os.MkdirTemp("", "tapsync-testagent-")
	if err != nil {
		return nil, fmt.Errorf("create agent build dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, "tapsync-testagent")
	cmd := exec.CommandContext(ctx, testcache.GoTool(), "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", out, agentPackage)
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
