package iocount

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

// shortWriter takes at most limit bytes in all, then fails.
type shortWriter struct{ limit int }

func (w *shortWriter) Write(p []byte) (int, error) {
	if len(p) > w.limit {
		n := w.limit
		w.limit = 0
		return n, errors.New("full")
	}
	w.limit -= len(p)
	return len(p), nil
}

func TestWriter(t *testing.T) {
	var buf bytes.Buffer
	w := &Writer{W: &buf}
	if _, err := io.Copy(w, strings.NewReader("hello, world")); err != nil || w.N != 12 || buf.String() != "hello, world" {
		t.Fatalf("counted %d (%v), wrote %q", w.N, err, buf.String())
	}
	// Bytes the writer did not take are not counted.
	w = &Writer{W: &shortWriter{limit: 5}}
	if n, err := w.Write([]byte("0123456789")); n != 5 || err == nil || w.N != 5 {
		t.Errorf("short write: %d, %v, counted %d; want 5, an error, 5", n, err, w.N)
	}
}

func TestReader(t *testing.T) {
	r := &Reader{R: strings.NewReader("hello, world")}
	b, err := io.ReadAll(io.LimitReader(r, 5))
	if err != nil || string(b) != "hello" || r.N != 5 {
		t.Fatalf("read %q (%v), counted %d", b, err, r.N)
	}
	if _, err := io.Copy(io.Discard, r); err != nil || r.N != 12 {
		t.Errorf("counted %d (%v) after reading everything, want 12", r.N, err)
	}
}
