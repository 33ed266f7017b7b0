package testcri

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/tapsync/tapsync/e2e/testcache"
)

const (
	// ContainerdVersion and CrictlVersion are the pinned versions the
	// harness builds from their Go modules.
	ContainerdVersion = "v2.4.2"
	CrictlVersion     = "v1.37.0"

	// PauseImage is the sandbox image CRI is pinned to: testcri's own
	// pause program (e2e/testcri/pause), imported from a local tarball
	// because no registry is reachable.
	PauseImage = "localhost/tapsync-e2e/pause:3.10"

	// cacheSubdir is testcri's part of the e2e cache (testcache.Dir).
	cacheSubdir = "testcri"
	// recipeVersion changes when the way this file builds something
	// changes in a way the hashed inputs do not show.
	recipeVersion = "1"

	buildTimeout = 20 * time.Minute

	pausePackage = "./e2e/testcri/pause"
)

// goBuild is one pinned `go install` of one module version.
type goBuild struct {
	name     string   // cache entry prefix
	module   string   // module path
	version  string   // module version
	packages []string // below module, each becomes a binary
	tags     string
	ldflags  string
}

var (
	containerdBuild = goBuild{
		name:     "containerd",
		module:   "github.com/containerd/containerd/v2",
		version:  ContainerdVersion,
		packages: []string{"cmd/containerd", "cmd/containerd-shim-runc-v2"},
		// btrfs needs C headers Debian puts in libbtrfs-dev; nothing here
		// uses btrfs.
		tags: "no_btrfs",
	}
	crictlBuild = goBuild{
		name:     "crictl",
		module:   "sigs.k8s.io/cri-tools",
		version:  CrictlVersion,
		packages: []string{"cmd/crictl"},
		// As cri-tools' Makefile does, so that `crictl --version` says it.
		ldflags: "-X sigs.k8s.io/cri-tools/pkg/version.Version=" + CrictlVersion,
	}
)

// entry is the cache directory name: the version in clear, a hash of the
// rest of the recipe (a new tag or flag gives a new entry).
func (b goBuild) entry() string {
	h := sha256.Sum256([]byte(strings.Join([]string{recipeVersion, b.module, b.version,
		strings.Join(b.packages, ","), b.tags, b.ldflags, runtime.GOOS, runtime.GOARCH}, "\x00")))
	return fmt.Sprintf("%s-%s-%s", b.name, b.version, hex.EncodeToString(h[:4]))
}

func (b goBuild) binaries() []string {
	var out []string
	for _, p := range b.packages {
		out = append(out, filepath.Base(p))
	}
	return out
}

// binaries are the built programs the harness runs.
type binaries struct {
	containerd, shim, crictl string
	pauseTar                 string // docker-archive tarball of PauseImage
}

// built remembers, per cache directory, what prepare returned, so one
// test process checks and builds once.
var built struct {
	mu   sync.Mutex
	bins map[string]binaries
}

// cacheDir is testcri's cache directory: $TAPSYNC_E2E_CACHE/testcri, or
// /var/cache/tapsync-e2e/testcri.
func cacheDir() string {
	dir := testcache.Dir()
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	return filepath.Join(dir, cacheSubdir)
}

// prepare returns the binaries and the pause image, building what the
// cache lacks. Several processes may call it at once: builds run under an
// exclusive flock on <cache>/.lock and finished entries appear by an
// atomic rename.
func prepare(ctx context.Context, logf func(string, ...any)) (binaries, error) {
	dir := cacheDir()
	built.mu.Lock()
	defer built.mu.Unlock()
	if b, ok := built.bins[dir]; ok && fileExists(b.containerd) && fileExists(b.shim) && fileExists(b.crictl) && fileExists(b.pauseTar) {
		return b, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return binaries{}, fmt.Errorf("create cache %s: %w", dir, err)
	}
	ctx, cancel := context.WithTimeout(ctx, buildTimeout)
	defer cancel()
	ctrDir, err := ensureGoBuild(ctx, dir, containerdBuild, logf)
	if err != nil {
		return binaries{}, err
	}
	crictlDir, err := ensureGoBuild(ctx, dir, crictlBuild, logf)
	if err != nil {
		return binaries{}, err
	}
	pause, err := ensurePauseImage(ctx, dir, logf)
	if err != nil {
		return binaries{}, err
	}
	b := binaries{
		containerd: filepath.Join(ctrDir, "containerd"),
		shim:       filepath.Join(ctrDir, "containerd-shim-runc-v2"),
		crictl:     filepath.Join(crictlDir, "crictl"),
		pauseTar:   pause,
	}
	if built.bins == nil {
		built.bins = map[string]binaries{}
	}
	built.bins[dir] = b
	return b, nil
}

