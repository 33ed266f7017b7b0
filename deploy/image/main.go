// Command image builds tapsync's container image without Docker: one layer
// holding the static tapsync and tapsync-qemu, written as an OCI image
// layout and as a tarball that containerd imports and crane pushes. One
// commit gives one image digest. It never pushes, loads or runs the image.
//
//	go run ./deploy/image -out bin
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	var o options
	flag.StringVar(&o.outDir, "out", "bin", "directory that receives image/ (OCI layout), tapsync-image.tar and, with -daemonset, daemonset.yaml")
	flag.StringVar(&o.repo, "repo", defaultRepo, "image repository the tag names")
	flag.StringVar(&o.version, "version", "", `version for "tapsync version" and the tag (default: git describe --tags --always --dirty, else "dev")`)
	flag.StringVar(&o.licenses, "licenses", "", "SPDX expression for the org.opencontainers.image.licenses label (omitted when empty)")
	flag.StringVar(&o.daemonset, "daemonset", "", "a DaemonSet manifest to write again into -out with its tapsync images set to the tag built")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "image: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dir, err := moduleDir(ctx, "")
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	o.moduleDir = dir
	r, err := build(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Printf("tag       %s\n", r.tag)
	fmt.Printf("digest    %s\n", r.digest)
	fmt.Printf("source    %s at %s\n", orNone(r.src.revision), r.src.created.Format(time.RFC3339))
	fmt.Printf("layout    %s\n", r.layoutDir)
	fmt.Printf("archive   %s (%s)\n", r.archive, mib(r.archiveSize))
	fmt.Printf("layer     %s compressed, %s uncompressed\n", mib(r.layerSize), mib(r.layerUncompressed))
	if r.daemonset != "" {
		fmt.Printf("daemonset %s\n", r.daemonset)
	}
}

func orNone(revision string) string {
	if revision == "" {
		return "(no git commit)"
	}
	return revision
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
