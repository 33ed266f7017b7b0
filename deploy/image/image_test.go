package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/json"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/images/archive"
	"github.com/containerd/containerd/v2/plugins/content/local"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestTagFor(t *testing.T) {
	for _, tc := range []struct{ version, want string }{
		{"v1.2.3", "v1.2.3"},
		{"v1.2.3-4-gabcdef0-dirty", "v1.2.3-4-gabcdef0-dirty"},
		{"abcdef0", "abcdef0"},
		{"v1.0.0+build.5", "v1.0.0-build.5"},
		{"release/1.0", "release-1.0"},
		{"-x", "x"},
		{".hidden", "hidden"},
		{"", "dev"},
		{"+", "dev"},
		{strings.Repeat("a", 200), strings.Repeat("a", 128)},
	} {
		if got := tagFor(tc.version); got != tc.want {
			t.Errorf("tagFor(%q) = %q, want %q", tc.version, got, tc.want)
		}
	}
}

func TestRewriteDaemonSet(t *testing.T) {
	dir := t.TempDir()
	in := "spec:\n  initContainers:\n    - name: a\n      image: tapsync/tapsync:UNRELEASED\n  containers:\n    - image: \"tapsync/tapsync:old\"\n      name: b\n    - name: c\n      image: other/image:1\n"
	want := "spec:\n  initContainers:\n    - name: a\n      image: tapsync/tapsync:v2\n  containers:\n    - image: tapsync/tapsync:v2\n      name: b\n    - name: c\n      image: other/image:1\n"
	from, to := filepath.Join(dir, "in.yaml"), filepath.Join(dir, "out.yaml")
	if err := os.WriteFile(from, []byte(in), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := rewriteDaemonSet(from, to, "tapsync/tapsync:v2"); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(to); string(got) != want {
		t.Errorf("rewritten:\n%s\nwant:\n%s", got, want)
	}
	if err := os.WriteFile(from, []byte("image: other/image:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := rewriteDaemonSet(from, to, "tapsync/tapsync:v2"); err == nil {
		t.Error("a manifest without a tapsync image was accepted")
	}
}

// TestBuildReproducible builds the image of the working tree twice and
// checks that the builds agree byte for byte, then reads the image the way
// its users do: from the OCI layout, as crane reads the tarball, and as
// containerd imports it.
func TestBuildReproducible(t *testing.T) {
	if testing.Short() {
		t.Skip("builds tapsync twice")
	}
	ctx := context.Background()
	root, err := moduleDir(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var rs [2]result
	for i := range rs {
		rs[i], err = build(ctx, options{
			moduleDir: root,
			outDir:    t.TempDir(),
			daemonset: filepath.Join(root, "deploy", "daemonset.yaml"),
		})
		if err != nil {
			t.Fatalf("build %d: %v", i+1, err)
		}
	}
	if rs[0].digest != rs[1].digest {
		t.Errorf("two builds of one tree: digests %s and %s", rs[0].digest, rs[1].digest)
	}
	if a, b := fileSum(t, rs[0].archive), fileSum(t, rs[1].archive); a != b {
		t.Errorf("two builds of one tree: archives differ (sha256 %x and %x)", a, b)
	}
	r := rs[0]
	t.Logf("%s %s, layer %d bytes", r.tag, r.digest, r.layerSize)

	created := wantCreated(t, root)
	img := checkLayout(t, r)
	checkConfig(t, r, img, root, created)
	checkLayer(t, r, img, created)
	checkArchive(t, r)
	if b, err := os.ReadFile(r.daemonset); err != nil || !strings.Contains(string(b), "image: "+r.tag+"\n") {
		t.Errorf("%s does not name %s (err %v)", r.daemonset, r.tag, err)
	}
}

// wantCreated is the time the image must carry: the commit's, as
// SOURCE_DATE_EPOCH overrides.
func wantCreated(t *testing.T, root string) time.Time {
	epoch := os.Getenv("SOURCE_DATE_EPOCH")
	if epoch == "" {
		out, err := exec.Command("git", "-C", root, "log", "-1", "--format=%ct", "HEAD").Output()
		if err != nil {
			t.Logf("no commit time (%v): want the Unix epoch", err)
			return time.Unix(0, 0).UTC()
		}
		epoch = strings.TrimSpace(string(out))
	}
	n, err := strconv.ParseInt(epoch, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return time.Unix(n, 0).UTC()
}

func checkLayout(t *testing.T, r result) v1.Image {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(r.layoutDir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("layout index lists %d manifests, want 1", len(im.Manifests))
	}
	d := im.Manifests[0]
	if d.Digest.String() != r.digest {
		t.Errorf("layout's manifest %s, printed %s", d.Digest, r.digest)
	}
	repo, tag, _ := strings.Cut(r.tag, ":")
	if got, want := d.Annotations[annotationContainerdName], "docker.io/"+repo+":"+tag; got != want {
		t.Errorf("%s = %q, want %q", annotationContainerdName, got, want)
	}
	if got := d.Annotations[annotationRefName]; got != tag {
		t.Errorf("%s = %q, want %q", annotationRefName, got, tag)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func checkConfig(t *testing.T, r result, img v1.Image, root string, created time.Time) {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || (os.Getenv("GOARCH") == "" && cf.Architecture != runtime.GOARCH) {
		t.Errorf("platform %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if !cf.Created.Time.Equal(created) {
		t.Errorf("created %v, want the commit's time %v", cf.Created.Time, created)
	}
	for _, h := range cf.History {
		if !h.Created.Time.Equal(created) {
			t.Errorf("history %q created %v, want %v", h.CreatedBy, h.Created.Time, created)
		}
	}
	if !slices.Equal(cf.Config.Entrypoint, []string{"/usr/local/bin/tapsync"}) || !slices.Equal(cf.Config.Cmd, []string{"run"}) {
		t.Errorf("entrypoint %q cmd %q, want [/usr/local/bin/tapsync] [run]", cf.Config.Entrypoint, cf.Config.Cmd)
	}

	want := map[string]string{
		"org.opencontainers.image.title":   "tapsync",
		"org.opencontainers.image.source":  "https://github.com/tapsync/tapsync",
		"org.opencontainers.image.version": r.src.version,
		"org.opencontainers.image.created": created.Format(time.RFC3339),
	}
	if out, err := exec.Command("git", "-C", root, "rev-parse", "HEAD").Output(); err == nil {
		want["org.opencontainers.image.revision"] = strings.TrimSpace(string(out))
		describe, err := exec.Command("git", "-C", root, "describe", "--tags", "--always", "--dirty").Output()
		if err != nil {
			t.Fatal(err)
		}
		if v := strings.TrimSpace(string(describe)); r.src.version != v {
			t.Errorf("version %q, want git describe's %q", r.src.version, v)
		}
	}
	got := cf.Config.Labels
	if got["org.opencontainers.image.description"] == "" {
		t.Error("no org.opencontainers.image.description label")
	}
	want["org.opencontainers.image.description"] = got["org.opencontainers.image.description"]
	if !maps.Equal(got, want) {
		t.Errorf("labels %v\nwant %v", got, want)
	}
}

// checkLayer reads the one layer: exactly the two programs and their
// parent directories, root's, mode 0755, stamped created; the programs
// static and printing the version.
func checkLayer(t *testing.T, r result, img v1.Image, created time.Time) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("%d layers, want 1", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string][]byte{}
	var dirs []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Mode != 0o755 || h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(created) {
			t.Errorf("%s: mode %o uid %d gid %d mtime %v, want 755 0 0 %v", h.Name, h.Mode, h.Uid, h.Gid, h.ModTime, created)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			dirs = append(dirs, h.Name)
		case tar.TypeReg:
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = b
		default:
			t.Errorf("%s: type %c, want only files and their directories", h.Name, h.Typeflag)
		}
	}
	if got, want := slices.Sorted(maps.Keys(files)), []string{"usr/local/bin/tapsync", "usr/local/bin/tapsync-qemu"}; !slices.Equal(got, want) {
		t.Errorf("files %q, want %q", got, want)
	}
	if want := []string{"usr/", "usr/local/", "usr/local/bin/"}; !slices.Equal(dirs, want) {
		t.Errorf("directories %q, want %q", dirs, want)
	}
	for n, b := range files {
		f, err := elf.NewFile(bytes.NewReader(b))
		if err != nil {
			t.Errorf("%s: %v", n, err)
			continue
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s has an ELF interpreter: not static", n)
			}
		}
		if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
			t.Errorf("%s needs libraries %v (err %v)", n, libs, err)
		}
	}

	// The version reaches `tapsync version`.
	if runtime.GOOS != "linux" || (os.Getenv("GOARCH") != "" && os.Getenv("GOARCH") != runtime.GOARCH) {
		return
	}
	bin := filepath.Join(t.TempDir(), "tapsync")
	if err := os.WriteFile(bin, files["usr/local/bin/tapsync"], 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "version").Output()
	if got, want := strings.TrimSpace(string(out)), "tapsync "+r.src.version; err != nil || got != want {
		t.Errorf("tapsync version: %q (err %v), want %q", got, err, want)
	}
}

// checkArchive reads the tarball as crane push does (docker-archive's
// manifest.json) and as containerd's Import does (the OCI layout): both
// must see the printed digest, containerd under the printed tag.
func checkArchive(t *testing.T, r result) {
	t.Helper()
	img, err := tarball.ImageFromPath(r.archive, nil)
	if err != nil {
		t.Fatalf("read %s as crane does: %v", r.archive, err)
	}
	if h, err := img.Digest(); err != nil || h.String() != r.digest {
		t.Errorf("crane would push %v (err %v), printed %s", h, err, r.digest)
	}

	ctx := context.Background()
	store, err := local.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(r.archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	desc, err := archive.ImportIndex(ctx, store, f)
	if err != nil {
		t.Fatalf("containerd import: %v", err)
	}
	b, err := content.ReadBlob(ctx, store, desc)
	if err != nil {
		t.Fatal(err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatal(err)
	}
	if len(idx.Manifests) != 1 || idx.Manifests[0].Digest.String() != r.digest {
		t.Fatalf("containerd imported %+v, want one manifest %s", idx.Manifests, r.digest)
	}
	repo, tag, _ := strings.Cut(r.tag, ":")
	if got, want := idx.Manifests[0].Annotations[images.AnnotationImageName], "docker.io/"+repo+":"+tag; got != want {
		t.Errorf("containerd names the image %q, want %q", got, want)
	}
	ps, err := images.Platforms(ctx, store, idx.Manifests[0])
	if err != nil || len(ps) != 1 || ps[0].OS != "linux" {
		t.Errorf("containerd reads platforms %v (err %v), want one linux", ps, err)
	}
}

func fileSum(t *testing.T, file string) [sha256.Size]byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}
