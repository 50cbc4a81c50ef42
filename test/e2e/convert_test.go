package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/testenv"
)

// These tests run the obd binary's convert against Debian's docker-registry (distribution 2.8) and OCI layouts: layer reuse
// through the conversion database, referrers, --platform all, and what a user sees when the input or the
// environment is bad.

// crHtpasswd is an htpasswd line for user "obd", password "s3cret" (bcrypt, cost 4).
const crHtpasswd = "obd:$2b$04$.p/bZQWsbPj2M58GcjRq7e4u/vgpYtYCS3QbSxNJQaLMOpciH3k/S\n"

// crRun runs obd and returns its stdout, stderr and, when it fails, the error it printed.
func crRun(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(t.Context(), bins.obd, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if err != nil {
		msg := errOut.String()
		if i := strings.LastIndex("\n"+msg, "\nobd: "); i >= 0 { // the last line that starts with "obd: "
			msg = msg[i+len("obd: "):]
		}
		err = fmt.Errorf("%s (%w)", strings.TrimSpace(msg), err)
	}
	return out.String(), errOut.String(), err
}

// helloCopy returns a writable copy of the hello-world layout.
func helloCopy(t *testing.T) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "hello")
	if out, err := exec.Command("cp", "-r", helloLayout, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp -r %s: %v\n%s", helloLayout, err, out)
	}
	return dst
}

// dirNames lists the names in dir.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, len(ents))
	for i, e := range ents {
		names[i] = e.Name()
	}
	return names
}

