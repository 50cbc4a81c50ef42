package convert

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// Single layer files, as upstream's overlaybd-create, overlaybd-commit and overlaybd-zfile make them ('obd layer').

// CreateLayerFiles creates an empty writable layer of vsize bytes in the new files data and index. On error it
// removes the files it created.
func CreateLayerFiles(data, index string, vsize int64, opts lsmt.CreateOptions) error {
	df, err := os.OpenFile(data, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer df.Close()
	xf, err := os.OpenFile(index, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		os.Remove(data)
		return err
	}
	defer xf.Close()
	rw, err := lsmt.CreateRW(df, xf, vsize, opts)
	if err == nil {
		err = rw.Close()
	}
	if err != nil {
		os.Remove(data)
		os.Remove(index)
		return err
	}
	return nil
}

// CommitLayerFiles compacts the writable layer in the files data and index into a committed layer file at out
// (WriteLayerFile); with seal it seals the writable layer in place instead (its index appended to data) and
// writes nothing.
func CommitLayerFiles(data, index, out string, seal bool, opts lsmt.CommitOptions, compress, wrap bool, zopts zfile.Options) error {
	df, err := os.OpenFile(data, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer df.Close()
	xf, err := os.OpenFile(index, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer xf.Close()
	rw, err := lsmt.OpenRW(df, xf)
	if err != nil {
		return fmt.Errorf("%s, %s: %w", data, index, err)
	}
	defer rw.Close()
	if seal {
		_, err := rw.Seal()
		return err
	}
	committed, err := lsmt.NewCommitReader(rw, opts)
	if err != nil {
		return err
	}
	return WriteLayerFile(out, committed, compress, wrap, zopts)
}

// CompressLayerFile compresses the layer file in into a ZFile at out, tar-wrapped with wrap.
func CompressLayerFile(in, out string, wrap bool, zopts zfile.Options) error {
	f, err := os.Open(in)
	if err != nil {
		return err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return err
	} else if st.IsDir() {
		return fmt.Errorf("%s is a directory, not a layer file", in)
	}
	return WriteLayerFile(out, f, true, wrap, zopts)
}

// DecompressLayerFile decompresses the ZFile in (tar-wrapped or not), its block CRCs checked, into the layer file
// out.
func DecompressLayerFile(in, out string) error {
	f, err := os.Open(in)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	sr, err := tarwrap.Open(f, st.Size())
	if err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	z, err := zfile.Open(sr, sr.Size(), true)
	if err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	return WriteLayerFile(out, errorPrefix{io.NewSectionReader(z, 0, z.Size()), in}, false, false, zfile.Options{})
}

// WriteLayerFile writes the layer file src reads to path (WriteLayer): compressed into a ZFile and/or tar-wrapped
// as asked. It writes a temporary file beside path, renamed to path once complete.
func WriteLayerFile(path string, src io.Reader, compress, wrap bool, zopts zfile.Options) error {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return fmt.Errorf("%s is a directory; give the path of the file to write", path)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = WriteLayer(f, src, compress, wrap, zopts)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// errorPrefix prefixes the errors of a reader with the name of what it reads.
type errorPrefix struct {
	r    io.Reader
	name string
}

func (e errorPrefix) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("%s: %w", e.name, err)
	}
	return n, err
}
