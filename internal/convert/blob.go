package convert

import (
	"io"

	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// WriteLayer writes the layer file src reads into out from offset 0: compressed into a ZFile with zopts when
// compress is set, wrapped in tar (an image layer blob) when wrap is set. The tar wrapper is written around the
// payload in place, so nothing is staged. It returns the size of the payload (the ZFile when compressed); a
// wrapped blob is tarwrap.WrappedSize of it.
func WriteLayer(out io.WriterAt, src io.Reader, compress, wrap bool, zopts zfile.Options) (int64, error) {
	var off int64
	if wrap {
		off = tarwrap.HeadSize
	}
	w := io.NewOffsetWriter(out, off)
	var n int64
	var err error
	if compress {
		n, err = zfile.CompressOverwrite(w, src, zopts)
	} else {
		n, err = io.CopyBuffer(w, src, make([]byte, 1<<20))
	}
	if err != nil || !wrap {
		return n, err
	}
	if _, err := out.WriteAt(tarwrap.Head(n, tarwrap.DefaultMode), 0); err != nil {
		return n, err
	}
	_, err = out.WriteAt(tarwrap.Tail(n), tarwrap.HeadSize+n)
	return n, err
}
