package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// convertResult is what `obd convert --json` prints.
type convertResult struct {
	Manifest string   `json:"manifest"`
	Config   string   `json:"config"`
	Layers   []string `json:"layers"`
}

// convertJSON runs `obd convert --json args…` and parses its output.
func convertJSON(t *testing.T, args ...string) convertResult {
	t.Helper()
	out := mustObd(t, append([]string{"convert", "--json"}, args...)...)
	var res convertResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("convert --json: %v\n%s", err, out)
	}
	if !strings.HasPrefix(res.Manifest, "sha256:") || len(res.Layers) == 0 {
		t.Fatalf("convert --json: no manifest digest or layers: %s", out)
	}
	return res
}

// helloCopy returns a writable copy of the hello-world layout.
func helloCopy(t *testing.T) string {
	t.Helper()
	src := filepath.Join(t.TempDir(), "hello")
	copyTree(t, helloLayout, src)
	return src
}

func TestConvertVerify(t *testing.T) {
	src := helloCopy(t)
	dst := filepath.Join(t.TempDir(), "converted")
	srcRef, dstRef := "oci:"+src+":amd64", "oci:"+dst+":obd"

	first := convertJSON(t, "--vsize", "1", srcRef, dstRef)
	if len(first.Layers) != 1 {
		t.Errorf("converted hello-world has layers %v, want one (like its source)", first.Layers)
	}
	for _, dg := range append([]string{first.Manifest, first.Config}, first.Layers...) {
		if _, err := os.Stat(filepath.Join(dst, "blobs", "sha256", strings.TrimPrefix(dg, "sha256:"))); err != nil {
			t.Errorf("blob %s is not in the destination layout: %v", dg, err)
		}
	}

	out := mustObd(t, "verify", srcRef, dstRef)
	if !strings.Contains(out, "hold the same") || !strings.Contains(out, "paths") {
		t.Errorf("verify of a faithful conversion printed %q, want it to say both hold the same paths", out)
	}

	// The conversion is reproducible: again, into the same layout and into another one.
	again := convertJSON(t, "--vsize", "1", srcRef, dstRef)
	other := convertJSON(t, "--vsize", "1", srcRef, "oci:"+filepath.Join(t.TempDir(), "other")+":obd")
	for _, r := range []convertResult{again, other} {
		if r.Manifest != first.Manifest || r.Config != first.Config || strings.Join(r.Layers, ",") != strings.Join(first.Layers, ",") {
			t.Errorf("converting the same image again gave %+v, first %+v", r, first)
		}
	}

	// Its disk has a clean ext4 (obd's own mkfs, unlike upstream's image: no known problem allowed).
	disk := filepath.Join(t.TempDir(), "disk.img")
	mustObd(t, "export-raw", dstRef, disk)
	e2fsck(t, disk)

	// The converted layer blob is an overlaybd blob inspect understands.
	info := inspectJSON(t, filepath.Join(dst, "blobs", "sha256", strings.TrimPrefix(first.Layers[0], "sha256:")))
	if info.Tar == nil || info.ZFile == nil || !info.ZFile.CRCOK || info.LSMT == nil || info.LSMT.VirtualSize != 1<<30 {
		t.Errorf("inspect of the converted layer: %+v %+v %+v, want a tar-wrapped ZFile of a 1 GiB committed layer", info.Tar, info.ZFile, info.LSMT)
	}
}

func TestVerifyFindsDifferences(t *testing.T) {
	src := helloCopy(t)
	dst := filepath.Join(t.TempDir(), "converted")
	// Another image converted under the tag that verify is told holds amd64's conversion: arm64's /hello differs.
	convertJSON(t, "--vsize", "1", "--platform", "linux/arm64/v8", "oci:"+src+":arm64", "oci:"+dst+":obd")

	out, _, err := obd(t, "verify", "oci:"+src+":amd64", "oci:"+dst+":obd")
	if err == nil {
		t.Fatalf("verify of a conversion of another image succeeded:\n%s", out)
	}
	if !strings.Contains(err.Error(), "differences") {
		t.Errorf("verify error %q, want it to count the differences", err)
	}
	if !strings.Contains(out, "/hello: size: source 13256") {
		t.Errorf("verify does not report the differing size of /hello:\n%s", out)
	}
	if strings.Contains(out, "hold the same") {
		t.Errorf("verify says the images match although it failed:\n%s", out)
	}
}

func TestConvertErrors(t *testing.T) {
	src := helloCopy(t)
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"vsize 0", []string{"--vsize", "0", "oci:" + src + ":amd64"}, "--vsize 0"},
		{"vsize too large", []string{"--vsize", "20000", "oci:" + src + ":amd64"}, "--vsize 20000"},
		{"bad algorithm", []string{"--algorithm", "foo", "oci:" + src + ":amd64"}, `--algorithm: zfile: compression "foo"`},
		{"bad block size", []string{"--block-size", "1000", "oci:" + src + ":amd64"}, "--block-size: zfile: block size 1000 not supported"},
		{"missing tag", []string{"--vsize", "1", "oci:" + src + ":nope"}, "nope"},
		{"docker-archive destination", []string{"oci:" + src + ":amd64", "docker-archive:" + filepath.Join(t.TempDir(), "x.tar")}, "destination"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "dst")
			args := append([]string{"convert"}, tc.args...)
			if len(tc.args) > 0 && !strings.Contains(tc.args[len(tc.args)-1], "docker-archive:") {
				args = append(args, "oci:"+dst+":obd")
			}
			_, _, err := obd(t, args...)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("obd %s: error %v, want one saying %q", strings.Join(args, " "), err, tc.wantErr)
			}
			// A failed convert may leave an empty layout behind, never a tagged image.
			if b, err := os.ReadFile(filepath.Join(dst, "index.json")); err == nil {
				var idx struct {
					Manifests []json.RawMessage `json:"manifests"`
				}
				if err := json.Unmarshal(b, &idx); err != nil || len(idx.Manifests) > 0 {
					t.Errorf("a failed convert left an image in %s: %s", dst, b)
				}
			}
		})
	}
}
