package measure

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		in := append([]float64(nil), c.in...)
		if got := Median(in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Errorf("Median(%v) reordered its input", c.in)
			}
		}
	}
	if LoadAvg() < 0 {
		t.Error("negative load average")
	}
}

func TestReadDisk(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "stat")
	if err := os.WriteFile(fake, []byte("    1234       56    78900     345        0        0        0        0        0      400      345\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if d, err := ReadDisk(fake); err != nil || d != (DiskReads{Reads: 1234, Bytes: 78900 * 512}) {
		t.Errorf("ReadDisk(fake) = %+v, %v", d, err)
	}
	f, err := DiskOf("/proc/self")
	if err == nil {
		t.Fatalf("DiskOf(/proc/self) = %s, want an error (procfs has no block device)", f)
	}
	f, err = DiskOf(t.TempDir())
	if err != nil {
		t.Skipf("the test directory is not on a block device: %v", err)
	}
	d, err := ReadDisk(f)
	if err != nil {
		t.Fatal(err)
	}
	if d.Reads < 0 || d.Bytes < 0 {
		t.Errorf("ReadDisk(%s) = %+v", f, d)
	}
}

func TestParseCPU(t *testing.T) {
	got, err := parseCPU([]byte("cpu  1000 20 300 90000 450 6 7 0 0 0\ncpu0 500 10 150 45000 225 3 3 0 0 0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := (CPUTimes{Busy: 13.33, IOWait: 4.5}); got != want {
		t.Fatalf("parseCPU = %+v, want %+v", got, want)
	}
	if _, err := parseCPU([]byte("intr 1 2 3\n")); err == nil {
		t.Fatal("parseCPU accepted a file without the cpu line")
	}
}
