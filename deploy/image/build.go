package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

const (
	defaultRepo = "tapsync/tapsync"
	sourceURL   = "https://github.com/tapsync/tapsync"
	binDir      = "usr/local/bin"
	layoutName  = "image"
	archiveName = "tapsync-image.tar"

	// Annotations of the image's entry in index.json. containerd names an
	// imported image after the first, the OCI convention is the second.
	annotationContainerdName = "io.containerd.image.name"
	annotationRefName        = "org.opencontainers.image.ref.name"
)

// programs are the image's contents: each package, built static, becomes
// binDir/name.
var programs = []struct{ pkg, name string }{
	{"./cmd/tapsync", "tapsync"},
	{"./cmd/tapsync-qemu", "tapsync-qemu"},
}

type options struct {
	moduleDir string // the tapsync checkout to build
	outDir    string
	repo      string // the tag is repo:<version>
	version   string // "" means git describe
	licenses  string // SPDX expression; "" leaves the label out
	daemonset string // a manifest to rewrite with the tag; "" for none
}

type result struct {
	src                          source
	tag                          string // repo:<version, tag-safe>
	digest                       string // the manifest's
	layoutDir, archive           string
	daemonset                    string // written manifest, "" when none
	archiveSize                  int64
	layerSize, layerUncompressed int64
}

// source is what the checkout says about itself.
type source struct {
	version  string    // for `tapsync version`: git describe, else "dev"
	revision string    // full commit id; "" without git
	created  time.Time // every timestamp in the image: $SOURCE_DATE_EPOCH, else the commit's time, else the Unix epoch
}

// build compiles the programs from o.moduleDir and writes the image into
// o.outDir as an OCI layout (image/) and a tarball of the same layout
// that also carries a Docker manifest.json (tapsync-image.tar), replacing
// earlier ones. Equal sources, toolchain and options give equal bytes.
func build(ctx context.Context, o options) (result, error) {
	if o.repo == "" {
		o.repo = defaultRepo
	}
	src, err := describe(ctx, o.moduleDir, o.version)
	if err != nil {
		return result{}, err
	}
	ref, err := name.NewTag(o.repo + ":" + tagFor(src.version))
	if err != nil {
		return result{}, fmt.Errorf("tag for version %q: %w", src.version, err)
	}
	r := result{src: src, tag: o.repo + ":" + ref.TagStr()}

	work, err := os.MkdirTemp("", "tapsync-image-")
	if err != nil {
		return r, fmt.Errorf("create build dir: %w", err)
	}
	defer os.RemoveAll(work)
	bins, arch, err := compile(ctx, o.moduleDir, src.version, work)
	if err != nil {
		return r, err
	}
	files := map[string][]byte{}
	for n, b := range bins {
		files[path.Join(binDir, n)] = b
	}
	raw, err := layerTar(files, src.created)
	if err != nil {
		return r, err
	}
	layerGz, err := gzipBytes(raw)
	if err != nil {
		return r, err
	}
	r.layerSize, r.layerUncompressed = int64(len(layerGz)), int64(len(raw))
	img, err := assemble(layerGz, arch, src, o.licenses)
	if err != nil {
		return r, err
	}
	h, err := img.Digest()
	if err != nil {
		return r, fmt.Errorf("image digest: %w", err)
	}
	r.digest = h.String()
	if err := r.write(ref, img, arch, o.outDir); err != nil {
		return r, err
	}
	if o.daemonset != "" {
		r.daemonset = filepath.Join(o.outDir, filepath.Base(o.daemonset))
		if err := rewriteDaemonSet(o.daemonset, r.daemonset, r.tag); err != nil {
			return r, err
		}
	}
	return r, nil
}

