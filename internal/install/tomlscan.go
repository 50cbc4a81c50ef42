package install

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// tomlItem is a table header or a key/value of a TOML document, with where it is: enough to name a line in an
// error and to edit a file as text, leaving every other byte as the user wrote it. The document must already have
// parsed with a full TOML parser; the scanner only finds things.
type tomlItem struct {
	line     int      // 1-based line where the item starts
	start    int      // offset of the start of that line
	end      int      // offset just past the item's last line, including its newline if any
	header   bool     // [table] or [[array of tables]]
	path     []string // header: the table; key/value: the full key (table + dotted key)
	valStart int      // key/value: the value's bytes (for a multi-line value, up to its end)
	valEnd   int
	indent   string // white space before the item on its line
}

// scanTOML lists the headers and key/values of data in order.
func scanTOML(data []byte) ([]tomlItem, error) {
	s := &scanner{b: data}
	var items []tomlItem
	var table []string
	for s.pos < len(s.b) {
		lineStart := s.pos
		line := s.lineAt(lineStart)
		s.skipSpace()
		indent := string(s.b[lineStart:s.pos])
		if s.pos >= len(s.b) {
			break
		}
		switch c := s.b[s.pos]; {
		case c == '\n' || c == '\r' || c == '#':
			s.endLine()
			continue
		case c == '[':
			array := strings.HasPrefix(string(s.b[s.pos:]), "[[")
			if array {
				s.pos += 2
			} else {
				s.pos++
			}
			key, err := s.key()
			if err != nil {
				return nil, err
			}
			closing := "]"
			if array {
				closing = "]]"
			}
			s.skipSpace()
			if !strings.HasPrefix(string(s.b[s.pos:]), closing) {
				return nil, s.errorf("table header without %q", closing)
			}
			s.pos += len(closing)
			if err := s.endLine(); err != nil {
				return nil, err
			}
			table = key
			items = append(items, tomlItem{line: line, start: lineStart, end: s.pos, header: true, path: key, indent: indent})
		default:
			key, err := s.key()
			if err != nil {
				return nil, err
			}
			s.skipSpace()
			if s.pos >= len(s.b) || s.b[s.pos] != '=' {
				return nil, s.errorf("key %s without '='", strings.Join(key, "."))
			}
			s.pos++
			s.skipSpace()
			valStart := s.pos
			if err := s.value(); err != nil {
				return nil, err
			}
			valEnd := s.pos
			if err := s.endLine(); err != nil {
				return nil, err
			}
			full := append(append([]string(nil), table...), key...)
			items = append(items, tomlItem{line: line, start: lineStart, end: s.pos, path: full, valStart: valStart, valEnd: valEnd, indent: indent})
		}
	}
	return items, nil
}

// scanner walks a TOML document byte by byte.
type scanner struct {
	b   []byte
	pos int
}

func (s *scanner) errorf(format string, args ...any) error {
	return fmt.Errorf("line %d: %s", s.lineAt(s.pos), fmt.Sprintf(format, args...))
}

// lineAt returns the 1-based line of offset off.
func (s *scanner) lineAt(off int) int {
	return strings.Count(string(s.b[:min(off, len(s.b))]), "\n") + 1
}

// skipSpace skips blanks and tabs.
func (s *scanner) skipSpace() {
	for s.pos < len(s.b) && (s.b[s.pos] == ' ' || s.b[s.pos] == '\t') {
		s.pos++
	}
}

// endLine expects only blanks and a comment up to the end of the line, and moves past its newline.
func (s *scanner) endLine() error {
	s.skipSpace()
	if s.pos < len(s.b) && s.b[s.pos] == '#' {
		for s.pos < len(s.b) && s.b[s.pos] != '\n' {
			s.pos++
		}
	}
	if s.pos < len(s.b) && s.b[s.pos] == '\r' {
		s.pos++
	}
	if s.pos < len(s.b) {
		if s.b[s.pos] != '\n' {
			return s.errorf("unexpected %q", s.b[s.pos])
		}
		s.pos++
	}
	return nil
}

