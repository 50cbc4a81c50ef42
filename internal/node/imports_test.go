package node

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/status"
)

func TestImportLog(t *testing.T) {
	l := &importLog{path: filepath.Join(t.TempDir(), importsFile)}
	if got, err := l.load(); err != nil || len(got) != 0 {
		t.Fatalf("empty log: %v %v", got, err)
	}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	res := []status.ImportedBlob{{Digest: "sha256:a", Imported: 3, Present: 1, Dropped: 1}, {Digest: "sha256:b", Imported: 2}}
	if err := l.record("r/cache:app", t0, res); err != nil {
		t.Fatal(err)
	}
	if err := l.record("snap.tar", t0.Add(time.Minute), res[:1]); err != nil {
		t.Fatal(err)
	}
	// The same source again replaces its first record.
	if err := l.record("r/cache:app", t0.Add(2*time.Minute), res[1:]); err != nil {
		t.Fatal(err)
	}
	got, err := l.load()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Source != "snap.tar" || got[1].Source != "r/cache:app" {
		t.Fatalf("log: %+v", got)
	}
	if a := got[0]; len(a.Blobs) != 1 || a.Blocks != 4 || a.Dropped != 1 {
		t.Errorf("snap.tar: %+v", a)
	}
	if b := got[1]; len(b.Blobs) != 1 || b.Blobs[0] != "sha256:b" || b.Blocks != 2 || !b.Time.Equal(t0.Add(2*time.Minute)) {
		t.Errorf("r/cache:app: %+v", b)
	}

	// The log is bounded: the newest imports stay.
	for i := range maxImports + 5 {
		if err := l.record(fmt.Sprintf("s%d", i), t0.Add(time.Hour+time.Duration(i)*time.Second), res); err != nil {
			t.Fatal(err)
		}
	}
	got, _ = l.load()
	if len(got) != maxImports || got[len(got)-1].Source != fmt.Sprintf("s%d", maxImports+4) {
		t.Errorf("bounded log: %d records, last %+v", len(got), got[len(got)-1])
	}

	// A damaged log is an error to read, and replaced by the next import.
	if err := os.WriteFile(l.path, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := l.load(); err == nil {
		t.Error("a damaged log loaded")
	}
	if err := l.record("again", t0, res); err != nil {
		t.Fatal(err)
	}
	if got, err := l.load(); err != nil || len(got) != 1 {
		t.Errorf("after a damaged log: %+v %v", got, err)
	}
}
