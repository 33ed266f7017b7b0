package qmp

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// nextOver runs the reader's next on what a QEMU that then falls silent
// sent, and fails the test if next reads again, waiting for more.
func nextOver(t *testing.T, sent string, max int) error {
	t.Helper()
	_, err := newMsgReader(io.MultiReader(strings.NewReader(sent), silent{t, sent}), max).next()
	return err
}

// silent is a QEMU that has sent everything it will: a read of it fails
// the test.
type silent struct {
	t    *testing.T
	sent string
}

func (s silent) Read([]byte) (int, error) {
	s.t.Errorf("next over %.40q… read again, waiting for more", s.sent)
	return 0, errors.New("nothing more comes")
}

// A message whose brackets stop matching fails there: the reader does not
// wait for the object to close nor take the next message into it.
func TestReaderMismatchedBracketFailsAtOnce(t *testing.T) {
	err := nextOver(t, `{"return": {"a": [1}, "id": "1"}`+"\r\n"+`{"return": {}, "id": "2"}`+"\r\n", MaxMessage)
	if err == nil || !strings.Contains(err.Error(), "not a QMP message") {
		t.Fatalf("next = %v, want a malformed message", err)
	}
}

// A full buffer with no message's end in it is ErrMessageTooLarge at
// once, not after a read that a silent QEMU never answers.
func TestReaderFullBufferIsTooLarge(t *testing.T) {
	const max = 4 << 10
	start := `{"return": "`
	err := nextOver(t, start+strings.Repeat("x", max-len(start)), max) // exactly max
	if !errors.Is(err, ErrMessageTooLarge) {
		t.Fatalf("next = %v, want ErrMessageTooLarge", err)
	}
}

// A message nested past maxDepth fails where it does: the framer's stack
// of open brackets does not grow with whatever a QEMU sends.
func TestReaderDeepNestingFails(t *testing.T) {
	err := nextOver(t, `{"return": `+strings.Repeat("[", maxDepth+1), MaxMessage)
	if err == nil || !strings.Contains(err.Error(), "nested deeper") {
		t.Fatalf("next = %v, want a message nested too deep", err)
	}
}

// A buffer grown for a large message goes with it; what was read after
// the message stays, in order.
func TestReaderLetsGrownBufferGo(t *testing.T) {
	big := `{"return": "` + strings.Repeat("x", 3*shrinkAfter) + `", "id": "1"}`
	mr := newMsgReader(strings.NewReader(big+`{"event": "E", "data": {}}{"return": {}, "id": "2"}`), MaxMessage)
	if m, err := mr.next(); err != nil || len(m.Return) != 3*shrinkAfter+2 {
		t.Fatalf("big message: %d bytes of return, %v", len(m.Return), err)
	}
	if c := cap(mr.buf); c > readerBuf {
		t.Errorf("buffer of %d bytes kept after the big message, want at most %d", c, readerBuf)
	}
	if m, err := mr.next(); err != nil || m.Event != "E" {
		t.Fatalf("after the big message: %+v, %v; want event E", m, err)
	}
	if m, err := mr.next(); err != nil || string(m.ID) != `"2"` {
		t.Fatalf("then: %+v, %v; want reply 2", m, err)
	}
}