// describe reads the version, the commit and its time from git; without
// git the version is "dev" and the time the Unix epoch. $SOURCE_DATE_EPOCH,
// if set, gives the time.
func describe(ctx context.Context, dir, version string) (source, error) {
	s := source{version: version, created: time.Unix(0, 0).UTC()}
	if s.version == "" {
		s.version = "dev"
		if out, err := git(ctx, dir, "describe", "--tags", "--always", "--dirty"); err == nil && out != "" {
			s.version = out
		}
	}
	if strings.ContainsAny(s.version, " \t\n'\"\\") {
		// -ldflags splits on spaces and reads quotes.
		return s, fmt.Errorf("version %q: want no space, quote or backslash", s.version)
	}
	if out, err := git(ctx, dir, "rev-parse", "HEAD"); err == nil {
		s.revision = out
	}
	epoch := os.Getenv("SOURCE_DATE_EPOCH")
	if epoch == "" {
		if out, err := git(ctx, dir, "log", "-1", "--format=%ct", "HEAD"); err == nil {
			epoch = out
		}
	}
	if epoch != "" {
		n, err := strconv.ParseInt(epoch, 10, 64)
		if err != nil || n < 0 {
			return s, fmt.Errorf("source date %q: want seconds since the Unix epoch", epoch)
		}
		// UTC: the config's JSON would otherwise carry the builder's zone.
		s.created = time.Unix(n, 0).UTC()
	}
	return s, nil
}

var notTagChar = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// tagFor makes a version a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}):
// other characters (a semver build's "+") become "-".
func tagFor(version string) string {
	t := strings.TrimLeft(notTagChar.ReplaceAllString(version, "-"), ".-")
	if len(t) > 128 {
		t = t[:128]
	}
	if t == "" {
		t = "dev"
	}
	return t
}

// compile builds the programs into dir and returns each one's bytes by
// name, and the GOARCH they are for. Each must be static.
//
// Equivalent to: CGO_ENABLED=0 GOOS=linux go build -trimpath -buildvcs=false -ldflags "-s -w -X main.version=<v>" -o <dir>/ ./cmd/tapsync ./cmd/tapsync-qemu
func compile(ctx context.Context, moduleDir, version, dir string) (map[string][]byte, string, error) {
	env := append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	// -trimpath keeps the checkout's path out; -buildvcs=false keeps out
	// Go's VCS stamp, which counts untracked files as a change and fails
	// where git is missing (the revision is in a label instead).
	args := []string{"build", "-trimpath", "-buildvcs=false", "-ldflags", "-s -w -X main.version=" + version, "-o", dir + string(filepath.Separator)}
	for _, p := range programs {
		args = append(args, p.pkg)
	}
	cmd := exec.CommandContext(ctx, goTool(), args...)
	cmd.Dir, cmd.Env = moduleDir, env
	if _, err := runCmd(cmd); err != nil {
		return nil, "", fmt.Errorf("build the programs: %w", err)
	}
	cmd = exec.CommandContext(ctx, goTool(), "env", "GOARCH")
	cmd.Dir, cmd.Env = moduleDir, env
	out, err := runCmd(cmd)
	if err != nil {
		return nil, "", fmt.Errorf("read GOARCH: %w", err)
	}
	arch := strings.TrimSpace(string(out))

	bins := map[string][]byte{}
	for _, p := range programs {
		f := filepath.Join(dir, p.name)
		if err := checkStatic(f); err != nil {
			return nil, "", err
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, "", fmt.Errorf("read built %s: %w", p.name, err)
		}
		bins[p.name] = b
	}
	return bins, arch, nil
}

