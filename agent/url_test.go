package agent

import (
	"strings"
	"testing"
)

func TestParseURL(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want URL
	}{
		{"vsock://1234:1024", URL{Scheme: "vsock", CID: 1234, Port: 1024}},
		{"vsock://3:1", URL{Scheme: "vsock", CID: 3, Port: 1}},
		{"hvsock:///run/vc/firecracker/x/root/kata.hvsock:1024", URL{Scheme: "hvsock", Path: "/run/vc/firecracker/x/root/kata.hvsock", Port: 1024}},
		{"hvsock:///odd:name.sock:2", URL{Scheme: "hvsock", Path: "/odd:name.sock", Port: 2}},
		{"unix:///run/agent.sock", URL{Scheme: "unix", Path: "/run/agent.sock"}},
		{"kata-shim:///run/vc/sbs/abc/shim-monitor.sock", URL{Scheme: "kata-shim", Path: "/run/vc/sbs/abc/shim-monitor.sock"}},
	} {
		got, err := ParseURL(tc.in)
		if err != nil {
			t.Errorf("ParseURL(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseURL(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if s := got.String(); s != tc.in {
			t.Errorf("ParseURL(%q).String() = %q", tc.in, s)
		}
	}
}

func TestParseURLErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "no scheme"},
		{"/run/agent.sock", "no scheme"},
		{"tcp://1.2.3.4:1024", `unknown scheme "tcp"`},
		{"vsock://1234", "missing port"},
		{"vsock://1234:", "missing port"},
		{"vsock://x:1024", `bad CID "x"`},
		{"vsock://-1:1024", "bad CID"},
		{"vsock://4294967296:1024", "bad CID"},
		{"vsock://2:1024", "CID 2 is not a guest's"},
		{"vsock://4294967295:1024", "not a guest's"},
		{"vsock://5:70000000000", `bad port "70000000000"`},
		{"hvsock:///run/kata.hvsock", "missing port"},
		{"hvsock://:1024", "missing socket path"},
		{"hvsock:///run/kata.hvsock:p", `bad port "p"`},
		{"unix://", "missing socket path"},
		{"kata-shim://", "missing socket path"},
	} {
		_, err := ParseURL(tc.in)
		if err == nil {
			t.Errorf("ParseURL(%q) accepted", tc.in)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.in) {
			t.Errorf("ParseURL(%q): error %q does not say %q and name the URL", tc.in, err, tc.want)
		}
	}
}
