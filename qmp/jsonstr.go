package qmp

import (
	"bytes"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// unquoteJSON decodes a JSON string, checking it as it goes: a string
// return the reader kept as it came (msgReader), such as the reply to
// "info qtree" (20–140 KB, every line an escaped newline), which
// json.Unmarshal would scan once to check and again to decode. ok is false
// for anything but a plain string with the escapes JSON has (a bare quote
// or control character, an unknown escape, invalid UTF-8); the caller
// then decodes it with encoding/json, which says what is wrong.
func unquoteJSON(b []byte) (string, bool) {
	if len(b) < 2 || b[0] != '"' || b[len(b)-1] != '"' {
		return "", false
	}
	b = b[1 : len(b)-1]
	var sb strings.Builder
	sb.Grow(len(b))
	for len(b) > 0 {
		// Up to the next escape in one piece: a qtree's lines are long
		// runs of plain text between escaped newlines.
		i := bytes.IndexByte(b, '\\')
		if i < 0 {
			i = len(b)
		}
		for _, c := range b[:i] {
			if c < 0x20 || c == '"' {
				return "", false // a bare quote or control character: not JSON
			}
		}
		sb.Write(b[:i])
		if b = b[i:]; len(b) == 0 {
			break
		}
		if len(b) < 2 {
			return "", false
		}
		switch c := b[1]; c {
		case '"', '\\', '/':
			sb.WriteByte(c)
		case 'b':
			sb.WriteByte('\b')
		case 'f':
			sb.WriteByte('\f')
		case 'n':
			sb.WriteByte('\n')
		case 'r':
			sb.WriteByte('\r')
		case 't':
			sb.WriteByte('\t')
		case 'u':
			r, n := unicodeEscape(b)
			if n == 0 {
				return "", false
			}
			sb.WriteRune(r)
			b = b[n:]
			continue
		default:
			return "", false
		}
		b = b[2:]
	}
	if !utf8.ValidString(sb.String()) {
		return "", false // encoding/json replaces invalid bytes: let it
	}
	return sb.String(), true
}

// unicodeEscape decodes the \uXXXX escape (with its low surrogate, if it
// is a high one) at the start of b, as encoding/json does: a lone
// surrogate is U+FFFD. n is the bytes used, 0 for a malformed escape.
func unicodeEscape(b []byte) (rune, int) {
	hex4 := func(b []byte) (rune, bool) {
		if len(b) < 6 || b[0] != '\\' || b[1] != 'u' {
			return 0, false
		}
		v, err := strconv.ParseUint(string(b[2:6]), 16, 16)
		return rune(v), err == nil
	}
	r, ok := hex4(b)
	if !ok {
		return 0, 0
	}
	if !utf16.IsSurrogate(r) {
		return r, 6
	}
	if r2, ok := hex4(b[6:]); ok {
		if dec := utf16.DecodeRune(r, r2); dec != utf8.RuneError {
			return dec, 12
		}
	}
	return utf8.RuneError, 6
}
