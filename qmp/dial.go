package qmp

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// maxSunPath is the longest socket path connect(2) takes: sun_path's 108
// bytes less the terminating NUL.
const maxSunPath = len(unix.RawSockaddrUnix{}.Path) - 1

// dialUnix connects to the unix socket at path. A path too long for
// sun_path (a Kata bundle dir is ~117 bytes before the socket's own name)
// is reached through its directory: the directory is opened with O_PATH
// and the socket connected to as /proc/self/fd/<dirfd>/<name>; the
// directory's fd is closed once connected.
func dialUnix(ctx context.Context, path string) (*net.UnixConn, error) {
	addr := path
	if len(path) > maxSunPath {
		dir, name := filepath.Split(path)
		if dir == "" {
			dir = "."
		}
		if name == "" {
			return nil, fmt.Errorf("socket path %q names a directory", path)
		}
		// Equivalent to: exec {dirfd}</path/to/dir; connect /proc/self/fd/$dirfd/name
		fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &os.PathError{Op: "open", Path: dir, Err: err}
		}
		defer unix.Close(fd)
		addr = "/proc/self/fd/" + strconv.Itoa(fd) + "/" + name
		if len(addr) > maxSunPath {
			return nil, fmt.Errorf("socket name %q is too long for a unix socket address even without its directory (%d bytes, at most %d)", name, len(addr), maxSunPath)
		}
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", addr)
	if err != nil {
		return nil, err
	}
	return nc.(*net.UnixConn), nil
}