const manifestFile = "manifest.txt" // written last: its presence means complete

// ensureGoBuild returns the cache entry of b, building it first if absent.
//
// Equivalent to: GOBIN=<entry> go install -tags <tags> <module>/<pkg>@<version>...
func ensureGoBuild(ctx context.Context, cache string, b goBuild, logf func(string, ...any)) (string, error) {
	entry := filepath.Join(cache, b.entry())
	complete := func() bool {
		for _, f := range append(b.binaries(), manifestFile) {
			if st, err := os.Stat(filepath.Join(entry, f)); err != nil || !st.Mode().IsRegular() || st.Size() == 0 {
				return false
			}
		}
		return true
	}
	if complete() {
		return entry, nil
	}
	unlock, err := testcache.Lock(ctx, cache)
	if err != nil {
		return "", err
	}
	defer unlock()
	if complete() { // built by another process while we waited
		return entry, nil
	}
	// Holding the lock, anything half-done is garbage.
	if err := os.RemoveAll(entry); err != nil {
		return "", fmt.Errorf("remove incomplete %s: %w", entry, err)
	}
	removeStaleScratch(cache)
	scratch, err := os.MkdirTemp(cache, ".build-")
	if err != nil {
		return "", fmt.Errorf("create build dir in %s: %w", cache, err)
	}
	defer os.RemoveAll(scratch)
	out := filepath.Join(scratch, "out")

	start := time.Now()
	logf("testcri: building %s %s into %s (cold: minutes)", b.module, b.version, entry)
	args := []string{"install"}
	if b.tags != "" {
		args = append(args, "-tags", b.tags)
	}
	if b.ldflags != "" {
		args = append(args, "-ldflags", b.ldflags)
	}
	for _, p := range b.packages {
		args = append(args, b.module+"/"+p+"@"+b.version)
	}
	cmd := exec.CommandContext(ctx, testcache.GoTool(), args...)
	// Outside any module, so that pkg@version builds with the module's own
	// go.mod; GOFLAGS from the caller (say -mod=vendor) would not apply.
	cmd.Dir = scratch
	cmd.Env = append(os.Environ(), "GOBIN="+out, "GOFLAGS=-buildvcs=false", "GOWORK=off", "GO111MODULE=on")
	if _, err := runCmd(cmd); err != nil {
		return "", fmt.Errorf("build %s@%s: %w", b.module, b.version, err)
	}
	manifest := fmt.Sprintf("module: %s@%s\npackages: %s\ntags: %s\nldflags: %s\ngo: %s\nbuilt: %s in %v\n",
		b.module, b.version, strings.Join(b.packages, " "), b.tags, b.ldflags, goVersion(ctx),
		time.Now().UTC().Format(time.RFC3339), time.Since(start).Round(time.Second))
	if err := testcache.WriteFileSync(filepath.Join(out, manifestFile), []byte(manifest), 0o644); err != nil {
		return "", err
	}
	if err := testcache.Publish(out, entry); err != nil {
		return "", err
	}
	logf("testcri: built %s in %v", filepath.Base(entry), time.Since(start).Round(time.Millisecond))
	return entry, nil
}

