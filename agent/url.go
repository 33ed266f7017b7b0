package agent

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// URL says where an agent listens.
//
//	vsock://CID:PORT        AF_VSOCK (QEMU's vhost-vsock)
//	hvsock://PATH:PORT      hybrid vsock: a unix socket PATH, then "CONNECT PORT\n" (cloud-hypervisor, firecracker)
//	unix://PATH             a unix stream socket (a virtio-serial port exposed by QEMU)
//	kata-shim://PATH        ask the Kata shim's monitor socket PATH for the agent URL (GET /agent-url)
type URL struct {
	Scheme, Path string
	CID, Port    uint32
}

// Schemes ParseURL accepts.
const (
	SchemeVsock    = "vsock"
	SchemeHvsock   = "hvsock"
	SchemeUnix     = "unix"
	SchemeKataShim = "kata-shim"
)

// minGuestCID is the lowest CID a guest can have: 0 is the hypervisor, 1
// local loopback, 2 the host.
const minGuestCID = 3

// ParseURL parses an agent URL; the error names the URL and what is wrong.
func ParseURL(s string) (URL, error) {
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return URL{}, fmt.Errorf("agent url %q: no scheme (want vsock://, hvsock://, unix:// or kata-shim://)", s)
	}
	u := URL{Scheme: scheme}
	switch scheme {
	case SchemeVsock:
		cid, port, ok := strings.Cut(rest, ":")
		if !ok || port == "" {
			return URL{}, fmt.Errorf("agent url %q: missing port (want vsock://CID:PORT)", s)
		}
		c, err := strconv.ParseUint(cid, 10, 32)
		if err != nil {
			return URL{}, fmt.Errorf("agent url %q: bad CID %q", s, cid)
		}
		if c < minGuestCID || c == math.MaxUint32 {
			return URL{}, fmt.Errorf("agent url %q: CID %d is not a guest's", s, c)
		}
		u.CID = uint32(c)
		if u.Port, err = parsePort(port); err != nil {
			return URL{}, fmt.Errorf("agent url %q: %w", s, err)
		}
	case SchemeHvsock:
		i := strings.LastIndexByte(rest, ':')
		if i < 0 || i == len(rest)-1 {
			return URL{}, fmt.Errorf("agent url %q: missing port (want hvsock://PATH:PORT)", s)
		}
		u.Path = rest[:i]
		var err error
		if u.Port, err = parsePort(rest[i+1:]); err != nil {
			return URL{}, fmt.Errorf("agent url %q: %w", s, err)
		}
	case SchemeUnix, SchemeKataShim:
		u.Path = rest
	default:
		return URL{}, fmt.Errorf("agent url %q: unknown scheme %q (want vsock, hvsock, unix or kata-shim)", s, scheme)
	}
	if (scheme != SchemeVsock) && u.Path == "" {
		return URL{}, fmt.Errorf("agent url %q: missing socket path", s)
	}
	return u, nil
}

func parsePort(s string) (uint32, error) {
	p, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("bad port %q", s)
	}
	return uint32(p), nil
}

// String is the URL as ParseURL reads it.
func (u URL) String() string {
	switch u.Scheme {
	case SchemeVsock:
		return fmt.Sprintf("vsock://%d:%d", u.CID, u.Port)
	case SchemeHvsock:
		return fmt.Sprintf("hvsock://%s:%d", u.Path, u.Port)
	case "":
		return ""
	default:
		return u.Scheme + "://" + u.Path
	}
}