// readFile reads path or fails the test.
func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// crMust runs obd and fails the test if it fails; it returns stdout and stderr.
func crMust(t *testing.T, args ...string) (string, string) {
	t.Helper()
	stdout, stderr, err := crRun(t, args...)
	if err != nil {
		t.Fatalf("obd %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout, stderr)
	}
	return stdout, stderr
}

// crConvert runs `obd convert --json --vsize 1 args…` and returns the manifest (or index) digest and stderr.
func crConvert(t *testing.T, args ...string) (digest.Digest, string) {
	t.Helper()
	stdout, stderr := crMust(t, append([]string{"convert", "--json", "--vsize", "1"}, args...)...)
	var res struct{ Manifest digest.Digest }
	if err := json.Unmarshal([]byte(stdout), &res); err != nil || res.Manifest.Validate() != nil {
		t.Fatalf("convert --json printed %q: %v", stdout, err)
	}
	return res.Manifest, stderr
}

// crIsolate keeps the test away from the user's docker credentials and conversion database.
func crIsolate(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
}

// crClient is a registry client for tests (plain HTTP, optional credentials).
func crClient(t *testing.T, user, pass string) *registry.Client {
	t.Helper()
	c, err := registry.New(registry.Options{PlainHTTP: true, Credentials: registry.StaticCredentials(user, pass), RetryBudget: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// crPushLayout copies what tag names in an OCI layout (a manifest, or an index and all its manifests) to
// host/repo:dstTag, unchanged.
func crPushLayout(t *testing.T, c *registry.Client, dir, tag, host, repo, dstTag string) ocispec.Descriptor {
	t.Helper()
	ctx := context.Background()
	lay, err := image.OpenLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	top, b, err := lay.Top(image.Ref{Transport: image.TransportOCI, Path: dir, Tag: tag})
	if err != nil {
		t.Fatal(err)
	}
	pushManifest := func(desc ocispec.Descriptor, b []byte, tag string) {
		m, err := image.ParseManifest(b)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
			f, err := lay.OpenBlob(d)
			if err != nil {
				t.Fatal(err)
			}
			err = c.PushBlob(ctx, host, repo, d, f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
		}
		if _, err := c.PushManifest(ctx, host, repo, tag, desc.MediaType, b); err != nil {
			t.Fatal(err)
		}
	}
	if !image.IsIndex(top.MediaType) {
		pushManifest(top, b, dstTag)
		return top
	}
	idx, err := image.ParseIndex(b)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range idx.Manifests {
		mb, err := lay.ReadBlob(d)
		if err != nil {
			t.Fatal(err)
		}
		pushManifest(d, mb, "")
	}
	if _, err := c.PushManifest(ctx, host, repo, dstTag, top.MediaType, b); err != nil {
		t.Fatal(err)
	}
	return top
}

// crTags lists the tags of host/repo (none when the repository does not exist).
func crTags(t *testing.T, host, repo string) []string {
	t.Helper()
	resp, err := http.Get("http://" + host + "/v2/" + repo + "/tags/list")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil
	}
	var list struct{ Tags []string }
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("tags of %s/%s: %s %v", host, repo, resp.Status, err)
	}
	return list.Tags
}

// crGet fetches a registry path (http://host/v2/…) with an Accept header for manifests and indexes.
func crGet(t *testing.T, host, path string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+host+"/v2/"+path, nil)
	req.Header.Set("Accept", strings.Join([]string{ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest, image.MediaTypeDockerManifestList, image.MediaTypeDockerManifest}, ", "))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// crTar builds an uncompressed tar of regular files (name → content), with fixed metadata.
func crTar(t *testing.T, files map[string][]byte) []byte {
	t.Helper()
	var names []string
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		h := &tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(files[n])), ModTime: time.Unix(1700000000, 0)}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(files[n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// crWriteLayout writes an image of the given uncompressed layers (stored gzip'd, with layer media type
// mediaType, default OCI tar+gzip) into the OCI layout dir under tag.
func crWriteLayout(t *testing.T, dir, tag string, layers [][]byte, mediaType string) {
	t.Helper()
	lay, err := image.CreateLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lay.WriteImage(tag, layers, mediaType, ocispec.Image{}); err != nil {
		t.Fatal(err)
	}
}

// crSharedImages writes images "a" and "b" into the layout dir: three layers each, the bottom two shared.
func crSharedImages(t *testing.T, dir string) {
	base := crTar(t, map[string][]byte{"etc/os-release": []byte("ID=obd\n"), "bin/sh": bytes.Repeat([]byte("sh"), 40000)})
	lib := crTar(t, map[string][]byte{"usr/lib/libc.so": bytes.Repeat([]byte("libc"), 50000)})
	crWriteLayout(t, dir, "a", [][]byte{base, lib, crTar(t, map[string][]byte{"app/a": []byte("application a")})}, "")
	crWriteLayout(t, dir, "b", [][]byte{base, lib, crTar(t, map[string][]byte{"app/b": []byte("application b")})}, "")
}

// crLayoutTags returns the tags of an OCI layout (none when it has no index.json).
func crLayoutTags(t *testing.T, dir string) []string {
	t.Helper()
	lay, err := image.OpenLayout(dir)
	if err != nil {
		return nil
	}
	idx, err := lay.Index()
	if err != nil {
		t.Fatal(err)
	}
	var tags []string
	for _, d := range idx.Manifests {
		if n := d.Annotations[ocispec.AnnotationRefName]; n != "" {
			tags = append(tags, n)
		}
	}
	return tags
}

func TestConvertDBReuseCLI(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	src := filepath.Join(t.TempDir(), "src")
	crSharedImages(t, src)
	db := filepath.Join(t.TempDir(), "db", "convert.db")
	out := t.TempDir()

	wantA, _ := crConvert(t, "--no-db", "oci:"+src+":a", "oci:"+filepath.Join(out, "nodb")+":a")
	wantB, _ := crConvert(t, "--no-db", "oci:"+src+":b", "oci:"+filepath.Join(out, "nodb")+":b")

	got, stderr := crConvert(t, "--db", db, "oci:"+src+":a", "oci:"+filepath.Join(out, "db")+":a")
	if got != wantA || strings.Contains(stderr, "reused") {
		t.Fatalf("first conversion with the database: %s, want %s with nothing reused\n%s", got, wantA, stderr)
	}
	// The progress output (not --json) says what was reused.
	stdout, stderr := crMust(t, "convert", "--vsize", "1", "--db", db, "oci:"+src+":b", "oci:"+filepath.Join(out, "db")+":b")
	for _, want := range []string{"layer 1/3: reused sha256:", "layer 2/3: reused sha256:", "layer 3/3: applied"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("progress does not say %q:\n%s", want, stderr)
		}
	}
	if !strings.Contains(stdout, wantB.String()) || !strings.Contains(stdout, "(2 reused)") {
		t.Errorf("image b with the database: %q, want manifest %s with 2 layers reused", stdout, wantB)
	}
	// Both layouts hold the same bytes.
	for _, name := range dirNames(t, filepath.Join(out, "nodb", "blobs", "sha256")) {
		a, b := readFile(t, filepath.Join(out, "nodb", "blobs", "sha256", name)), readFile(t, filepath.Join(out, "db", "blobs", "sha256", name))
		if !bytes.Equal(a, b) {
			t.Errorf("blob %s differs between the conversions with and without the database", name)
		}
	}
	// The default database lives in the user's cache directory.
	crConvert(t, "oci:"+src+":a", "oci:"+filepath.Join(out, "default")+":a")
	if _, err := os.Stat(filepath.Join(os.Getenv("XDG_CACHE_HOME"), "obd", "convert.db")); err != nil {
		t.Errorf("no default database: %v", err)
	}
	// A tiny maximum size trims the store; nothing is left to reuse for a layout destination.
	crConvert(t, "--db", db, "--db-max-size", "1KiB", "oci:"+src+":a", "oci:"+filepath.Join(out, "db2")+":a")
	if ents := dirNames(t, filepath.Join(filepath.Dir(db), "convert.blobs", "sha256")); len(ents) != 0 {
		t.Errorf("store holds %v after trimming to 1 KiB", ents)
	}
	if got, stderr := crConvert(t, "--db", db, "oci:"+src+":a", "oci:"+filepath.Join(out, "db3")+":a"); got != wantA {
		t.Errorf("after trimming: %s, want %s\n%s", got, wantA, stderr)
	}
	if _, _, err := crRun(t, "convert", "--db-max-size", "lots", "oci:"+src+":a", "oci:"+filepath.Join(out, "x")+":a"); err == nil || !strings.Contains(err.Error(), "--db-max-size") {
		t.Errorf("bad --db-max-size: %v", err)
	}
}

func TestConvertDBReuseRegistry(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	host := testenv.Registry(t, "")
	c := crClient(t, "", "")
	src := filepath.Join(t.TempDir(), "src")
	crSharedImages(t, src)
	crPushLayout(t, c, src, "a", host, "src/app", "a")
	crPushLayout(t, c, src, "b", host, "src/app", "b")
	wantA, _ := crConvert(t, "--no-db", "oci:"+src+":a", "oci:"+filepath.Join(t.TempDir(), "nodb")+":a")
	wantB, _ := crConvert(t, "--no-db", "oci:"+src+":b", "oci:"+filepath.Join(t.TempDir(), "nodb")+":b")

	// A database that keeps no blob locally: reuse then relies on the registry.
	db := filepath.Join(t.TempDir(), "convert.db")
	flags := []string{"--db", db, "--db-max-size", "0"}
	got, _ := crConvert(t, append(flags, host+"/src/app:a", host+"/obd/a:v1")...)
	if got != wantA {
		t.Fatalf("registry conversion of a: %s, want %s", got, wantA)
	}
	// b shares two layers with a: they are reused from obd/a (mounted), the third is converted on them, reading
	// their filesystem from the registry.
	_, stderr := crMust(t, append([]string{"convert", "--vsize", "1"}, append(flags, host+"/src/app:b", host+"/obd/b:v1")...)...)
	for _, want := range []string{"layer 1/3: reused sha256:", "layer 2/3: reused sha256:", "from " + host + "/obd/a", "layer 3/3: applied"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("progress does not say %q:\n%s", want, stderr)
		}
	}
	desc, mb, err := c.Resolve(context.Background(), host, "obd/b", "v1")
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != wantB {
		t.Fatalf("obd/b:v1 is %s, want %s (as without the database)", desc.Digest, wantB)
	}
	m, err := image.ParseManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range m.Layers {
		if status, _ := crGet(t, host, "obd/b/blobs/"+l.Digest.String()); status != http.StatusOK {
			t.Errorf("obd/b lacks layer blob %s: %d", l.Digest, status)
		}
	}
	// Everything of a, again, into a third repository: all reused from the registry, nothing converted.
	_, stderr = crMust(t, append([]string{"convert", "--vsize", "1"}, append(flags, host+"/src/app:a", host+"/obd/c:v1")...)...)
	if strings.Count(stderr, "reused") != 3 || strings.Contains(stderr, "applied") {
		t.Errorf("converting a again: want 3 layers reused, none applied:\n%s", stderr)
	}
	if desc, _, err := c.Resolve(context.Background(), host, "obd/c", "v1"); err != nil || desc.Digest != wantA {
		t.Errorf("obd/c:v1: %v %v, want %s", desc.Digest, err, wantA)
	}
	// A layout destination cannot use registry copies: it converts.
	if got, stderr := crConvert(t, append(flags, host+"/src/app:a", "oci:"+filepath.Join(t.TempDir(), "l")+":a")...); got != wantA || strings.Contains(stderr, "reused") {
		t.Errorf("layout destination: %s, want %s converted", got, wantA)
	}
}

func TestConvertReferrer(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	host := testenv.Registry(t, "")
	c := crClient(t, "", "")
	srcDesc := crPushLayout(t, c, helloLayout, "amd64", host, "hello", "v1")
	ctx := context.Background()

	// No tag: pushed by digest only, found through its subject.
	got, _ := crConvert(t, "--no-db", "--referrer", host+"/hello:v1", host+"/hello")
	status, mb := crGet(t, host, "hello/manifests/"+got.String())
	if status != http.StatusOK {
		t.Fatalf("referrer %s: %d", got, status)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(mb, &m); err != nil {
		t.Fatal(err)
	}
	if m.MediaType != ocispec.MediaTypeImageManifest || m.ArtifactType != convert.ArtifactTypeOverlaybd || m.Config.MediaType != ocispec.MediaTypeImageConfig {
		t.Errorf("referrer manifest: mediaType %q artifactType %q config %q, want OCI types and %s", m.MediaType, m.ArtifactType, m.Config.MediaType, convert.ArtifactTypeOverlaybd)
	}
	if m.Subject == nil || m.Subject.Digest != srcDesc.Digest || m.Subject.Size != srcDesc.Size || m.Subject.MediaType != srcDesc.MediaType {
		t.Errorf("subject %+v, want the source manifest %+v", m.Subject, srcDesc)
	}
	if tags := crTags(t, host, "hello"); slices.Contains(tags, "latest") {
		t.Errorf("a referrer without a tag was tagged: %v", tags)
	}
	// distribution 2.8 has no referrers API; the OCI fallback (a tag named after the subject digest, holding an
	// index of its referrers) is what clients find there.
	status, body := crGet(t, host, "hello/referrers/"+srcDesc.Digest.String())
	t.Logf("GET /v2/hello/referrers/%s: %d (docker-registry 2.8 has no referrers API)", srcDesc.Digest, status)
	if status == http.StatusOK {
		if !strings.Contains(string(body), got.String()) {
			t.Errorf("referrers API does not list %s: %s", got, body)
		}
	} else {
		fallback := "sha256-" + srcDesc.Digest.Encoded()
		_, ib, err := c.Resolve(ctx, host, "hello", fallback)
		if err != nil {
			t.Fatalf("no referrers API and no fallback tag %s: %v", fallback, err)
		}
		idx, err := image.ParseIndex(ib)
		if err != nil || len(idx.Manifests) != 1 || idx.Manifests[0].Digest != got || idx.Manifests[0].ArtifactType != convert.ArtifactTypeOverlaybd {
			t.Errorf("fallback referrers index %s: %s (%v), want it to list %s with the overlaybd artifactType", fallback, ib, err, got)
		}
	}
	// With a tag, and another vsize: a second referrer of the same subject (the fallback index is replaced,
	// although the registry does not allow deleting the old one).
	if _, _, err := crRun(t, "convert", "--json", "--no-db", "--vsize", "2", "--referrer", host+"/hello:v1", host+"/hello:obd"); err != nil {
		t.Fatal(err)
	}
	if desc, b, err := c.Resolve(ctx, host, "hello", "obd"); err != nil || desc.MediaType != ocispec.MediaTypeImageManifest || !strings.Contains(string(b), srcDesc.Digest.String()) {
		t.Errorf("tagged referrer: %+v %v", desc, err)
	}

	// OCI layout destinations: the referrer is listed in index.json (tagged or not) with its artifactType.
	dst := filepath.Join(t.TempDir(), "ref")
	untagged, _ := crConvert(t, "--no-db", "--referrer", "oci:"+helloLayout+":amd64", "oci:"+dst)
	tagged, _ := crConvert(t, "--no-db", "--referrer", "oci:"+helloLayout+":amd64", "oci:"+dst+":obd")
	if untagged != got || tagged != got {
		t.Errorf("layout referrers %s, %s; want %s as in the registry", untagged, tagged, got)
	}
	lay, err := image.OpenLayout(dst)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := lay.Index()
	if err != nil {
		t.Fatal(err)
	}
	if len(idx.Manifests) != 1 || idx.Manifests[0].Digest != got || idx.Manifests[0].ArtifactType != convert.ArtifactTypeOverlaybd || idx.Manifests[0].Annotations[ocispec.AnnotationRefName] != "obd" {
		t.Errorf("layout index.json: %+v", idx.Manifests)
	}
	// A docker archive's manifest exists nowhere: no subject to refer to.
	if _, _, err := crRun(t, "convert", "--referrer", "docker-archive:x.tar", "oci:"+dst); err == nil || !strings.Contains(err.Error(), "--referrer") {
		t.Errorf("--referrer from a docker archive: %v", err)
	}
}

func TestConvertAllPlatforms(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	lay := helloCopy(t)
	dst := filepath.Join(t.TempDir(), "all")
	idxDigest, stderr := crConvert(t, "--platform", "all", "oci:"+lay+":docker-list", "oci:"+dst+":all")
	srcList := readFile(t, filepath.Join(lay, "blobs", "sha256", "726023f73a8fc5103fa6776d48090539042cb822531c6b751b1f6dd18cb5705d"))
	srcIdx, err := image.ParseIndex(srcList)
	if err != nil {
		t.Fatal(err)
	}
	out, err := image.OpenLayout(dst)
	if err != nil {
		t.Fatal(err)
	}
	top, ib, err := out.Top(image.Ref{Transport: image.TransportOCI, Path: dst, Tag: "all"})
	if err != nil {
		t.Fatal(err)
	}
	if top.Digest != idxDigest || top.MediaType != image.MediaTypeDockerManifestList {
		t.Fatalf("tag all: %+v, want a Docker manifest list %s", top, idxDigest)
	}
	idx, err := image.ParseIndex(ib)
	if err != nil {
		t.Fatal(err)
	}
	if len(idx.Manifests) != len(srcIdx.Manifests) {
		t.Fatalf("converted index has %d entries, the source %d:\n%s", len(idx.Manifests), len(srcIdx.Manifests), stderr)
	}
	for i, d := range idx.Manifests {
		want := srcIdx.Manifests[i].Platform
		if d.Platform == nil || d.Platform.OS != want.OS || d.Platform.Architecture != want.Architecture || d.Platform.Variant != want.Variant {
			t.Errorf("entry %d: platform %+v, want %+v", i, d.Platform, want)
		}
		m, err := out.ReadBlob(d)
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		pm, err := image.ParseManifest(m)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := image.BlockLayers(pm); err != nil {
			t.Errorf("entry %d (%s): %v", i, d.Platform.Architecture, err)
		}
	}
	// The amd64 entry is the image a single-platform conversion makes, and it runs: its /hello is the source's.
	single, _ := crConvert(t, "oci:"+lay+":amd64", "oci:"+dst+":amd64")
	if idx.Manifests[0].Digest != single {
		t.Errorf("amd64 entry %s, single-platform conversion %s", idx.Manifests[0].Digest, single)
	}
	disk := filepath.Join(t.TempDir(), "disk.img")
	crMust(t, "export-raw", "oci:"+dst+":all", disk)

	// The same through a registry: the same index, pushed under the tag after all its manifests.
	host := testenv.Registry(t, "")
	c := crClient(t, "", "")
	crPushLayout(t, c, lay, "docker-list", host, "hello", "list")
	got, _ := crConvert(t, "--platform", "all", host+"/hello:list", host+"/hello-obd:all")
	if got != idxDigest {
		t.Errorf("registry conversion: index %s, layout conversion %s", got, idxDigest)
	}
	if desc, _, err := c.Resolve(context.Background(), host, "hello-obd", "all"); err != nil || desc.Digest != idxDigest || desc.MediaType != image.MediaTypeDockerManifestList {
		t.Errorf("hello-obd:all: %+v %v", desc, err)
	}
	// As referrers: an OCI index whose subject is the source list; each manifest's subject is its source.
	ref, _ := crConvert(t, "--platform", "all", "--referrer", host+"/hello:list", host+"/hello")
	_, rb, err := c.Resolve(context.Background(), host, "hello", ref.String())
	if err != nil {
		t.Fatal(err)
	}
	var ri ocispec.Index
	json.Unmarshal(rb, &ri)
	if ri.MediaType != ocispec.MediaTypeImageIndex || ri.ArtifactType != convert.ArtifactTypeOverlaybd || ri.Subject == nil || ri.Subject.Digest != digest.Digest("sha256:726023f73a8fc5103fa6776d48090539042cb822531c6b751b1f6dd18cb5705d") {
		t.Errorf("referrer index: %s", rb)
	}
	for _, d := range ri.Manifests {
		_, mb, err := c.Resolve(context.Background(), host, "hello", d.Digest.String())
		if err != nil {
			t.Fatal(err)
		}
		var m ocispec.Manifest
		json.Unmarshal(mb, &m)
		if m.Subject == nil || m.ArtifactType != convert.ArtifactTypeOverlaybd {
			t.Errorf("platform manifest %s: no subject or artifactType", d.Digest)
		}
	}
}

// crHelloWithLayerType writes the hello-world amd64 image into a new layout with its layer's media type replaced.
func crHelloWithLayerType(t *testing.T, mediaType string) string {
	t.Helper()
	dir := helloCopy(t)
	lay, err := image.OpenLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := lay.Resolve(image.Ref{Tag: "amd64"})
	if err != nil {
		t.Fatal(err)
	}
	m, _, err := lay.Manifest(d, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	m.MediaType = ocispec.MediaTypeImageManifest
	m.Config.MediaType = ocispec.MediaTypeImageConfig
	m.Layers[0].MediaType = mediaType
	mb, _ := json.Marshal(m)
	md, err := lay.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		t.Fatal(err)
	}
	if err := lay.Tag("bad", md); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestConvertBadLayerMediaType(t *testing.T) {
	crIsolate(t)
	host := testenv.Registry(t, "")
	c := crClient(t, "", "")
	for _, mt := range []string{"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "application/x-garbage"} {
		t.Run(mt, func(t *testing.T) {
			src := crHelloWithLayerType(t, mt)
			layer := "layer 0 (sha256:719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6)"
			dst := filepath.Join(t.TempDir(), "out")
			_, _, err := crRun(t, "convert", "--no-db", "oci:"+src+":bad", "oci:"+dst+":obd")
			if err == nil || !strings.Contains(err.Error(), layer) || !strings.Contains(err.Error(), mt) {
				t.Errorf("layout source: error %v, want it to name %s and its media type", err, layer)
			}
			if tags := crLayoutTags(t, dst); len(tags) != 0 {
				t.Errorf("destination layout has tags %v", tags)
			}
			repo := "bad/" + strings.NewReplacer(".", "-", "+", "-", "/", "-").Replace(mt)
			crPushLayout(t, c, src, "bad", host, repo, "v1")
			_, _, err = crRun(t, "convert", "--no-db", host+"/"+repo+":v1", host+"/"+repo+":obd")
			if err == nil || !strings.Contains(err.Error(), layer) || !strings.Contains(err.Error(), mt) {
				t.Errorf("registry source: error %v, want it to name %s and its media type", err, layer)
			}
			if tags := crTags(t, host, repo); slices.Contains(tags, "obd") {
				t.Errorf("registry has tag obd after a failed conversion: %v", tags)
			}
		})
	}
}

func TestConvertRegistryAuth(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	host := testenv.Registry(t, crHtpasswd)
	src := "oci:" + helloLayout + ":amd64"
	for _, c := range []struct {
		name  string
		creds []string
	}{
		{"no credentials", nil},
		{"wrong password", []string{"--creds", "obd:wrong"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"convert", "--no-db", "--vsize", "1"}, c.creds...)
			_, _, err := crRun(t, append(args, src, host+"/app:obd")...)
			if err == nil {
				t.Fatal("push to a registry requiring authentication succeeded without valid credentials")
			}
			t.Logf("obd: %v", err)
			for _, want := range []string{"401", "--creds", host} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
			// As a source too.
			_, _, err = crRun(t, append(args, host+"/app:v1", "oci:"+filepath.Join(t.TempDir(), "out"))...)
			if err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "--creds") {
				t.Errorf("source error %v, want it to say 401 and how to pass credentials", err)
			}
		})
	}
	crMust(t, "convert", "--no-db", "--vsize", "1", "--creds", "obd:s3cret", src, host+"/app:obd")
	c := crClient(t, "obd", "s3cret")
	if _, _, err := c.Resolve(context.Background(), host, "app", "obd"); err != nil {
		t.Errorf("with the right credentials: %v", err)
	}
}

