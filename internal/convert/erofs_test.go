package convert

import (
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/internal/verify"
)

// An erofs conversion keeps every attribute of the tar layers (as the kernel's erofs mount presents them, and as
// obd verify reads them), is fsck.erofs clean, labels its layers blob-fs-type erofs, and gives the same digests
// each time.
func TestConvertErofs(t *testing.T) {
	testenv.Root(t)
	tools := testenv.Tools(t, "fsck.erofs", "mount", "umount")
	dir := t.TempDir()
	src := writeSourceLayout(t, filepath.Join(dir, "src"), everyCase(t))
	res := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30, FsType: FsErofs})
	again := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30, FsType: FsErofs})
	for i, b := range res.Blobs {
		if b.Desc.Annotations[image.AnnotationFsType] != FsErofs {
			t.Errorf("layer %d annotations %v, want blob-fs-type erofs", i, b.Desc.Annotations)
		}
		if again.Blobs[i].Desc.Digest != b.Desc.Digest {
			t.Errorf("layer %d: %s, then %s", i, b.Desc.Digest, again.Blobs[i].Desc.Digest)
		}
	}
	out := storeResult(t, res, filepath.Join(dir, "out"), "obd")
	img, err := image.OpenLocal(out, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	raw := filepath.Join(t.TempDir(), "disk.img")
	exportRaw(t, img.Stack, raw)
	if out, err := exec.Command(tools[0], raw).CombinedOutput(); err != nil {
		t.Fatalf("fsck.erofs: %v\n%s", err, out)
	}
	mnt := t.TempDir()
	if out, err := exec.Command(tools[1], "-t", "erofs", "-o", "ro,loop", raw, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	defer func() {
		if out, err := exec.Command(tools[2], mnt).CombinedOutput(); err != nil {
			t.Errorf("umount: %v\n%s", err, out)
		}
	}()
	source, err := image.OpenLocalSource(src, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	want, err := verify.FromSource(t.Context(), source)
	if err != nil {
		t.Fatal(err)
	}
	got, err := verify.FromDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range verify.Compare(want, got, verify.Options{}) {
		t.Error("kernel:", d)
	}
	// obd verify reads the image in userspace.
	got, err = verify.FromStack(img.Stack)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range verify.Compare(want, got, verify.Options{}) {
		t.Error("verify.FromStack:", d)
	}
}
