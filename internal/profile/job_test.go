package profile

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestTargets(t *testing.T) {
	ref, dst, err := Targets("reg.test/app:v1", "")
	if err != nil || ref.String() != "reg.test/app:v1" || dst.String() != "reg.test/app:v1-accel" {
		t.Errorf("Targets(reg.test/app:v1) = %s, %s, %v", ref, dst, err)
	}
	if _, dst, err := Targets("reg.test/app:v1", "reg.test/other:x"); err != nil || dst.String() != "reg.test/other:x" {
		t.Errorf("--push reg.test/other:x: %s, %v", dst, err)
	}
	for _, tc := range []struct{ arg, push, err string }{
		{"oci:dir:v1", "", "profile needs a registry reference"},
		{"reg.test/app:v1", "oci:dir:x", "--push oci:dir:x: want a registry reference"},
		{"reg.test/app:v1", "Bad Ref", "--push: "},
	} {
		if _, _, err := Targets(tc.arg, tc.push); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("Targets(%q, %q): %v, want %q", tc.arg, tc.push, err, tc.err)
		}
	}
}

func TestSummaryAndSave(t *testing.T) {
	ref, _, _ := Targets("reg.test/app:v1", "")
	p := &Profile{End: EndReady, Reads: []Read{{Length: 4096}}, ReadBytes: 4096, Layers: []Layer{{}}, Fetched: &Fetched{Bytes: 8192, Requests: 2}}
	var b strings.Builder
	p.WriteSummary(&b, ref)
	if s := b.String(); !strings.HasPrefix(s, "recorded the start of reg.test/app:v1 (ready): 1 reads, 4.0 KiB of 1 layers;") ||
		!strings.HasSuffix(s, "fetched from the registry while recording: 8.0 KiB in 2 requests\n") {
		t.Errorf("WriteSummary wrote %q", s)
	}
	path := filepath.Join(t.TempDir(), "p.json")
	if err := p.Save(path); err != nil {
		t.Fatal(err)
	}
	var back Profile
	if b, err := os.ReadFile(path); err != nil || json.Unmarshal(b, &back) != nil || back.ReadBytes != 4096 {
		t.Errorf("saved profile: %+v, %v", back, err)
	}
}
