package main

import (
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
)

// dataBlock is the unit in which the big file's content alternates between random and text-like data.
const dataBlock = 4096

// bigData generates the content of the big file: deterministic, a mix of 4 KiB blocks of random bytes (which do not
// compress) and of text-like log lines (which LZ4 compresses about 2.8×), so that the whole compresses about 2× in
// the ZFile's 4 KiB blocks — like a typical mix of binaries, libraries and text in an image.
type bigData struct {
	size, off int64
	rng       *rand.Rand
	words     []string
	block     [dataBlock]byte
	have      int   // bytes of block not yet returned
	clock     int64 // milliseconds of the log lines' clock
}

// randomFraction is the share of random blocks; the rest are text. It gives an LZ4 ratio of about 2 in 4 KiB
// blocks (TestBigDataRatio; the report prints the ratio of the converted blob).
const randomFraction = 0.22

func newBigData(size int64, seed uint64) *bigData {
	r := rand.New(rand.NewPCG(seed, 0x0bd))
	d := &bigData{size: size, rng: r}
	// A vocabulary of pseudo-words like identifiers and English words.
	const letters = "etaoinshrdlcumwfgypbvkjxqz"
	for range 60 {
		n := 2 + r.IntN(9)
		b := make([]byte, n)
		for i := range b {
			// Skewed letter choice: common letters more often, as in text.
			b[i] = letters[min(r.IntN(len(letters)), r.IntN(len(letters)))]
		}
		d.words = append(d.words, string(b))
	}
	return d
}

func (d *bigData) Read(p []byte) (int, error) {
	if d.off >= d.size {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && d.off < d.size {
		if d.have == 0 {
			d.fill()
		}
		m := copy(p[n:], d.block[dataBlock-d.have:])
		m = int(min(int64(m), d.size-d.off))
		n += m
		d.have -= m
		d.off += int64(m)
	}
	return n, nil
}

// fill makes the next block.
func (d *bigData) fill() {
	d.have = dataBlock
	r := d.rng
	if r.Float64() < randomFraction {
		for i := 0; i < dataBlock; i += 8 {
			v := r.Uint64()
			for j := range 8 {
				d.block[i+j] = byte(v >> (8 * j))
			}
		}
		return
	}
	b := d.block[:0]
	for len(b) < dataBlock {
		b = d.logLine(b)
	}
	copy(d.block[:], b)
}

var levels = []string{"INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"}

// logLine appends one line of a made-up service log: a clock that moves forward, a few fields that repeat and a
// few words, like real logs.
func (d *bigData) logLine(b []byte) []byte {
	r := d.rng
	d.clock += int64(r.IntN(50))
	ms := d.clock
	b = fmt.Appendf(b, "2024-01-02T%02d:%02d:%02d.%03dZ %s ", ms/3600000%24, ms/60000%60, ms/1000%60, ms%1000, levels[r.IntN(len(levels))])
	b = append(b, services[r.IntN(len(services))]...)
	// Zipf-like word choice: low indexes are frequent.
	for range 2 + r.IntN(5) {
		b = append(b, ' ')
		b = append(b, d.words[min(r.IntN(len(d.words)), r.IntN(len(d.words)), r.IntN(len(d.words)))]...)
	}
	b = append(b, " status="...)
	b = strconv.AppendInt(b, int64(statuses[r.IntN(len(statuses))]), 10)
	b = append(b, " latency_ms="...)
	b = strconv.AppendInt(b, int64(r.IntN(90)), 10)
	return append(b, '\n')
}

var (
	services = []string{"api.handler request served", "db.pool query done", "cache.lookup", "auth.session check", "worker.job finished"}
	statuses = []int{200, 200, 200, 200, 204, 304, 404, 500}
)

// smallText returns n bytes of text-like content for the small files.
func smallText(n int, seed uint64) []byte {
	d := newBigData(0, seed)
	var b []byte
	for len(b) < n {
		b = d.logLine(b)
	}
	return b[:n]
}
