package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// msgReader reads QMP messages off a monitor stream, each at most max
// bytes (ErrMessageTooLarge past that: the stream is then useless).
//
// It frames a message by its brackets, matched as they come, skipping
// strings with IndexByte, and decodes the object's members itself: every member but "return" with
// encoding/json, which checks it, and "return" kept as it came. A string
// return (an HMP command's text: a 20–140 KB "info qtree") is then read
// once here and once by unquoteJSON, which declines what is not a JSON
// string (its caller then gets encoding/json's error); any other return is
// checked here. json.Decoder scanned such a reply twice through its state
// machine before unquoteJSON saw it, and that was most of what reading a
// VM at start cost the daemon.
//
// Messages need not be one per line (QEMU's pretty mode spans lines), and
// what separates them is JSON whitespace. Members' names are matched as
// QEMU writes them, case and all.
type msgReader struct {
	r   io.Reader
	max int
	buf []byte // buf[off:] is read and not yet returned
	off int
	err error // the read error that ends the stream, once buf is used up
	// fr is how far the message at buf[off:] has been framed, so that a
	// message that comes in many reads is looked at once.
	fr framer
}

func newMsgReader(r io.Reader, max int) *msgReader {
	return &msgReader{r: r, max: max}
}

// shrinkAfter is the message size past which the reader lets its grown
// buffer go (see msgReader): one HMP "info qtree" reply (20–140 KB) must
// not stay allocated in every connection, a sandbox's idle connection
// holding it for good.
const shrinkAfter = 8 << 10

// readerBuf is the buffer a msgReader starts with, and returns to after
// a message of more than shrinkAfter bytes: a connection that read one
// "info qtree" reply must not hold its buffer for good. Replies and events
// are a few hundred bytes; every sandbox's connection holds one.
const readerBuf = 1 << 10

// next returns the next message.
func (mr *msgReader) next() (message, error) {
	open := mr.fr.open[:0]
	if cap(open) > 64 {
		open = nil // a deeply nested message's stack goes with it
	}
	mr.fr = framer{open: open}
	for {
		b := mr.buf[mr.off:]
		if mr.fr.start == 0 {
			// Whitespace before the message stays in the buffer (it counts
			// toward max) but is looked at once, however it trickles in.
			i := skipSpace(b, mr.fr.pos)
			mr.fr.pos = i
			if i < len(b) {
				if b[i] != '{' {
					return message{}, fmt.Errorf("not a QMP message: starts with %q", b[i])
				}
				mr.fr = framer{start: i + 1, pos: i + 1, open: append(mr.fr.open[:0], '}')}
			}
		}
		if mr.fr.start > 0 {
			end, err := mr.fr.scan(b)
			if err != nil {
				return message{}, fmt.Errorf("not a QMP message: %w", err)
			}
			if end > 0 {
				m, err := decodeMessage(b[mr.fr.start-1 : end])
				mr.off += end
				mr.shrink(end)
				return m, err
			}
		}
		if err := mr.fill(); err != nil {
			if errors.Is(err, io.EOF) && mr.fr.start > 0 {
				err = io.ErrUnexpectedEOF
			}
			return message{}, err
		}
	}
}

// maxDepth bounds how deeply a message nests, as encoding/json's does
// (which would refuse a member nested deeper anyway): the framer's stack
// of open brackets stays small whatever a QEMU sends.
const maxDepth = 10000

// framer finds where an object ends, over as many reads as it takes.
// Offsets are from the start of the unread bytes (msgReader.off).
type framer struct {
	start int // just past the object's '{'; 0: not found yet
	pos   int // the next byte to look at
	// open holds the closing bracket each bracket open at pos wants, the
	// innermost last: a message whose brackets do not match fails where
	// they stop matching, not at the cap, nor by swallowing the next.
	open []byte
	// str is where the string pos is in began (just past its opening
	// quote, or past a quote escaped in it); 0: pos is in no string.
	str int
}

