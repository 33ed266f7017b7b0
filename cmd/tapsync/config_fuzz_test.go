package main

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzConfig feeds arbitrary TOML to LoadConfig and Validate: neither
// panics, and a config that loads validates the same way twice (Validate
// only reads).
func FuzzConfig(f *testing.F) {
	example, err := os.ReadFile("../../deploy/config.toml")
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range []string{
		string(example),
		"",
		"netns_dir = \"relative\"\nworkers = 0\nresync_interval = \"1ms\"\n",
		"resync_interval = \"often\"\n",
		"[defaults]\nqueues = -1\nvhost = \"maybe\"\nqmp_timeout = \"2h\"\n",
		"[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\nqueues = 2\nagent_url = \"vsock://3:1024\"\n" +
			"[[sandbox]]\nid = \"a\"\nnetns = \"/var/run/netns/a\"\nqmp = \"/run/a.sock\"\n",
		"[[sandbox]]\nid = \"../x\"\nnetns = \"/etc/x\"\nqmp = \"x\"\nmodel = \"macvtap\"\nagent_url = \"hvsock://:\"\n",
		"[containerd]\nenabled = true\nnamespaces = []\nqmp_socket = \"/run/{id\"\nagent_url = \"kata-shim://{id}\"\n",
		"[guest]\nagent = \"other\"\ntimeout = \"-1s\"\n",
		"unknown = 1\n[defaults]\nmodel = 3\n",
		"[[sandbox]]\n[[sandbox]]\n[sandbox]\n",
		"workers = 99999999999999999999\n",
	} {
		f.Add(seed)
	}
	// One file, rewritten each run: a fuzz worker runs its inputs one
	// after another.
	p := filepath.Join(f.TempDir(), "config.toml")
	f.Fuzz(func(t *testing.T, body string) {
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(p, false)
		if err != nil {
			return
		}
		first := cfg.Validate()
		second := cfg.Validate()
		if (first == nil) != (second == nil) || (first != nil && first.Error() != second.Error()) {
			t.Fatalf("Validate is not repeatable: %v, then %v", first, second)
		}
	})
}