// checkStatic fails unless file is an ELF executable with no interpreter
// and no shared library: the image has no libc.
func checkStatic(file string) error {
	f, err := elf.Open(file)
	if err != nil {
		return fmt.Errorf("read %s as ELF: %w", file, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked (PT_INTERP): the image has no libc", file)
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("read %s's libraries: %w", file, err)
	}
	if len(libs) > 0 {
		return fmt.Errorf("%s needs shared libraries %v: the image has none", file, libs)
	}
	return nil
}

// layerTar is the image's one layer: files (mode 0755) and their parent
// directories, all uid and gid 0, stamped mtime, in name order.
func layerTar(files map[string][]byte, mtime time.Time) ([]byte, error) {
	names := map[string]bool{}
	for f := range files {
		names[f] = true
		for d := path.Dir(f); d != "." && d != "/"; d = path.Dir(d) {
			names[d+"/"] = true
		}
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range slices.Sorted(maps.Keys(names)) {
		h := &tar.Header{Name: n, Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}
		if strings.HasSuffix(n, "/") {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(files[n]))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("layer entry %s: %w", n, err)
		}
		if _, err := tw.Write(files[n]); err != nil {
			return nil, fmt.Errorf("layer entry %s: %w", n, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	return buf.Bytes(), nil
}

// gzipBytes compresses b once, here, rather than on each read of the
// layer. compress/gzip leaves the header's name and time empty and its
// output depends only on the input and the level, for one Go release.
// Level 9 would save 0.3% and take three times as long.
func gzipBytes(b []byte) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(b); err != nil {
		return nil, fmt.Errorf("compress layer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("compress layer: %w", err)
	}
	return buf.Bytes(), nil
}

// assemble makes the image: the layer over nothing, its config stamped
// src.created. Media types are Docker schema 2, the ones crane rebuilds
// from the tarball's manifest.json, so that pushing the tarball keeps the
// digest printed here.
func assemble(layerGz []byte, arch string, src source, licenses string) (v1.Image, error) {
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerGz)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	created := v1.Time{Time: src.created}
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: layer, History: v1.History{
		Created:   created,
		CreatedBy: "go run ./deploy/image",
		Comment:   "tapsync and tapsync-qemu, static",
	}})
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Created = created
	// containerd picks an image's platform from its config.
	cf.OS, cf.Architecture = "linux", arch
	cf.Config = v1.Config{
		Entrypoint: []string{"/" + binDir + "/tapsync"},
		Cmd:        []string{"run"},
		// For `kubectl exec … -- tapsync status`.
		Env:    []string{"PATH=/" + binDir},
		Labels: labels(src, licenses),
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	return img, nil
}

// labels are the org.opencontainers.image.* annotations of the image
// spec, as config labels.
func labels(src source, licenses string) map[string]string {
	l := map[string]string{
		"org.opencontainers.image.title":       "tapsync",
		"org.opencontainers.image.description": "Keeps the network of VM-isolated (Kata Containers) pods wired, continuously: a root node daemon, and tapsync-qemu, the QEMU wrapper it installs.",
		"org.opencontainers.image.source":      sourceURL,
		"org.opencontainers.image.version":     src.version,
		"org.opencontainers.image.created":     src.created.Format(time.RFC3339),
	}
	if src.revision != "" {
		l["org.opencontainers.image.revision"] = src.revision
	}
	if licenses != "" {
		l["org.opencontainers.image.licenses"] = licenses
	}
	return l
}

// write puts img into outDir: the OCI layout image/, and
// tapsync-image.tar, that layout with a Docker manifest.json beside it
// (containerd reads the layout, crane and Docker the manifest.json). The
// old ones are replaced only once the new ones are complete.
func (r *result) write(ref name.Tag, img v1.Image, arch, outDir string) error {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", outDir, err)
	}
	tmp, err := os.MkdirTemp(outDir, ".image-")
	if err != nil {
		return fmt.Errorf("create layout dir in %s: %w", outDir, err)
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	idx := mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
		Annotations: map[string]string{
			annotationContainerdName: containerdName(ref),
			annotationRefName:        ref.TagStr(),
		},
		Platform: &v1.Platform{OS: "linux", Architecture: arch},
	}})
	if _, err := layout.Write(tmp, idx); err != nil {
		return fmt.Errorf("write OCI layout: %w", err)
	}
	manifest, err := dockerManifest(img, r.tag)
	if err != nil {
		return err
	}
	r.archive = filepath.Join(outDir, archiveName)
	if r.archiveSize, err = writeArchive(r.archive, tmp, manifest, r.src.created); err != nil {
		return err
	}
	r.layoutDir = filepath.Join(outDir, layoutName)
	if err := os.RemoveAll(r.layoutDir); err != nil {
		return fmt.Errorf("remove old layout: %w", err)
	}
	if err := os.Rename(tmp, r.layoutDir); err != nil {
		return fmt.Errorf("install layout: %w", err)
	}
	return nil
}

// containerdName is ref as containerd and CRI name it once normalized:
// docker.io/tapsync/tapsync:v1, not index.docker.io/….
func containerdName(ref name.Tag) string {
	reg := ref.RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return reg + "/" + ref.RepositoryStr() + ":" + ref.TagStr()
}

