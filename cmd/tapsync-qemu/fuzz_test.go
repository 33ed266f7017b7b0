package main

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/tapsync/tapsync/state"
)

// FuzzWrapperArgv plans any command line (arguments separated by NUL, which
// no real argument holds). The arguments come back unchanged, or with
// exactly "-qmp unix:<dir>/<valid id>.sock,server=on,wait=off" appended and
// no stderr line; a stderr line is one line starting with warnPrefix.
func FuzzWrapperArgv(f *testing.F) {
	join := func(a []string) string { return strings.Join(a, "\x00") }
	for _, seed := range [][]string{
		goRuntimeArgs(hexID, "sandbox-"+hexID+",debug-threads=on"),
		rustRuntimeArgs("abc"),
		{"-name", "guest=sandbox-abc,process=q"},
		{"-name", "sandbox-a,,b"},
		{"-name", "sandbox-abc", "-machine", "help"},
		{"-name", "sandbox-abc", "-name", "sandbox-abc"},
		append([]string{"-name", "sandbox-abc"}, ours("abc")...),
		{"-append", "-name", "sandbox-abc"},
		{"--version"},
	} {
		f.Add(join(seed), true)
	}
	f.Fuzz(func(t *testing.T, joined string, fsOK bool) {
		args := strings.Split(joined, "\x00")
		in := slices.Clone(args)
		out, line := planArgs(args, testSettings, func(dir, sock string) error {
			if fsOK {
				return nil
			}
			return errors.New("socket dir " + dir + ": is a symlink")
		})
		if !slices.Equal(args, in) {
			t.Fatalf("input changed")
		}
		if line != "" && (!strings.HasPrefix(line, warnPrefix) || strings.ContainsAny(line, "\n\r\x00")) {
			t.Fatalf("bad line %q", line)
		}
		if slices.Equal(out, in) {
			return
		}
		if line != "" || len(out) != len(in)+2 || !slices.Equal(out[:len(in)], in) || out[len(in)] != "-qmp" {
			t.Fatalf("args %q → %q, line %q", in, out, line)
		}
		rest, ok := strings.CutPrefix(out[len(in)+1], "unix:"+testSettings.dir+"/")
		id, ok2 := strings.CutSuffix(rest, ".sock,server=on,wait=off")
		if !ok || !ok2 || !validID(id) || state.ValidID(id) != nil || !fsOK {
			t.Fatalf("added %q", out[len(in):])
		}
		if again, _ := planArgs(out, testSettings, func(string, string) error { return nil }); !slices.Equal(again, out) {
			t.Fatalf("added twice: %q", again)
		}
	})
}