// skipBlank skips white space, newlines and comments (inside arrays).
func (s *scanner) skipBlank() {
	for s.pos < len(s.b) {
		switch s.b[s.pos] {
		case ' ', '\t', '\r', '\n':
			s.pos++
		case '#':
			for s.pos < len(s.b) && s.b[s.pos] != '\n' {
				s.pos++
			}
		default:
			return
		}
	}
}

// key reads a possibly dotted key: bare, "basic" or 'literal' parts.
func (s *scanner) key() ([]string, error) {
	var parts []string
	for {
		s.skipSpace()
		if s.pos >= len(s.b) {
			return nil, s.errorf("key expected")
		}
		switch c := s.b[s.pos]; {
		case c == '"':
			start := s.pos
			if err := s.basicString(); err != nil {
				return nil, err
			}
			v, err := unquoteBasic(string(s.b[start:s.pos]))
			if err != nil {
				return nil, s.errorf("key %s: %v", s.b[start:s.pos], err)
			}
			parts = append(parts, v)
		case c == '\'':
			end := strings.IndexAny(string(s.b[s.pos+1:]), "'\n")
			if end < 0 || s.b[s.pos+1+end] != '\'' {
				return nil, s.errorf("unterminated key")
			}
			parts = append(parts, string(s.b[s.pos+1:s.pos+1+end]))
			s.pos += end + 2
		case isBare(c):
			start := s.pos
			for s.pos < len(s.b) && isBare(s.b[s.pos]) {
				s.pos++
			}
			parts = append(parts, string(s.b[start:s.pos]))
		default:
			return nil, s.errorf("unexpected %q in a key", c)
		}
		s.skipSpace()
		if s.pos < len(s.b) && s.b[s.pos] == '.' {
			s.pos++
			continue
		}
		return parts, nil
	}
}