// dockerManifest is docker-archive's manifest.json for img, its blobs
// named by their paths in the OCI layout.
func dockerManifest(img v1.Image, tag string) ([]byte, error) {
	cfg, err := img.ConfigName()
	if err != nil {
		return nil, fmt.Errorf("config digest: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("layers: %w", err)
	}
	blob := func(h v1.Hash) string { return path.Join("blobs", h.Algorithm, h.Hex) }
	entry := tarball.Descriptor{Config: blob(cfg), RepoTags: []string{tag}}
	for _, l := range layers {
		h, err := l.Digest()
		if err != nil {
			return nil, fmt.Errorf("layer digest: %w", err)
		}
		entry.Layers = append(entry.Layers, blob(h))
	}
	return json.Marshal(tarball.Manifest{entry})
}

// writeArchive tars the layout directory dir plus manifest.json into
// file: entries in name order, root's, stamped mtime. It returns the
// file's size.
func writeArchive(file, dir string, manifest []byte, mtime time.Time) (int64, error) {
	type entry struct {
		name string
		data []byte // nil for a directory
	}
	entries := []entry{{"manifest.json", manifest}}
	err := fs.WalkDir(os.DirFS(dir), ".", func(p string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case p == ".":
			return nil
		case d.IsDir():
			entries = append(entries, entry{name: p + "/"})
			return nil
		case !d.Type().IsRegular():
			return fmt.Errorf("%s: not a regular file", p)
		}
		b, err := os.ReadFile(filepath.Join(dir, p))
		entries = append(entries, entry{p, b})
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("read layout %s: %w", dir, err)
	}
	slices.SortFunc(entries, func(a, b entry) int { return strings.Compare(a.name, b.name) })

	tmp := file + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return 0, fmt.Errorf("create %s: %w", tmp, err)
	}
	defer os.Remove(tmp) // after the rename: nothing
	bw := bufio.NewWriter(f)
	tw := tar.NewWriter(bw)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, ModTime: mtime, Format: tar.FormatPAX}
		if e.data == nil {
			h.Typeflag, h.Mode = tar.TypeDir, 0o755
		} else {
			h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o644, int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			f.Close()
			return 0, fmt.Errorf("write %s: %w", tmp, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			f.Close()
			return 0, fmt.Errorf("write %s: %w", tmp, err)
		}
	}
	err = errors.Join(tw.Close(), bw.Flush())
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", tmp, err)
	}
	st, err := os.Stat(tmp)
	if err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, file); err != nil {
		return 0, fmt.Errorf("install %s: %w", file, err)
	}
	return st.Size(), nil
}

var daemonSetImage = regexp.MustCompile(`(?m)^(\s*(?:-\s*)?image:\s*)["']?` + regexp.QuoteMeta(defaultRepo) + `:[^\s"']+["']?`)

// rewriteDaemonSet copies the manifest from to to with every
// `image: tapsync/tapsync:…` naming tag instead.
func rewriteDaemonSet(from, to, tag string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return fmt.Errorf("read DaemonSet: %w", err)
	}
	if !daemonSetImage.Match(b) {
		return fmt.Errorf("%s has no `image: %s:…` line to set to %s", from, defaultRepo, tag)
	}
	out := daemonSetImage.ReplaceAll(b, []byte("${1}"+tag))
	if err := os.WriteFile(to, out, 0o644); err != nil {
		return fmt.Errorf("write DaemonSet: %w", err)
	}
	return nil
}

// moduleDir is the directory of the Go module that holds dir ("" for the
// working directory).
func moduleDir(ctx context.Context, dir string) (string, error) {
	cmd := exec.CommandContext(ctx, goTool(), "env", "GOMOD")
	cmd.Dir = dir
	out, err := runCmd(cmd)
	if err != nil {
		return "", fmt.Errorf("find the module to build: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find the module to build: %q is not inside a Go module", dir)
	}
	return filepath.Dir(gomod), nil
}

// git runs git in dir and returns its trimmed output.
func git(ctx context.Context, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	out, err := runCmd(cmd)
	return strings.TrimSpace(string(out)), err
}

// goTool is the go command: from $PATH, else the toolchain this program
// was built with (sudo often drops /usr/local/go/bin from $PATH).
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); runtime.GOROOT() != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "go"
}

// runCmd runs cmd and returns its stdout; the error carries the end of
// its stderr.
func runCmd(cmd *exec.Cmd) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = "…" + msg[len(msg)-2000:]
		}
		return nil, fmt.Errorf("%s %s: %w: %s", filepath.Base(cmd.Path), strings.Join(cmd.Args[1:], " "), err, msg)
	}
	return stdout.Bytes(), nil
}
