package trace

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

func startJSON(t testing.TB, layers int, recs []Record) []byte {
	t.Helper()
	var tb bytes.Buffer
	if err := Encode(&tb, recs); err != nil {
		t.Fatal(err)
	}
	s := Start{Trace: tb.Bytes()}
	for i := range layers {
		s.Layers = append(s.Layers, StartLayer{Digest: digest.Digest("sha256:" + strings.Repeat(string(rune('a'+i)), 64))})
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseStart(t *testing.T) {
	recs := []Record{{Op: Read, Layer: 1, Count: 4096, Offset: 8192}, {Op: Read, Layer: 0, Count: 512, Offset: 0}}
	s, got, err := ParseStart(startJSON(t, 2, recs))
	if err != nil || len(s.Layers) != 2 || len(got) != 2 || got[0] != recs[0] || got[1] != recs[1] {
		t.Fatalf("ParseStart = %+v, %+v, %v", s.Layers, got, err)
	}
	for name, b := range map[string][]byte{
		"not JSON":           []byte("{"),
		"no layers":          startJSON(t, 0, nil),
		"a record past them": startJSON(t, 1, recs),
		"bad digest":         []byte(`{"layers":[{"digest":"sha256:12"}],"trace":""}`),
		"bad target":         []byte(`{"layers":[{"digest":"sha256:` + strings.Repeat("a", 64) + `","target":"x"}],"trace":""}`),
		"not a trace":        []byte(`{"layers":[{"digest":"sha256:` + strings.Repeat("a", 64) + `"}],"trace":"AAAA"}`),
	} {
		if _, _, err := ParseStart(b); err == nil || !strings.HasPrefix(err.Error(), "learned start: ") {
			t.Errorf("%s: %v, want a learned start error", name, err)
		}
	}
}

func FuzzParseStart(f *testing.F) {
	f.Add(startJSON(f, 2, []Record{{Op: Read, Layer: 1, Count: 4096, Offset: 8192}}))
	f.Add([]byte(`{"layers":[],"trace":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, recs, err := ParseStart(b)
		if err != nil {
			return
		}
		for _, r := range recs {
			if int(r.Layer) >= len(s.Layers) {
				t.Fatalf("record of layer %d accepted with %d layers", r.Layer, len(s.Layers))
			}
		}
	})
}
