package device

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestEncodeID(t *testing.T) {
	for _, id := range []string{"a", "default/12/sha256:ab12", ".", "..", ".hidden", "a.b", "100%", "x y\tz\n", "é", "-_-"} {
		name := encodeID(id)
		for _, c := range []byte(name) {
			if c == '/' || c == 0 {
				t.Errorf("encodeID(%q) = %q contains %q", id, name, c)
			}
		}
		if name == "." || name == ".." {
			t.Errorf("encodeID(%q) = %q", id, name)
		}
		if got, ok := decodeID(name); !ok || got != id {
			t.Errorf("decodeID(encodeID(%q)) = %q, %v", id, got, ok)
		}
	}
	for _, name := range []string{"", "%", "%4", "%zz", "%61", "a/b", ".x"} {
		if id, ok := decodeID(name); ok {
			t.Errorf("decodeID(%q) = %q, want not ok", name, id)
		}
	}
}

func TestDeviceDir(t *testing.T) {
	if _, err := deviceDir("relative", "x"); err == nil {
		t.Error("relative state directory accepted")
	}
	if _, err := deviceDir("/state", ""); err == nil {
		t.Error("empty id accepted")
	}
	long := make([]byte, 100)
	for i := range long {
		long[i] = '/'
	}
	if _, err := deviceDir("/state", string(long)); err == nil {
		t.Error("id longer than a file name accepted")
	}
	if d, err := deviceDir("/state/", "k8s.io/1/x"); err != nil || d != "/state/k8s.io%2F1%2Fx" {
		t.Errorf("deviceDir = %q, %v", d, err)
	}
}

func TestParseMountInfo(t *testing.T) {
	data := []byte(`22 27 0:21 / /proc rw,relatime - proc proc rw
36 35 7:3 / /mnt/with\040space rw,noatime master:1 - ext4 /dev/loop3 ro
37 35 0:52 / /state/a%2Fb/disk rw,nosuid,nodev shared:7 - fuse.obd obd rw,user_id=0,group_id=0
`)
	got, err := parseMountInfo(data)
	if err != nil {
		t.Fatal(err)
	}
	want := []mountEntry{
		{dev: unix.Mkdev(0, 21), mountPoint: "/proc", fsType: "proc", source: "proc"},
		{dev: unix.Mkdev(7, 3), mountPoint: "/mnt/with space", fsType: "ext4", source: "/dev/loop3"},
		{dev: unix.Mkdev(0, 52), mountPoint: "/state/a%2Fb/disk", fsType: "fuse.obd", source: "obd"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d entries, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	if mps := mountsOf(got, unix.Mkdev(7, 3)); len(mps) != 1 || mps[0] != "/mnt/with space" {
		t.Errorf("mountsOf = %q", mps)
	}
	if countFUSEMounts(got, "/state/a%2Fb/disk") != 1 {
		t.Error("FUSE mount not counted")
	}
	for _, bad := range []string{"garbage\n", "1 2 x / /m rw - ext4 /dev/x rw\n", "1 2 7:3 / /m rw\n"} {
		if _, err := parseMountInfo([]byte(bad)); err == nil {
			t.Errorf("parseMountInfo(%q) succeeded", bad)
		}
	}
	if s := unescapeMountInfo(`a\134b\040c\0`); s != `a\b c\0` {
		t.Errorf("unescapeMountInfo = %q", s)
	}
}

func TestParseMountOptions(t *testing.T) {
	tests := []struct {
		opts  []string
		flags uintptr
		data  string
	}{
		{nil, 0, ""},
		{[]string{"ro", "noatime", "errors=remount-ro"}, unix.MS_RDONLY | unix.MS_NOATIME, "errors=remount-ro"},
		{[]string{"ro", "rw", "nosuid", "norecovery", "defaults"}, unix.MS_NOSUID, "norecovery"},
	}
	for _, tt := range tests {
		flags, data := parseMountOptions(tt.opts)
		if flags != tt.flags || data != tt.data {
			t.Errorf("parseMountOptions(%q) = %#x, %q; want %#x, %q", tt.opts, flags, data, tt.flags, tt.data)
		}
	}
}
