package reconcile

import (
	"bufio"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/e2e/testnet"
	"github.com/tapsync/tapsync/state"
)

// A monitor connection that dies under the teardown's reading (QEMU
// exiting while its reader has yet to hear) is no reason to wait: the
// teardown dials again, finds the socket gone, and ends the sandbox as
// one whose QEMU has exited.
func TestTeardownRedialsAfterConnectionDies(t *testing.T) {
	testnet.SkipUnlessRoot(t)
	ns := testnet.NewNS(t, "tapsync-teardown")
	// Not t.TempDir: its path can exceed a socket address's 108 bytes.
	dir, err := os.MkdirTemp("", "tstd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-ended })
	// A QEMU that greets, takes qmp_capabilities, and exits at the next
	// command: its socket goes, then the connection.
	go func() {
		defer close(ended)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.WriteString(c, `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}`+"\r\n")
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if strings.Contains(line, "qmp_capabilities") {
				io.WriteString(c, `{"return": {}, "id": "0"}`+"\r\n")
				continue
			}
			ln.Close() // removes the socket file
			return
		}
	}()
	store, err := state.Open(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	r := New(store)
	defer r.Close()
	if _, err := r.Register(Sandbox{ID: "sb", Netns: ns.Path, QMP: sock}, SourceConfig); err != nil {
		t.Fatal(err)
	}
	if err := r.Teardown(context.Background(), "sb"); err != nil {
		t.Fatalf("teardown after QEMU exited under its reading: %v", err)
	}
	if _, _, known := r.Registered("sb"); known {
		t.Error("the sandbox is still registered after its teardown")
	}
}
