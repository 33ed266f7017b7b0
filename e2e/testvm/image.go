package testvm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/tapsync/tapsync/e2e/testcache"
)

// Image is a bootable guest: a kernel and an initramfs holding busybox,
// the virtio-net and virtio-serial modules, the test agent and /init
// (init.sh).
type Image struct {
	Kernel string // bzImage (Debian's vmlinuz)
	Initrd string // gzip-compressed newc cpio
	Name   string // cache entry: kernel package, its version and the recipe hash
}

const (
	// EnvCache overrides the default cache directory (testcache.EnvDir).
	EnvCache = testcache.EnvDir
	// DefaultCacheDir holds built images when neither Build's argument nor
	// EnvCache names a directory (testcache.DefaultDir).
	DefaultCacheDir = testcache.DefaultDir

	// kernelMetaPackage depends on the current versioned cloud kernel. The
	// cloud flavour is small and has virtio, ACPI PCI hotplug and the 8250
	// console built in or as the few modules listed in guestModules.
	kernelMetaPackage = "linux-image-cloud-amd64"

	// busyboxPath must be a static busybox (Debian: busybox-static): the
	// initramfs has no libc.
	busyboxPath = "/bin/busybox"

	// recipeVersion changes when the way this file assembles an image
	// changes in a way the hashed inputs do not show.
	recipeVersion = "2"
)

// initScript is the guest's /init; see the contract at its top.
//
//go:embed init.sh
var initScript []byte

// errAptStale marks failures that an `apt-get update` may cure: the package
// lists are missing, or name a version the mirror no longer has.
var errAptStale = errors.New("apt package lists missing or stale")

// Build returns the cached guest image, building it on first use. cacheDir
// "" means $TAPSYNC_E2E_CACHE or else /var/cache/tapsync-e2e. logf may be nil.
// It builds the guest agent from this module's source with the go command
// (a few seconds when Go's build cache is warm) unless $TAPSYNC_E2E_AGENT
// names a prebuilt one; the agent's bytes are part of the cache key.
//
// Several processes may call Build at once: building happens under an
// exclusive flock on <cacheDir>/.lock and the finished entry appears by an
// atomic rename, so readers never see half an image. An entry missing any
// file is rebuilt.
func Build(ctx context.Context, cacheDir string, logf func(format string, args ...any)) (Image, error) {
	logf = orDiscard(logf)
	if cacheDir == "" {
		cacheDir = testcache.Dir()
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return Image{}, fmt.Errorf("create image cache %s: %w", cacheDir, err)
	}
	if abs, err := filepath.Abs(cacheDir); err == nil {
		cacheDir = abs
	}
	// Tests call Build once per VM (through ForTest); asking apt once per
	// process is enough, and the mutex makes concurrent callers wait for
	// one build rather than start their own.
	built.mu.Lock()
	defer built.mu.Unlock()
	if img, ok := built.images[cacheDir]; ok {
		if _, ok := cachedImage(filepath.Dir(img.Kernel)); ok {
			return img, nil
		}
	}

	recipe, err := newRecipe(ctx)
	if err != nil {
		return Image{}, err
	}
	img, err := buildOnce(ctx, cacheDir, recipe, logf)
	if errors.Is(err, errAptStale) {
		logf("testvm: %v; running apt-get update and retrying", err)
		if uerr := aptGetUpdate(ctx); uerr != nil {
			return Image{}, errors.Join(err, uerr)
		}
		img, err = buildOnce(ctx, cacheDir, recipe, logf)
	}
	if err != nil {
		return Image{}, err
	}
	if built.images == nil {
		built.images = map[string]Image{}
	}
	built.images[cacheDir] = img
	return img, nil
}

// built remembers, per cache directory, the image Build returned.
var built struct {
	mu     sync.Mutex
	images map[string]Image
}

// recipe is everything besides the kernel package that goes into an image.
type recipe struct {
	busybox []byte
	agent   []byte // the static guest agent (buildAgent)
	hash    string // hex sha256 of the inputs, part of the cache key
}

func newRecipe(ctx context.Context) (recipe, error) {
	bb, err := os.ReadFile(busyboxPath)
	if err != nil {
		return recipe{}, fmt.Errorf("read %s: %w (install busybox-static)", busyboxPath, err)
	}
	if err := checkStatic(bb); err != nil {
		return recipe{}, fmt.Errorf("%s: %w (install busybox-static, not busybox)", busyboxPath, err)
	}
	agent, err := buildAgent(ctx)
	if err != nil {
		return recipe{}, err
	}
	h := sha256.New()
	for _, part := range [][]byte{[]byte(recipeVersion), initScript, []byte(strings.Join(guestModules, ",")), bb, agent} {
		fmt.Fprintf(h, "%d:", len(part))
		h.Write(part)
	}
	return recipe{busybox: bb, agent: agent, hash: hex.EncodeToString(h.Sum(nil))}, nil
}

