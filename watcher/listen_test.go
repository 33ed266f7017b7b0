package watcher

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tapsync/tapsync/datapath"
	"github.com/tapsync/tapsync/e2e/testnet"
	"golang.org/x/sys/unix"
)

// datagram is one receive from a listenSocket.
type datagram struct {
	msgs []syscall.NetlinkMessage
	nsid int32
}

// receiveUntil reads s until match accepts a datagram or the deadline
// passes; it returns every datagram read.
func receiveUntil(t *testing.T, s *listenSocket, what string, match func(datagram) bool) []datagram {
	t.Helper()
	buf, oob := make([]byte, 64<<10), make([]byte, 64)
	var seen []datagram
	deadline := time.Now().Add(10 * time.Second)
	s.f.SetReadDeadline(deadline)
	defer s.f.SetReadDeadline(time.Time{})
	for {
		msgs, nsid, err := s.receive(buf, oob)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("timed out waiting for %s; read %d datagrams: %s", what, len(seen), describeDatagrams(seen))
		}
		if err != nil {
			t.Fatalf("receive: %v", err)
		}
		d := datagram{nsid: nsid}
		for _, m := range msgs {
			// Copies: the next receive reuses buf.
			d.msgs = append(d.msgs, syscall.NetlinkMessage{Header: m.Header, Data: append([]byte(nil), m.Data...)})
		}
		seen = append(seen, d)
		if match(d) {
			return seen
		}
	}
}

func describeDatagrams(ds []datagram) string {
	var b strings.Builder
	for _, d := range ds {
		for _, m := range d.msgs {
			why, _ := describeMessage(m)
			fmt.Fprintf(&b, "\n  nsid %d: type %d %s", d.nsid, m.Header.Type, why)
		}
	}
	return b.String()
}

func randHex() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func nsFd(t *testing.T, path string) int {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// TestListenAllNsid checks the kernel facts the NetlinkWatcher rests on,
// with a throwaway netns standing in for the daemon's own (home):
//   - a NETLINK_LISTEN_ALL_NSID socket in home hears a netns once it has
//     an nsid in home, and each such datagram carries that nsid;
//   - a netns without an nsid in home is not heard at all;
//   - when a netns with an nsid dies, RTM_DELNSID for that nsid arrives,
//     from home itself (no nsid control message).
func TestListenAllNsid(t *testing.T) {
	home := testnet.NewNS(t, "tsh")
	unheard := testnet.NewNS(t, "tsu")
	// Deleted by the test itself, so not by testnet.
	heard := testnet.NS{Name: "tsn-" + randHex()}
	heard.Path = "/var/run/netns/" + heard.Name
	testnet.IP(t, "netns", "add", heard.Name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", heard.Name).Run() })

	s, err := openListenSocket(home.Path, append(netlinkGroups, unix.RTNLGRP_NSID), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)

	fd := nsFd(t, heard.Path)
	h, err := datapath.OpenNsidSocket(home.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if id, err := h.Nsid(fd, false); err != nil || id != noNsid {
		t.Fatalf("Nsid of a netns given none = %d, %v; want %d", id, err, noNsid)
	}
	id, err := h.Nsid(fd, true)
	if err != nil || id < 0 {
		t.Fatalf("Nsid assigning = %d, %v; want one", id, err)
	}
	again, err := h.Nsid(fd, true)
	if err != nil || again != id {
		t.Fatalf("second Nsid = %d, %v; want the same nsid %d", again, err, id)
	}
	t.Logf("nsid of %s in %s: %d", heard.Name, home.Name, id)

	testnet.IP(t, "-n", unheard.Name, "link", "add", "u0", "type", "bridge")
	testnet.IP(t, "-n", heard.Name, "link", "add", "h0", "type", "bridge")
	seen := receiveUntil(t, s, "RTM_NEWLINK h0", func(d datagram) bool {
		for _, m := range d.msgs {
			if why, _ := describeMessage(m); why == "link h0 changed" {
				if d.nsid != id {
					t.Errorf("datagram for h0 carries nsid %d, want %d", d.nsid, id)
				}
				return true
			}
		}
		return false
	})
	for _, d := range seen {
		for _, m := range d.msgs {
			if why, _ := describeMessage(m); strings.Contains(why, "u0") {
				t.Errorf("heard %q from a netns without an nsid in home (nsid %d)", why, d.nsid)
			}
		}
	}

	// `ip netns del` unmounts the last reference: the netns dies, and
	// home forgets its nsid.
	unix.Close(fd)
	if out, err := exec.Command("ip", "netns", "del", heard.Name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v: %s", err, out)
	}
	receiveUntil(t, s, "RTM_DELNSID", func(d datagram) bool {
		for _, m := range d.msgs {
			if m.Header.Type != unix.RTM_DELNSID {
				continue
			}
			if n, ok := nsidAttr(m); ok && n == id {
				if d.nsid != noNsid {
					t.Errorf("RTM_DELNSID came with nsid control message %d, want none (from home)", d.nsid)
				}
				return true
			}
		}
		return false
	})
}