func isBare(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// value moves past one value, which may span lines (multi-line strings, arrays, inline tables).
func (s *scanner) value() error {
	if s.pos >= len(s.b) {
		return s.errorf("value expected")
	}
	rest := string(s.b[s.pos:])
	switch {
	case strings.HasPrefix(rest, `"""`):
		return s.multiline(`"""`, true)
	case strings.HasPrefix(rest, `'''`):
		return s.multiline(`'''`, false)
	case rest[0] == '"':
		return s.basicString()
	case rest[0] == '\'':
		end := strings.IndexAny(rest[1:], "'\n")
		if end < 0 || rest[1+end] != '\'' {
			return s.errorf("unterminated string")
		}
		s.pos += end + 2
		return nil
	case rest[0] == '[':
		s.pos++
		for {
			s.skipBlank()
			if s.pos >= len(s.b) {
				return s.errorf("unterminated array")
			}
			if s.b[s.pos] == ']' {
				s.pos++
				return nil
			}
			if err := s.value(); err != nil {
				return err
			}
			s.skipBlank()
			if s.pos < len(s.b) && s.b[s.pos] == ',' {
				s.pos++
			}
		}
	case rest[0] == '{':
		s.pos++
		for {
			s.skipBlank()
			if s.pos >= len(s.b) {
				return s.errorf("unterminated inline table")
			}
			if s.b[s.pos] == '}' {
				s.pos++
				return nil
			}
			if _, err := s.key(); err != nil {
				return err
			}
			s.skipSpace()
			if s.pos >= len(s.b) || s.b[s.pos] != '=' {
				return s.errorf("'=' expected in an inline table")
			}
			s.pos++
			s.skipSpace()
			if err := s.value(); err != nil {
				return err
			}
			s.skipBlank()
			if s.pos < len(s.b) && s.b[s.pos] == ',' {
				s.pos++
			}
		}
	default: // numbers, booleans, dates and times (which may hold one space: 1979-05-27 07:32:00)
		start := s.pos
		for s.pos < len(s.b) && !strings.ContainsRune(",]}#\r\n\t", rune(s.b[s.pos])) {
			if s.b[s.pos] == ' ' && !(s.pos+1 < len(s.b) && s.pos-start == 10 && s.b[s.pos+1] >= '0' && s.b[s.pos+1] <= '9') {
				break
			}
			s.pos++
		}
		if s.pos == start {
			return s.errorf("value expected")
		}
		return nil
	}
}

// basicString moves past a "basic string" on one line.
func (s *scanner) basicString() error {
	for i := s.pos + 1; i < len(s.b); i++ {
		switch s.b[i] {
		case '\\':
			i++
		case '\n':
			return s.errorf("unterminated string")
		case '"':
			s.pos = i + 1
			return nil
		}
	}
	return s.errorf("unterminated string")
}

// multiline moves past a multi-line string delimited by delim; escapes count in basic ones.
func (s *scanner) multiline(delim string, escapes bool) error {
	for i := s.pos + 3; i < len(s.b); i++ {
		if escapes && s.b[i] == '\\' {
			i++
			continue
		}
		if strings.HasPrefix(string(s.b[i:]), delim) {
			end := i + 3
			for k := 0; k < 2 && end < len(s.b) && s.b[end] == delim[0]; k++ { // up to two quotes may end the content
				end++
			}
			s.pos = end
			return nil
		}
	}
	return errors.New("unterminated multi-line string")
}

// unquoteBasic decodes a TOML "basic string" (with its quotes).
func unquoteBasic(q string) (string, error) {
	if len(q) < 2 {
		return "", errors.New("not a string")
	}
	in := q[1 : len(q)-1]
	var b strings.Builder
	for i := 0; i < len(in); i++ {
		c := in[i]
		if c != '\\' {
			b.WriteByte(c)
			continue
		}
		i++
		if i >= len(in) {
			return "", errors.New("dangling escape")
		}
		switch in[i] {
		case 'b':
			b.WriteByte('\b')
		case 't':
			b.WriteByte('\t')
		case 'n':
			b.WriteByte('\n')
		case 'f':
			b.WriteByte('\f')
		case 'r':
			b.WriteByte('\r')
		case 'e':
			b.WriteByte(0x1b)
		case '"', '\\':
			b.WriteByte(in[i])
		case 'x', 'u', 'U':
			n := map[byte]int{'x': 2, 'u': 4, 'U': 8}[in[i]]
			if i+1+n > len(in) {
				return "", errors.New("short escape")
			}
			r, err := strconv.ParseUint(in[i+1:i+1+n], 16, 32)
			if err != nil {
				return "", err
			}
			b.WriteRune(rune(r))
			i += n
		default:
			return "", fmt.Errorf("unknown escape \\%c", in[i])
		}
	}
	return b.String(), nil
}

// quoteBasic writes s as a TOML basic string.
func quoteBasic(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// quoteKey writes one key part: bare when it can be, quoted otherwise.
func quoteKey(k string) string {
	if k == "" {
		return `""`
	}
	for i := 0; i < len(k); i++ {
		if !isBare(k[i]) {
			return quoteBasic(k)
		}
	}
	return k
}

// tableName writes a dotted key, e.g. plugins."io.containerd.grpc.v1.cri".containerd.
func tableName(path []string) string {
	parts := make([]string, len(path))
	for i, p := range path {
		parts[i] = quoteKey(p)
	}
	return strings.Join(parts, ".")
}

// find returns the item whose path is exactly path, header or key/value as asked, or nil.
func find(items []tomlItem, header bool, path ...string) *tomlItem {
	for i := range items {
		if items[i].header == header && equalPath(items[i].path, path) {
			return &items[i]
		}
	}
	return nil
}

// locate returns the line that best explains path: where it is set, else where its nearest enclosing table or
// key is; 0 when nothing in the file relates to it.
func locate(items []tomlItem, path ...string) int {
	best, bestLen := 0, 0
	for _, it := range items {
		n := len(it.path)
		if n > len(path) || !equalPath(it.path, path[:n]) {
			continue
		}
		if n > bestLen {
			best, bestLen = it.line, n
		}
	}
	return best
}

func equalPath(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
