package registry

import (
	"fmt"
	"testing"
)

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		in                 string
		first, last, total int64
		ok                 bool
	}{
		{"bytes 0-0/1", 0, 0, 1, true},
		{"bytes 10-19/100", 10, 19, 100, true},
		{"bytes 10-19/*", 10, 19, -1, true},
		{"BYTES 1-2/3", 1, 2, 3, true},
		{" bytes  5-9/10 ", 5, 9, 10, true},
		{"bytes 10-9/100", 0, 0, 0, false},
		{"bytes 10-100/100", 0, 0, 0, false},
		{"bytes */100", 0, 0, 0, false},
		{"bytes 1-2", 0, 0, 0, false},
		{"items 1-2/3", 0, 0, 0, false},
		{"bytes -1-2/3", 0, 0, 0, false},
		{"bytes +1-2/3", 0, 0, 0, false},
		{"bytes 1-99999999999999999999/3", 0, 0, 0, false},
		{"", 0, 0, 0, false},
	} {
		f, l, n, err := parseContentRange(tc.in)
		if (err == nil) != tc.ok || (tc.ok && (f != tc.first || l != tc.last || n != tc.total)) {
			t.Errorf("parseContentRange(%q) = %d %d %d %v", tc.in, f, l, n, err)
		}
	}
}

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-0/1", "bytes 10-19/*", "bytes */5", "bytes 1-2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, total, err := parseContentRange(s)
		if err != nil {
			return
		}
		if first < 0 || last < first || (total >= 0 && last >= total) || total < -1 {
			t.Fatalf("%q parsed to inconsistent %d-%d/%d", s, first, last, total)
		}
		// The canonical form parses to the same values.
		canon := fmt.Sprintf("bytes %d-%d/%d", first, last, total)
		if total < 0 {
			canon = fmt.Sprintf("bytes %d-%d/*", first, last)
		}
		f2, l2, n2, err := parseContentRange(canon)
		if err != nil || f2 != first || l2 != last || n2 != total {
			t.Fatalf("%q → %q does not round-trip", s, canon)
		}
	})
}
