package qmp

import (
	"bytes"
	"encoding/json"
	"os"
	"testing"
	"unicode/utf8"
)

// BenchmarkReadQtreeReply reads one reply to "info qtree" (a q35 VM's,
// 20 KB) as the reader and runInto do: the message, then its return.
// 2026-12-07: 510 µs, 150 KB, 24 allocations when the message was read
// whole, then decoded, and its return checked and decoded by
// encoding/json; 210 µs, 108 KB, 17 allocations decoded as read and the
// return unquoted without a second check (250 µs on the day's later,
// busier machine); 97–113 µs, 109 KB, 17 allocations with the reader's
// own framing (msgReader: brackets matched, strings skipped with
// IndexByte, the return kept raw) and unquoteJSON taking plain runs
// whole.
func BenchmarkReadQtreeReply(b *testing.B) {
	tree, err := os.ReadFile("testdata/qtree-q35.txt")
	if err != nil {
		b.Fatal(err)
	}
	msg, err := json.Marshal(map[string]any{"return": string(tree), "id": "7"})
	if err != nil {
		b.Fatal(err)
	}
	msg = append(msg, "\r\n"...)
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	for b.Loop() {
		m, err := newMsgReader(bytes.NewReader(msg), MaxMessage).next()
		if err != nil {
			b.Fatal(err)
		}
		s, ok := unquoteJSON(m.Return) // as runInto decodes a string
		if !ok || s != string(tree) {
			b.Fatalf("return of %d bytes (decoded: %v); want the %d of the tree", len(s), ok, len(tree))
		}
	}
}

// FuzzUnquote: unquoteJSON agrees with encoding/json on every JSON string it
// decodes, and declines nothing encoding/json would decode from QEMU's
// own escapes.
func FuzzUnquote(f *testing.F) {
	for _, s := range []string{`""`, `"a"`, `"a\nb\"c\\d\/e"`, `"\u00e9\ud83d\ude00"`, `"\ud83d"`, `"\t\b\f\r"`, `"x\u0000y"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var want string
		jerr := json.Unmarshal(b, &want)
		got, ok := unquoteJSON(b)
		if ok && (jerr != nil || got != want) {
			t.Fatalf("unquoteJSON(%q) = %q; encoding/json: %q, %v", b, got, want, jerr)
		}
		if !ok && jerr == nil && len(b) > 0 && b[0] == '"' && utf8.ValidString(want) && bytes.Equal(bytes.TrimSpace(b), b) {
			if enc, _ := json.Marshal(want); bytes.Equal(enc, b) {
				t.Fatalf("unquoteJSON declined %q, which encoding/json writes", b)
			}
		}
	})
}