// checkStatic refuses a dynamically linked ELF: it would find no loader in
// the initramfs and the kernel would panic with a bare "No working init".
func checkStatic(bin []byte) error {
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		return fmt.Errorf("not an ELF executable: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return errors.New("dynamically linked")
		}
	}
	return nil
}

// kernelPackage is one version of the versioned Debian kernel package.
type kernelPackage struct{ name, version string }

// entryName is the cache key: a new kernel upload or a changed recipe gives
// a new directory and leaves the old one alone.
func (k kernelPackage) entryName(r recipe) string {
	v := strings.NewReplacer(":", "_", "/", "_").Replace(k.version)
	return fmt.Sprintf("%s_%s_%s", k.name, v, r.hash[:12])
}

func buildOnce(ctx context.Context, cacheDir string, r recipe, logf func(string, ...any)) (Image, error) {
	k, err := resolveKernel(ctx)
	if err != nil {
		return Image{}, err
	}
	entry := filepath.Join(cacheDir, k.entryName(r))
	if img, ok := cachedImage(entry); ok {
		return img, nil
	}

	unlock, err := testcache.Lock(ctx, cacheDir)
	if err != nil {
		return Image{}, err
	}
	defer unlock()
	// Another process may have built it while we waited for the lock.
	if img, ok := cachedImage(entry); ok {
		return img, nil
	}
	// Holding the lock, anything half-done in the cache is garbage: an
	// incomplete entry, or scratch space of a build that was killed.
	if err := os.RemoveAll(entry); err != nil {
		return Image{}, fmt.Errorf("remove incomplete image %s: %w", entry, err)
	}
	stale, _ := filepath.Glob(filepath.Join(cacheDir, ".build-*"))
	for _, s := range stale {
		_ = os.RemoveAll(s)
	}

	start := time.Now()
	logf("testvm: building guest image %s in %s", filepath.Base(entry), cacheDir)
	scratch, err := os.MkdirTemp(cacheDir, ".build-")
	if err != nil {
		return Image{}, fmt.Errorf("create build dir in %s: %w", cacheDir, err)
	}
	defer os.RemoveAll(scratch)
	out := filepath.Join(scratch, "out")
	if err := assemble(ctx, k, r, scratch, out); err != nil {
		return Image{}, fmt.Errorf("build guest image %s: %w", filepath.Base(entry), err)
	}
	if err := testcache.Publish(out, entry); err != nil {
		return Image{}, fmt.Errorf("guest image: %w", err)
	}
	img, ok := cachedImage(entry)
	if !ok {
		return Image{}, fmt.Errorf("guest image %s incomplete right after building it", entry)
	}
	logf("testvm: built guest image %s in %v", img.Name, time.Since(start).Round(time.Millisecond))
	return img, nil
}

const (
	entryKernel   = "vmlinuz"
	entryInitrd   = "initrd.gz"
	entryManifest = "manifest.txt" // written last: its presence means complete
)

func cachedImage(entry string) (Image, bool) {
	for _, f := range []string{entryKernel, entryInitrd, entryManifest} {
		st, err := os.Stat(filepath.Join(entry, f))
		if err != nil || !st.Mode().IsRegular() || st.Size() == 0 {
			return Image{}, false
		}
	}
	return Image{
		Kernel: filepath.Join(entry, entryKernel),
		Initrd: filepath.Join(entry, entryInitrd),
		Name:   filepath.Base(entry),
	}, true
}

// resolveKernel asks apt which versioned package the cloud metapackage's
// candidate depends on, and at which version. One apt-cache call: where the
// binary package cache is disabled (Debian container images), each call
// parses all package lists, about a second.
//
// Equivalent to: apt-cache show --no-all-versions linux-image-cloud-amd64 | grep ^Depends:
// which prints e.g. "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
func resolveKernel(ctx context.Context) (kernelPackage, error) {
	out, err := runTool(ctx, "apt", "apt-cache", "show", "--no-all-versions", kernelMetaPackage)
	if err != nil {
		return kernelPackage{}, fmt.Errorf("resolve %s: %w: %w", kernelMetaPackage, errAptStale, err)
	}
	k, ok := parseKernelDepends(out)
	if !ok {
		return kernelPackage{}, fmt.Errorf("resolve %s: no exact linux-image-* dependency in apt-cache output: %w", kernelMetaPackage, errAptStale)
	}
	return k, nil
}

// parseKernelDepends finds "linux-image-… (= version)" in the Depends line
// of apt-cache show output.
func parseKernelDepends(out string) (kernelPackage, bool) {
	for _, line := range strings.Split(out, "\n") {
		deps, ok := strings.CutPrefix(line, "Depends: ")
		if !ok {
			continue
		}
		for _, dep := range strings.Split(deps, ",") {
			// "name (= version)"; of alternatives ("a | b") take the first.
			dep, _, _ = strings.Cut(dep, "|")
			name, constraint, _ := strings.Cut(strings.TrimSpace(dep), " ")
			version, exact := strings.CutPrefix(strings.Trim(constraint, "()"), "= ")
			if strings.HasPrefix(name, "linux-image-") && exact {
				return kernelPackage{name: name, version: strings.TrimSpace(version)}, true
			}
		}
	}
	return kernelPackage{}, false
}

