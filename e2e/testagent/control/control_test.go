package control

import (
	"errors"
	"io"
	"testing"
)

// chunks reads as its pieces, one per Read, then err.
type chunks struct {
	pieces [][]byte
	err    error
}

func (c *chunks) Read(b []byte) (int, error) {
	if len(c.pieces) == 0 {
		return 0, c.err
	}
	n := copy(b, c.pieces[0])
	c.pieces = c.pieces[1:]
	return n, nil
}

// TestCountUntilEOF: the first read is counted but not timed; a read error
// comes back as it is, with what was counted so far.
func TestCountUntilEOF(t *testing.T) {
	n, err := CountUntilEOF(&chunks{pieces: [][]byte{make([]byte, 10), make([]byte, 20), make([]byte, 30)}, err: io.EOF})
	if err != nil || n.Total != 60 || n.Timed != 50 || n.Elapsed < 0 {
		t.Errorf("CountUntilEOF = %+v, %v; want total 60, timed 50", n, err)
	}
	n, err = CountUntilEOF(&chunks{err: io.EOF})
	if err != nil || n != (TCPCount{}) {
		t.Errorf("empty stream: %+v, %v", n, err)
	}
	boom := errors.New("boom")
	n, err = CountUntilEOF(&chunks{pieces: [][]byte{make([]byte, 7)}, err: boom})
	if err != boom || n.Total != 7 {
		t.Errorf("failing stream: %+v, %v; want total 7 and the read's error", n, err)
	}
}
