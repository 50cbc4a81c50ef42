// Package progress draws the progress lines of long CLI commands on a terminal, and nothing in logs and pipes.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/obdproject/obd/internal/units"
)

// Terminal returns w when it is a terminal, else nil (no progress lines in logs and pipes).
func Terminal(w io.Writer) io.Writer {
	f, ok := w.(*os.File)
	if !ok {
		return nil
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	return w
}

// Bar returns a progress callback that draws a download bar on w, at most 5 times a second; nil when w is nil.
func Bar(w io.Writer) func(done, total int64) {
	if w == nil {
		return nil
	}
	var (
		mu    sync.Mutex
		start = time.Now()
		last  time.Time
	)
	return func(done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		if total <= 0 || done < total && time.Since(last) < 200*time.Millisecond {
			return
		}
		last = time.Now()
		const width = 30
		full := int(int64(width) * done / total)
		rate := float64(done) / time.Since(start).Seconds()
		fmt.Fprintf(w, "\rdownload [%s%s] %3d%% %s of %s, %s/s ", strings.Repeat("#", full), strings.Repeat(".", width-full),
			100*done/total, units.Bytes(done), units.Bytes(total), units.Bytes(int64(rate)))
		if done == total {
			fmt.Fprintln(w)
		}
	}
}

// Count returns a progress callback that writes "label: DONE of TOTAL" on w, at most once a second and at the
// end; nil when w is nil.
func Count(w io.Writer, label string) func(done, total int64) {
	if w == nil {
		return nil
	}
	last := time.Now()
	return func(done, total int64) {
		if time.Since(last) > time.Second || done == total {
			fmt.Fprintf(w, "\r%s: %s of %s", label, units.Bytes(done), units.Bytes(total))
			last = time.Now()
		}
		if done == total {
			fmt.Fprintln(w)
		}
	}
}
