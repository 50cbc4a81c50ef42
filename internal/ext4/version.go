package ext4

/*
#cgo pkg-config: ext2fs
#include <ext2fs/ext2fs.h>
*/
import "C"

// LibraryVersion is the version of the libext2fs obd runs with (e.g. "1.47.0"). Filesystems written by different
// versions may differ in their bytes, so caches of converted layers key on it.
func LibraryVersion() string {
	var ver, date *C.char
	C.ext2fs_get_library_version(&ver, &date)
	if ver == nil {
		return "unknown"
	}
	return C.GoString(ver)
}