// crTmpfs mounts a tmpfs of size bytes on a new directory and unmounts it when the test ends.
func crTmpfs(t *testing.T, size int64) string {
	t.Helper()
	testenv.Root(t)
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		testenv.Skip(t, "cannot mount a tmpfs: "+err.Error())
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func TestConvertDiskFull(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	// One layer of 24 MiB that does not compress, into a work dir of 16 MiB.
	noise := make([]byte, 24<<20)
	rand.Read(noise)
	src := filepath.Join(t.TempDir(), "src")
	crWriteLayout(t, src, "big", [][]byte{crTar(t, map[string][]byte{"etc/hostname": []byte("obd\n")}), crTar(t, map[string][]byte{"data/noise": noise})}, "")
	host := testenv.Registry(t, "")
	for _, dst := range []string{"oci:" + filepath.Join(t.TempDir(), "out") + ":obd", host + "/big:obd"} {
		t.Run(strings.SplitN(dst, ":", 2)[0], func(t *testing.T) {
			work := crTmpfs(t, 16<<20)
			_, stderr, err := crRun(t, "convert", "--db", filepath.Join(t.TempDir(), "convert.db"), "--vsize", "1", "--work-dir", work, "oci:"+src+":big", dst)
			if err == nil {
				t.Fatalf("conversion into a full work dir succeeded:\n%s", stderr)
			}
			t.Logf("obd: %v", err)
			if !strings.Contains(err.Error(), "layer 1 (sha256:") || !strings.Contains(err.Error(), "no space left on device") {
				t.Errorf("error %q, want it to name layer 1 and say no space left on device", err)
			}
			if left := dirNames(t, work); len(left) != 0 {
				t.Errorf("work files left behind: %v", left)
			}
			if strings.HasPrefix(dst, "oci:") {
				if tags := crLayoutTags(t, strings.TrimSuffix(strings.TrimPrefix(dst, "oci:"), ":obd")); len(tags) != 0 {
					t.Errorf("layout tagged %v after a failed conversion", tags)
				}
			} else if tags := crTags(t, host, "big"); len(tags) != 0 {
				t.Errorf("registry tagged %v after a failed conversion", tags)
			}
		})
	}
}

func TestConvertPushFailsMidway(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	host := testenv.Registry(t, "")
	target, _ := url.Parse("http://" + host)
	proxy := httputil.NewSingleHostReverseProxy(target)
	var (
		mu       sync.Mutex
		failed   int
		byDigest []string // manifests pushed by digest
	)
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Manifests pushed by digest (an index's entries) go through; the one pushed under the tag fails.
		if _, ref, ok := strings.Cut(r.URL.Path, "/manifests/"); ok && r.Method == http.MethodPut {
			mu.Lock()
			defer mu.Unlock()
			if !strings.HasPrefix(ref, "sha256:") {
				failed++
				http.Error(w, `{"errors":[{"code":"UNKNOWN","message":"storage backend failed"}]}`, http.StatusInternalServerError)
				return
			}
			byDigest = append(byDigest, ref)
		}
		proxy.ServeHTTP(w, r)
	}))
	defer front.Close()
	frontHost := strings.TrimPrefix(front.URL, "http://")
	for _, args := range [][]string{
		{"oci:" + helloLayout + ":amd64", frontHost + "/app:obd"},
		{"--platform", "all", "oci:" + helloLayout + ":docker-list", frontHost + "/app:all"},
	} {
		_, _, err := crRun(t, append([]string{"convert", "--no-db", "--vsize", "1"}, args...)...)
		t.Logf("obd: %v", err)
		if err == nil || !strings.Contains(err.Error(), "500") || !strings.Contains(err.Error(), "manifest") {
			t.Errorf("obd convert %v: error %v, want a 500 on the manifest push", args, err)
		}
	}
	if failed == 0 {
		t.Fatal("no manifest push reached the proxy")
	}
	if tags := crTags(t, host, "app"); len(tags) != 0 {
		t.Errorf("registry has tags %v after failed pushes", tags)
	}
	// The index's entries did reach the registry, by digest: only the tags are missing.
	mu.Lock()
	defer mu.Unlock()
	if len(byDigest) == 0 {
		t.Fatal("no manifest was pushed by digest")
	}
	for _, dg := range byDigest {
		if status, _ := crGet(t, host, "app/manifests/"+dg); status != http.StatusOK {
			t.Errorf("manifest %s, pushed by digest, is not in the registry: %d", dg, status)
		}
	}
}