// scan goes on from f.pos to the end of b; it returns the index just past
// the object's closing bracket, or 0 when b ends first. Strings are
// skipped whole, their contents left to the member's decoding.
func (f *framer) scan(b []byte) (int, error) {
	i := f.pos
	for i < len(b) {
		if f.str > 0 {
			q := quoteAt(b, f.str, i)
			if q < 0 {
				f.pos = len(b)
				return 0, nil
			}
			i, f.str = q+1, 0
			continue
		}
		switch c := b[i]; c {
		case '"':
			f.str = i + 1
		case '{', '[':
			if len(f.open) == maxDepth {
				return 0, fmt.Errorf("nested deeper than %d", maxDepth)
			}
			f.open = append(f.open, c+2) // '}' and ']' follow their openers by two

		case '}', ']':
			if want := f.open[len(f.open)-1]; c != want {
				return 0, fmt.Errorf("%q where %q closes", c, want)
			}
			if f.open = f.open[:len(f.open)-1]; len(f.open) == 0 {
				return i + 1, nil
			}
		}
		i++
	}
	f.pos = i
	return 0, nil
}

// quoteAt returns the index of the quote that ends the string whose
// contents start at b[from] (a string's first byte, or the one after a
// quote escaped in it), looking from b[i] on; -1 when b ends first. A
// quote ends the string when an even number of backslashes come before
// it, back to from: the bytes between are searched with IndexByte, not
// one by one (an "info qtree" reply is a 20–140 KB string).
func quoteAt(b []byte, from, i int) int {
	for {
		j := bytes.IndexByte(b[i:], '"')
		if j < 0 {
			return -1
		}
		q := i + j
		k := q
		for k > from && b[k-1] == '\\' {
			k--
		}
		if (q-k)%2 == 0 {
			return q
		}
		i = q + 1
	}
}

// fill moves the unread bytes to the front of the buffer, growing it when
// they leave little room, and reads more after them.
func (mr *msgReader) fill() error {
	if mr.err != nil {
		return mr.err
	}
	held := len(mr.buf) - mr.off
	if held >= mr.max {
		return ErrMessageTooLarge // full, and no message ends in it
	}
	if cap(mr.buf)-held < readerBuf/2 && cap(mr.buf) < mr.max {
		nb := make([]byte, held, min(max(readerBuf, 2*cap(mr.buf)), mr.max))
		copy(nb, mr.buf[mr.off:])
		mr.buf = nb
	} else {
		mr.buf = mr.buf[:copy(mr.buf, mr.buf[mr.off:])]
	}
	mr.off = 0
	n, err := mr.r.Read(mr.buf[held:min(cap(mr.buf), mr.max)])
	mr.buf = mr.buf[:held+n]
	if err != nil {
		mr.err = err
		if n > 0 {
			return nil // the bytes first; the error once they are used up
		}
		return err
	}
	return nil
}