// ensurePauseImage builds the pause program from this module's source
// and returns the cached image tarball holding it, writing it when
// absent. The program is rebuilt each time (seconds with a warm Go build
// cache); its bytes key the tarball.
func ensurePauseImage(ctx context.Context, cache string, logf func(string, ...any)) (string, error) {
	bin, err := buildPause(ctx)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	for _, part := range [][]byte{[]byte(recipeVersion), []byte(PauseImage), bin} {
		fmt.Fprintf(h, "%d:", len(part))
		h.Write(part)
	}
	path := filepath.Join(cache, "pause-"+hex.EncodeToString(h.Sum(nil))[:12]+".tar")
	if fileExists(path) {
		return path, nil
	}
	unlock, err := testcache.Lock(ctx, cache)
	if err != nil {
		return "", err
	}
	defer unlock()
	if fileExists(path) {
		return path, nil
	}
	var buf bytes.Buffer
	if err := writePauseImage(&buf, bin); err != nil {
		return "", err
	}
	tmp := path + ".tmp"
	if err := testcache.WriteFileSync(tmp, buf.Bytes(), 0o644); err != nil {
		return "", err
	}
	if err := testcache.Publish(tmp, path); err != nil {
		return "", err
	}
	logf("testcri: wrote pause image %s (%s)", PauseImage, path)
	return path, nil
}

// writePauseImage writes a one-layer image holding bin as /pause, its
// entrypoint, as a docker-archive tarball tagged PauseImage. Creation
// times stay zero, so the same binary gives the same image digest.
func writePauseImage(w io.Writer, bin []byte) error {
	var layerTar bytes.Buffer
	tw := tar.NewWriter(&layerTar)
	if err := tw.WriteHeader(&tar.Header{Name: "pause", Mode: 0o755, Size: int64(len(bin)), Typeflag: tar.TypeReg}); err != nil {
		return fmt.Errorf("pause layer: %w", err)
	}
	if _, err := tw.Write(bin); err != nil {
		return fmt.Errorf("pause layer: %w", err)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("pause layer: %w", err)
	}
	layerBytes := layerTar.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	})
	if err != nil {
		return fmt.Errorf("pause layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return fmt.Errorf("pause image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("pause image config: %w", err)
	}
	cf = cf.DeepCopy()
	// containerd picks an image's platform from its config: without them
	// the import matches no platform.
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config = v1.Config{Entrypoint: []string{"/pause"}, User: "65535:65535"}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return fmt.Errorf("pause image config: %w", err)
	}
	ref, err := name.NewTag(PauseImage)
	if err != nil {
		return fmt.Errorf("parse %s: %w", PauseImage, err)
	}
	if err := tarball.Write(ref, img, w); err != nil {
		return fmt.Errorf("write pause image: %w", err)
	}
	return nil
}

// buildPause builds the static pause program from this module's source.
//
// Equivalent to: CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags='-s -w' -o pause ./e2e/testcri/pause
func buildPause(ctx context.Context) ([]byte, error) {
	root, err := testcache.ModuleRoot(ctx)
	if err != nil {
		return nil, fmt.Errorf("find the module to build pause from: %w", err)
	}
	tmp, err := os.MkdirTemp("", "testcri-pause-")
	if err != nil {
		return nil, fmt.Errorf("create pause build dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, "pause")
	cmd := exec.CommandContext(ctx, testcache.GoTool(), "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", out, pausePackage)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if _, err := runCmd(cmd); err != nil {
		return nil, fmt.Errorf("build pause: %w", err)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		return nil, fmt.Errorf("read built pause: %w", err)
	}
	return bin, nil
}

func goVersion(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, testcache.GoTool(), "env", "GOVERSION").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// removeStaleScratch removes what a killed build left; call it holding
// the lock.
func removeStaleScratch(cache string) {
	stale, _ := filepath.Glob(filepath.Join(cache, ".build-*"))
	tmps, _ := filepath.Glob(filepath.Join(cache, "*.tmp"))
	for _, s := range append(stale, tmps...) {
		_ = os.RemoveAll(s)
	}
}

// runCmd runs cmd with a stable locale and returns its stdout; the error
// carries the last lines of stderr.
func runCmd(cmd *exec.Cmd) ([]byte, error) {
	if cmd.Err != nil {
		return nil, cmd.Err
	}
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env, "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", filepath.Base(cmd.Path), strings.Join(cmd.Args[1:], " "), err,
			strings.Join(lastLines(stderr.String(), 8), "; "))
	}
	return stdout.Bytes(), nil
}

// lastLines returns the last n non-empty lines of s.
func lastLines(s string, n int) []string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimRight(l, "\r \t"); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
