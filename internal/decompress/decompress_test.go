package decompress

import (
	"bytes"
	"compress/gzip"
	"io"
	"testing"

	"github.com/klauspost/compress/zstd"
)

func TestLayer(t *testing.T) {
	payload := bytes.Repeat([]byte("tar bytes "), 1000)
	var gz, zs bytes.Buffer
	gw := gzip.NewWriter(&gz)
	gw.Write(payload)
	gw.Close()
	zw, _ := zstd.NewWriter(&zs)
	zw.Write(payload)
	zw.Close()
	for _, c := range []struct {
		in   []byte
		want Compression
	}{{payload, Uncompressed}, {gz.Bytes(), Gzip}, {zs.Bytes(), Zstd}, {nil, Uncompressed}} {
		r, comp, err := Layer(bytes.NewReader(c.in))
		if err != nil || comp != c.want {
			t.Fatalf("%s: %v %v", c.want, comp, err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		if err != nil || len(c.in) > 0 && !bytes.Equal(got, payload) {
			t.Fatalf("%s: payload differs (%v)", c.want, err)
		}
	}
	bad := append([]byte{0x1f, 0x8b}, 0xff, 0xff)
	if _, _, err := Layer(bytes.NewReader(bad)); err == nil {
		t.Fatal("corrupt gzip accepted")
	}
}
