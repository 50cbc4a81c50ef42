package registry

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// parseContentRange parses a 206 answer's "Content-Range: bytes first-last/total" (RFC 9110 §14.4). total is -1
// when the server sends "*".
func parseContentRange(v string) (first, last, total int64, err error) {
	bad := func(why string) (int64, int64, int64, error) {
		return 0, 0, 0, fmt.Errorf("bad Content-Range %q: %s", v, why)
	}
	unit, rest, ok := strings.Cut(strings.TrimSpace(v), " ")
	if !ok || !strings.EqualFold(unit, "bytes") {
		return bad("not a byte range")
	}
	rng, size, ok := strings.Cut(strings.TrimSpace(rest), "/")
	if !ok {
		return bad("no total size")
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return bad("no range")
	}
	if first, err = parseNonNegative(a); err != nil {
		return bad(err.Error())
	}
	if last, err = parseNonNegative(b); err != nil {
		return bad(err.Error())
	}
	if last < first {
		return bad("last byte before first")
	}
	total = -1
	if size != "*" {
		if total, err = parseNonNegative(size); err != nil {
			return bad(err.Error())
		}
		if last >= total {
			return bad("range beyond the total size")
		}
	}
	return first, last, total, nil
}

// parseNonNegative parses a decimal integer of digits only.
func parseNonNegative(s string) (int64, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, errors.New("not a decimal number")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, errors.New("number out of range")
	}
	return n, nil
}