// shrink drops a buffer grown past readerBuf for a message of n bytes
// (more than shrinkAfter), keeping what was read after it.
func (mr *msgReader) shrink(n int) {
	if n <= shrinkAfter || cap(mr.buf) <= readerBuf {
		return
	}
	rest := mr.buf[mr.off:]
	nb := make([]byte, len(rest), max(readerBuf, len(rest)))
	copy(nb, rest)
	mr.buf, mr.off = nb, 0
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// skipSpace returns the index of the first byte at or after i that is
// not JSON whitespace.
func skipSpace(b []byte, i int) int {
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// errIncomplete says a value runs past the bytes at hand.
var errIncomplete = errors.New("value incomplete")

// stringEnd returns the index just past the JSON string that starts at
// b[i] (a quote); errIncomplete when b ends first. Its contents are not
// checked: encoding/json or unquoteJSON does that as it decodes them.
func stringEnd(b []byte, i int) (int, error) {
	q := quoteAt(b, i+1, i+1)
	if q < 0 {
		return 0, errIncomplete
	}
	return q + 1, nil
}

// valueEnd returns the index just past the JSON value that starts at
// b[i]: a string, an object or array (brackets counted, not matched: a
// mismatch is left to encoding/json's check of the member), or a scalar
// (up to the next delimiter); errIncomplete when b ends first.
func valueEnd(b []byte, i int) (int, error) {
	if i >= len(b) {
		return 0, errIncomplete
	}
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				end, err := stringEnd(b, i)
				if err != nil {
					return 0, err
				}
				i = end
				continue
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1, nil
				}
			}
			i++
		}
		return 0, errIncomplete
	}
	for j := i; j < len(b); j++ {
		switch c := b[j]; {
		case c == ',' || c == '}' || c == ']' || isSpace(c):
			if j == i {
				return 0, fmt.Errorf("unexpected %q", c)
			}
			return j, nil
		case c == '"' || c == '{' || c == '[' || c == ':':
			return 0, fmt.Errorf("unexpected %q after %q", c, b[i:j])
		}
	}
	return 0, errIncomplete
}

// decodeMessage decodes one framed QMP object, member by member.
func decodeMessage(obj []byte) (message, error) {
	var m message
	i := skipSpace(obj, 1)
	if i < len(obj) && obj[i] == '}' {
		return m, nil
	}
	for {
		if i >= len(obj) || obj[i] != '"' {
			return message{}, errors.New("not a QMP message: a member's name expected")
		}
		kend, err := stringEnd(obj, i)
		if err != nil {
			return message{}, fmt.Errorf("not a QMP message: %w", err)
		}
		name := string(obj[i+1 : kend-1])
		if strings.IndexByte(name, '\\') >= 0 || strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 }) {
			if err := json.Unmarshal(obj[i:kend], &name); err != nil {
				return message{}, fmt.Errorf("not a QMP message: member name: %w", err)
			}
		}
		i = skipSpace(obj, kend)
		if i >= len(obj) || obj[i] != ':' {
			return message{}, fmt.Errorf("not a QMP message: no ':' after %q", name)
		}
		i = skipSpace(obj, i+1)
		vend, err := valueEnd(obj, i)
		if err != nil {
			return message{}, fmt.Errorf("not a QMP message: member %q: %w", name, err)
		}
		if err := m.set(name, obj[i:vend]); err != nil {
			return message{}, fmt.Errorf("not a QMP message: member %q: %w", name, err)
		}
		i = skipSpace(obj, vend)
		if i < len(obj) && obj[i] == ',' {
			i = skipSpace(obj, i+1)
			continue
		}
		if i == len(obj)-1 && obj[i] == '}' {
			return m, nil
		}
		return message{}, fmt.Errorf("not a QMP message: %q after member %q", obj[i:min(i+1, len(obj))], name)
	}
}

// set decodes the member name of a message, whose value is v, as
// encoding/json would into m (a member named twice is decoded twice, into
// what the first left); what is kept is a copy: v is the reader's buffer.
func (m *message) set(name string, v []byte) error {
	switch name {
	case "return":
		if v[0] != '"' && !json.Valid(v) {
			return errors.New("invalid JSON")
		}
		m.Return = append(json.RawMessage(nil), v...)
		return nil
	case "id":
		if !json.Valid(v) {
			return errors.New("invalid JSON")
		}
		m.ID = append(json.RawMessage(nil), v...)
		return nil
	case "QMP":
		return json.Unmarshal(v, &m.QMP)
	case "error":
		return json.Unmarshal(v, &m.Error)
	case "event":
		return json.Unmarshal(v, &m.Event)
	case "data":
		return json.Unmarshal(v, &m.Data)
	case "timestamp":
		return json.Unmarshal(v, &m.Timestamp)
	}
	if !json.Valid(v) {
		return errors.New("invalid JSON")
	}
	return nil
}