func aptGetUpdate(ctx context.Context) error {
	if _, err := runTool(ctx, "apt", "apt-get", "update"); err != nil {
		return fmt.Errorf("apt-get update: %w", err)
	}
	return nil
}

// assemble downloads and unpacks the kernel package in scratch and writes the
// image files into out.
func assemble(ctx context.Context, k kernelPackage, r recipe, scratch, out string) error {
	debDir := filepath.Join(scratch, "deb")
	root := filepath.Join(scratch, "root")
	for _, d := range []string{debDir, root, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}

	// Download only: installing would touch the host's /boot and bootloader.
	// The sandbox option keeps apt from warning that user _apt cannot write
	// our root-owned directory.
	// Equivalent to: apt-get download linux-image-…=<version> && dpkg-deb -x *.deb root
	cmd := exec.CommandContext(ctx, "apt-get", "-o", "APT::Sandbox::User=root", "download", k.name+"="+k.version)
	cmd.Dir = debDir
	if _, err := runCmd(cmd, "apt"); err != nil {
		return fmt.Errorf("download %s=%s: %w: %w", k.name, k.version, errAptStale, err)
	}
	debs, _ := filepath.Glob(filepath.Join(debDir, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("download %s=%s: expected one .deb in %s, found %d", k.name, k.version, debDir, len(debs))
	}
	if _, err := runTool(ctx, "dpkg", "dpkg-deb", "-x", debs[0], root); err != nil {
		return fmt.Errorf("unpack %s: %w", filepath.Base(debs[0]), err)
	}

	kpath, release, err := findKernel(root)
	if err != nil {
		return fmt.Errorf("%s: %w", k.name, err)
	}
	if err := checkKernelConfig(filepath.Join(filepath.Dir(kpath), "config-"+release)); err != nil {
		return fmt.Errorf("%s: %w", k.name, err)
	}
	modDir, err := findModuleDir(root, release)
	if err != nil {
		return fmt.Errorf("%s: %w", k.name, err)
	}
	mods, builtin, err := resolveModules(ctx, modDir, guestModules)
	if err != nil {
		return fmt.Errorf("%s: %w", k.name, err)
	}

	if err := copyFile(kpath, filepath.Join(out, entryKernel)); err != nil {
		return err
	}
	if err := writeInitramfs(ctx, filepath.Join(out, entryInitrd), r, mods); err != nil {
		return err
	}

	var m strings.Builder
	fmt.Fprintf(&m, "package: %s=%s\nkernel release: %s\nrecipe: %s\n", k.name, k.version, release, r.hash)
	fmt.Fprintf(&m, "modules (load order):")
	for _, mod := range mods {
		fmt.Fprintf(&m, " %s", mod.name)
	}
	if len(builtin) == 0 {
		builtin = []string{"(none)"}
	}
	fmt.Fprintf(&m, "\nbuilt in (skipped): %s\nchecked =y:", strings.Join(builtin, " "))
	for _, c := range requiredKernelConfig {
		fmt.Fprintf(&m, " %s", c.option)
	}
	m.WriteString("\n")
	return testcache.WriteFileSync(filepath.Join(out, entryManifest), []byte(m.String()), 0o644)
}

func copyFile(from, to string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return fmt.Errorf("read %s: %w", from, err)
	}
	return testcache.WriteFileSync(to, data, 0o644)
}

// runTool runs a host tool with a stable locale and returns its stdout; the
// error carries stderr and, when the tool is missing, the Debian package to
// install.
func runTool(ctx context.Context, pkg, name string, args ...string) (string, error) {
	out, err := runToolBytes(ctx, pkg, name, args...)
	return string(out), err
}

func runToolBytes(ctx context.Context, pkg, name string, args ...string) ([]byte, error) {
	return runCmd(exec.CommandContext(ctx, name, args...), pkg)
}

func runCmd(cmd *exec.Cmd, pkg string) ([]byte, error) {
	name := filepath.Base(cmd.Path)
	if cmd.Err != nil {
		return nil, fmt.Errorf("%s: %w (install %s)", name, cmd.Err, pkg)
	}
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env, "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(cmd.Args[1:], " "), err,
			strings.Join(lastLines(stderr.Bytes(), 5), "; "))
	}
	return stdout.Bytes(), nil
}

// lastLines returns the last n non-empty lines of b, without line endings.
func lastLines(b []byte, n int) []string {
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimRight(l, "\r \t"); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

func orDiscard(logf func(string, ...any)) func(string, ...any) {
	if logf == nil {
		return func(string, ...any) {}
	}
	return logf
}
