package qmp

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// nextOver runs the reader's next on what a QEMU that then falls silent
// (the write end of a pipe left open) sent, and fails the test if next
// waits for more.
func nextOver(t *testing.T, sent string, max int) error {
	t.Helper()
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	go pw.Write([]byte(sent))
	done := make(chan error, 1)
	go func() {
		_, err := newMsgReader(pr, max).next()
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(20 * time.Second):
		pr.CloseWithError(errors.New("test over"))
		t.Fatalf("next over %.40q… is still waiting for more", sent)
		return nil
	}
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
	err := nextOver(t, `{"return": "`+strings.Repeat("x", max), max)
	if !errors.Is(err, ErrMessageTooLarge) {
		t.Fatalf("next = %v, want ErrMessageTooLarge", err)
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
