package trace

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestTimesRoundTrip(t *testing.T) {
	start := time.Date(2026, 1, 2, 3, 4, 5, 6000, time.UTC)
	in := NewTimes(start, []time.Duration{0, 1500 * time.Microsecond, 2 * time.Second}, 3)
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := DecodeTimes(b, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !out.Started.Equal(start) || out.Dropped != 3 || len(out.AtMicros) != 3 || out.AtMicros[1] != 1500 || out.AtMicros[2] != 2e6 {
		t.Fatalf("got %+v", out)
	}
}

func TestDecodeTimesErrors(t *testing.T) {
	for _, c := range []struct {
		name, in string
		records  int
		want     string
	}{
		{"not json", "{", 0, "unexpected end"},
		{"count", `{"at_us":[1,2]}`, 3, "2 times for 3 records"},
		{"negative", `{"at_us":[-1]}`, 1, "negative or earlier"},
		{"order", `{"at_us":[5,4]}`, 2, "negative or earlier"},
		{"dropped", `{"at_us":[],"dropped":-1}`, 0, "negative dropped"},
	} {
		if _, err := DecodeTimes([]byte(c.in), c.records); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one with %q", c.name, err, c.want)
		}
	}
}

func FuzzDecodeTimes(f *testing.F) {
	f.Add([]byte(`{"started":"2026-01-02T03:04:05Z","at_us":[0,10,10]}`), 3)
	f.Add([]byte(`{}`), 0)
	f.Fuzz(func(t *testing.T, b []byte, records int) {
		tm, err := DecodeTimes(b, records)
		if err != nil {
			return
		}
		if len(tm.AtMicros) != records || tm.Dropped < 0 {
			t.Fatalf("accepted %+v for %d records", tm, records)
		}
		for i := 1; i < len(tm.AtMicros); i++ {
			if tm.AtMicros[i] < tm.AtMicros[i-1] || tm.AtMicros[0] < 0 {
				t.Fatalf("accepted unordered times %v", tm.AtMicros)
			}
		}
	})
}
