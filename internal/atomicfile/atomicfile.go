// Package atomicfile replaces files whole: a reader sees the old content or the new, never a part.
package atomicfile

import (
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces path with b, with mode perm, through a temporary file in the same directory.
func Write(path string, b []byte, perm fs.FileMode) error {
	return Replace(path, perm, func(f *os.File) error {
		_, err := f.Write(b)
		return err
	})
}

// Replace replaces path with what fill writes into a temporary file in the same directory, given mode perm. When
// fill fails, path is left as it was and the temporary file is removed.
func Replace(path string, perm fs.FileMode, fill func(f *os.File) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after the rename there is nothing left to remove
	if err := fill(tmp); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
