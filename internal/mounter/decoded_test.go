package mounter

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/obdproject/obd/zfile"
)

type decodedBlock struct {
	layer int
	block int64
	data  []byte
}

func encodeDecoded(t testing.TB, digests []string, blocks []decodedBlock) []byte {
	var buf bytes.Buffer
	held := make([]zfile.HeldBlock, len(blocks))
	for i, b := range blocks {
		held[i] = zfile.HeldBlock{Reader: b.layer, Block: b.block, Data: b.data}
	}
	if err := writeDecoded(&buf, digests, held); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func decodeAll(b []byte, digests []string, maxBytes int64) ([]decodedBlock, error) {
	var got []decodedBlock
	_, err := readDecoded(bytes.NewReader(b), digests, maxBytes, func(layer int, block int64, data []byte) error {
		got = append(got, decodedBlock{layer, block, data})
		return nil
	})
	return got, err
}

func TestDecodedRoundTrip(t *testing.T) {
	digests := []string{"sha256:" + strings.Repeat("a", 64), "sha256:" + strings.Repeat("b", 64)}
	blocks := []decodedBlock{
		{1, 7, bytes.Repeat([]byte{1}, 65536)},
		{0, 0, []byte("hello")},
		{1, 3, bytes.Repeat([]byte{3}, 1000)},
	}
	file := encodeDecoded(t, digests, blocks)
	got, err := decodeAll(file, digests, 1<<30)
	if err != nil || len(got) != len(blocks) {
		t.Fatalf("read %d blocks, %v", len(got), err)
	}
	for i, b := range blocks {
		if got[i].layer != b.layer || got[i].block != b.block || !bytes.Equal(got[i].data, b.data) {
			t.Fatalf("block %d: layer %d block %d, %d bytes; want layer %d block %d, %d bytes", i, got[i].layer, got[i].block, len(got[i].data), b.layer, b.block, len(b.data))
		}
	}
	// The bound: the blocks that fit.
	if got, err := decodeAll(file, digests, 65536+5); err != nil || len(got) != 2 {
		t.Fatalf("within 65541 bytes: %d blocks, %v; want 2", len(got), err)
	}
	// Another image's file.
	if _, err := decodeAll(file, []string{digests[0], digests[0]}, 1<<30); err == nil {
		t.Fatal("a file of other layers was read")
	}
	if _, err := decodeAll(file, digests[:1], 1<<30); err == nil {
		t.Fatal("a file of two layers was read for one")
	}
	// A flipped byte in the second block's bytes: the first block only, and an error.
	bad := bytes.Clone(file)
	bad[len(bad)-1000-20-2] ^= 0x10
	if got, err := decodeAll(bad, digests, 1<<30); err == nil || len(got) != 1 || !strings.Contains(err.Error(), "CRC") {
		t.Fatalf("damaged second block: %d blocks, %v", len(got), err)
	}
	// Cut inside a record.
	if got, err := decodeAll(file[:len(file)-10], digests, 1<<30); !errors.Is(err, io.ErrUnexpectedEOF) || len(got) != 2 {
		t.Fatalf("truncated: %d blocks, %v", len(got), err)
	}
	if _, err := decodeAll([]byte("not one"), digests, 1<<30); err == nil {
		t.Fatal("a file without the magic was read")
	}
	// add's error stops the reading.
	stop := errors.New("stop")
	if n, err := readDecoded(bytes.NewReader(file), digests, 1<<30, func(int, int64, []byte) error { return stop }); n != 0 || err != stop {
		t.Fatalf("add failing: %d blocks, %v", n, err)
	}
}

func FuzzReadDecoded(f *testing.F) {
	digests := []string{"sha256:" + strings.Repeat("a", 64), "d"}
	f.Add(encodeDecoded(f, digests, []decodedBlock{{0, 1, []byte("abc")}, {1, 2, bytes.Repeat([]byte{9}, 300)}}))
	f.Add(encodeDecoded(f, digests, nil))
	f.Add([]byte(decodedMagic + "\x02\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		const maxBytes = 1 << 20
		var total int64
		n, err := readDecoded(bytes.NewReader(b), digests, maxBytes, func(layer int, block int64, data []byte) error {
			if layer < 0 || layer >= len(digests) || block < 0 || len(data) == 0 || len(data) > maxDecodedBlock {
				t.Fatalf("layer %d, block %d, %d bytes", layer, block, len(data))
			}
			total += int64(len(data))
			return nil
		})
		if total > maxBytes {
			t.Fatalf("%d bytes of blocks, bound %d", total, maxBytes)
		}
		if n < 0 || (err == nil && n > len(b)/20) {
			t.Fatalf("%d blocks from %d bytes (%v)", n, len(b), err)
		}
	})
}