// An OCI index with an attestation entry: the attestation is skipped, the result is an OCI index like its source.
func TestConvertAllPlatformsSkipsAttestations(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	crIsolate(t)
	dir := helloCopy(t)
	lay, err := image.OpenLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	amd64, err := lay.Resolve(image.Ref{Tag: "amd64"})
	if err != nil {
		t.Fatal(err)
	}
	arm64, err := lay.Resolve(image.Ref{Tag: "arm64"})
	if err != nil {
		t.Fatal(err)
	}
	amd64.Annotations, arm64.Annotations = nil, map[string]string{
		"vnd.docker.reference.type":   "attestation-manifest",
		"vnd.docker.reference.digest": amd64.Digest.String(),
	}
	arm64.Platform = &ocispec.Platform{OS: "unknown", Architecture: "unknown"}
	ib, _ := json.Marshal(ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{amd64, arm64}})
	id, err := lay.PutBlobBytes(ocispec.MediaTypeImageIndex, ib)
	if err != nil {
		t.Fatal(err)
	}
	if err := lay.Tag("attested", id); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "out")
	stdout, stderr := crMust(t, "convert", "--vsize", "1", "--platform", "all", "oci:"+dir+":attested", "oci:"+dst+":all")
	if !strings.Contains(stderr, "skipping "+arm64.Digest.String()+": attestation-manifest") {
		t.Errorf("no word about the skipped attestation:\n%s", stderr)
	}
	out, _ := image.OpenLayout(dst)
	top, b, err := out.Top(image.Ref{Tag: "all"})
	if err != nil {
		t.Fatal(err)
	}
	idx, err := image.ParseIndex(b)
	if err != nil || !strings.Contains(stdout, top.Digest.String()) || top.MediaType != ocispec.MediaTypeImageIndex || len(idx.Manifests) != 1 || idx.Manifests[0].Platform.Architecture != "amd64" {
		t.Errorf("converted index %+v: %s (%v), want an OCI index of the amd64 image only", top, b, err)
	}
}
