// Package iocount counts the bytes that pass through a reader or a writer.
package iocount

import (
	"bytes"
	"io"
)

// Writer counts the bytes written to W.
type Writer struct {
	W io.Writer
	N int64
}

func (w *Writer) Write(p []byte) (int, error) {
	n, err := w.W.Write(p)
	w.N += int64(n)
	return n, err
}

// Reader counts the bytes read from R.
type Reader struct {
	R io.Reader
	N int64
}

func (r *Reader) Read(p []byte) (int, error) {
	n, err := r.R.Read(p)
	r.N += int64(n)
	return n, err
}

// LimitedBuffer keeps the first Limit bytes written to it and drops the rest, setting Truncated.
type LimitedBuffer struct {
	bytes.Buffer
	Limit     int
	Truncated bool
}

func (b *LimitedBuffer) Write(p []byte) (int, error) {
	if room := b.Limit - b.Len(); len(p) > room {
		b.Truncated = true
		if room > 0 {
			b.Buffer.Write(p[:room])
		}
		return len(p), nil
	}
	return b.Buffer.Write(p)
}
