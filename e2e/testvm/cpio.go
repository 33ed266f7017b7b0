package testvm

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// cpioWriter writes the "newc" (SVR4, no CRC) cpio format, the only one the
// kernel unpacks into an initramfs (Documentation/driver-api/early-userspace/
// buffer-format.rst). Written here so that building the guest needs neither
// the cpio tool nor a fakeroot: ownership, device nodes and mtimes are
// whatever we put in the headers (root, fixed, zero), so the archive is
// reproducible byte for byte.
type cpioWriter struct {
	w      io.Writer
	n      int64  // bytes written so far, for the 4-byte padding
	ino    uint32 // next inode number; the kernel uses it only to spot hard links
	err    error  // first write error, sticky
	closed bool
}

// The mode bits the format stores (the same values as <sys/stat.h>).
const (
	cpioTypeDir     = 0o040000
	cpioTypeRegular = 0o100000
	cpioTypeSymlink = 0o120000
	cpioTypeCharDev = 0o020000
)

func newCPIOWriter(w io.Writer) *cpioWriter { return &cpioWriter{w: w, ino: 1} }

// Dir adds a directory. Parents must be added first: the kernel does not
// create missing parents when it unpacks.
func (c *cpioWriter) Dir(name string, perm fs.FileMode) error {
	return c.entry(name, cpioTypeDir|uint32(perm.Perm()), 2, 0, 0, nil)
}

// File adds a regular file with the given content.
func (c *cpioWriter) File(name string, perm fs.FileMode, data []byte) error {
	return c.entry(name, cpioTypeRegular|uint32(perm.Perm()), 1, 0, 0, data)
}

// Symlink adds a symbolic link; the target is stored as the entry's data.
func (c *cpioWriter) Symlink(name, target string) error {
	return c.entry(name, cpioTypeSymlink|0o777, 1, 0, 0, []byte(target))
}

// CharDev adds a character device node, e.g. dev/console (5, 1), which must
// exist before devtmpfs is mounted: the kernel opens it as init's stdio.
func (c *cpioWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return c.entry(name, cpioTypeCharDev|uint32(perm.Perm()), 1, major, minor, nil)
}

// Close writes the trailer entry. It does not close the underlying writer.
func (c *cpioWriter) Close() error {
	if c.closed {
		return c.err
	}
	c.closed = true
	// The trailer is an ordinary header named TRAILER!!! with inode 0.
	c.ino = 0
	return c.entry("TRAILER!!!", 0, 1, 0, 0, nil)
}

func (c *cpioWriter) entry(name string, mode, nlink, rmajor, rminor uint32, data []byte) error {
	if c.err != nil {
		return c.err
	}
	if c.closed && name != "TRAILER!!!" {
		return fmt.Errorf("cpio entry %q: archive already closed", name)
	}
	// Archive names are relative ("bin/sh"), as the kernel expects.
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" {
		return fmt.Errorf("cpio entry: empty name")
	}
	if uint64(len(data)) > 0xffffffff {
		return fmt.Errorf("cpio entry %q: %d bytes is too large for newc", name, len(data))
	}
	// 13 fields of 8 hex digits after the magic: ino, mode, uid, gid, nlink,
	// mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize
	// (including the NUL), check (0 for newc).
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.ino++
	c.write([]byte(hdr))
	c.write([]byte(name + "\x00"))
	c.pad()
	c.write(data)
	c.pad()
	if c.err != nil {
		return fmt.Errorf("cpio entry %q: %w", name, c.err)
	}
	return nil
}

// pad aligns the stream to 4 bytes, as newc requires after the name and
// after the data.
func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil || len(b) == 0 {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.err = err
}
