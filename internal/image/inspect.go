package image

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/obdproject/obd/internal/units"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// TarInfo is the tar wrapper of a blob: the member holding the layer.
type TarInfo struct {
	Member string `json:"member"`
	Offset int64  `json:"offset"`
	Size   int64  `json:"size"`
	PAX    bool   `json:"pax"`
}

// ZFileInfo is the ZFile of a blob and whether its block CRCs check.
type ZFileInfo struct {
	Algorithm       string `json:"algorithm"`
	BlockSize       int    `json:"blockSize"`
	Blocks          int64  `json:"blocks"`
	OriginalSize    int64  `json:"originalSize"`
	Verify          bool   `json:"blockCRC"`
	HeaderOverwrite bool   `json:"headerOverwrite"`
	CRCOK           bool   `json:"crcOK"`
	CRCError        string `json:"crcError,omitempty"`
}

// LSMTInfo is the LSMT layer of a blob or layer file.
type LSMTInfo struct {
	Kind         string `json:"kind"`
	UUID         string `json:"uuid"`
	ParentUUID   string `json:"parentUUID"`
	VirtualSize  int64  `json:"virtualSize"`
	IndexEntries int    `json:"indexEntries"`
	ValidEntries int    `json:"validEntries"`
	DataBytes    int64  `json:"dataBytes"`
	UserTag      string `json:"userTag,omitempty"`
}

// BlobInfo says what an overlaybd blob or layer file is, wrapper by wrapper.
type BlobInfo struct {
	Path  string     `json:"path"`
	Size  int64      `json:"size"`
	Tar   *TarInfo   `json:"tar,omitempty"`
	ZFile *ZFileInfo `json:"zfile,omitempty"`
	LSMT  *LSMTInfo  `json:"lsmt,omitempty"`
	Error string     `json:"error,omitempty"`
}

// InspectBlob describes each wrapper of the blob or layer file at path in turn: tar, ZFile (its block CRCs checked),
// LSMT. On error it returns what it learnt so far.
func InspectBlob(path string) (BlobInfo, error) {
	info := BlobInfo{Path: path}
	f, err := os.Open(path)
	if err != nil {
		return info, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return info, err
	}
	info.Size = st.Size()
	var r io.ReaderAt = f
	size := st.Size()
	m, err := tarwrap.Detect(f, size)
	switch {
	case err == nil:
		info.Tar = &TarInfo{Member: m.Name, Offset: m.Offset, Size: m.Size, PAX: m.PAX}
		r, size = io.NewSectionReader(f, m.Offset, m.Size), m.Size
	case !errors.Is(err, tarwrap.ErrNotWrapped):
		return info, fmt.Errorf("%s: %w", path, err)
	}
	isZ, err := zfile.IsZFile(r)
	if err != nil {
		return info, fmt.Errorf("%s: %w", path, err)
	}
	if isZ {
		z, err := zfile.Open(r, size, false)
		if err != nil {
			return info, fmt.Errorf("%s: %w", path, err)
		}
		zi := z.Info()
		info.ZFile = &ZFileInfo{
			Algorithm: zi.Algorithm.String(), BlockSize: zi.BlockSize, Blocks: zi.Blocks,
			OriginalSize: zi.OriginalSize, Verify: zi.Verify, HeaderOverwrite: zi.HeaderOverwrite,
		}
		if err := z.Check(); err != nil {
			info.ZFile.CRCError = err.Error()
			return info, fmt.Errorf("%s: %w", path, err)
		}
		info.ZFile.CRCOK = zi.Verify
		r, size = z, z.Size()
	}
	kind, err := lsmt.Kind(r, size)
	if err != nil {
		if info.Tar == nil && info.ZFile == nil {
			return info, fmt.Errorf("%s: not an overlaybd blob or layer file (no tar wrapper, ZFile or LSMT layer in it): %w", path, err)
		}
		return info, fmt.Errorf("%s: %w", path, err)
	}
	switch kind {
	case lsmt.KindRWData, lsmt.KindRWIndex, lsmt.KindSparseRW:
		// A writable layer's file: its header says what it is; its content needs the other file of the pair.
		b := make([]byte, lsmt.HeaderSize)
		if _, err := r.ReadAt(b, 0); err != nil {
			return info, fmt.Errorf("%s: read LSMT header: %w", path, err)
		}
		h, err := lsmt.ParseHeader(b)
		if err != nil {
			return info, fmt.Errorf("%s: %w", path, err)
		}
		info.LSMT = &LSMTInfo{Kind: kind, UUID: h.UUID, ParentUUID: h.ParentUUID, VirtualSize: int64(h.VirtualSize), UserTag: h.UserTag}
		return info, nil
	}
	l, err := lsmt.Open(r, size)
	if err != nil {
		return info, fmt.Errorf("%s: LSMT layer: %w", path, err)
	}
	h := l.Header()
	info.LSMT = &LSMTInfo{
		Kind: kind, UUID: h.UUID, ParentUUID: h.ParentUUID, VirtualSize: l.VirtualSize(),
		IndexEntries: l.RawIndexEntries(), ValidEntries: len(l.Index()), DataBytes: l.DataSectors() * lsmt.SectorSize,
		UserTag: h.UserTag,
	}
	return info, nil
}

// WriteText writes info for people, as 'obd inspect' prints it: a line per wrapper.
func (info BlobInfo) WriteText(w io.Writer) {
	fmt.Fprintf(w, "blob:        %s (%d bytes)\n", info.Path, info.Size)
	if t := info.Tar; t != nil {
		pax := ""
		if t.PAX {
			pax = ", pax header"
		}
		fmt.Fprintf(w, "tar wrapper: member %q at offset %d, %d bytes%s\n", t.Member, t.Offset, t.Size, pax)
	} else {
		fmt.Fprintf(w, "tar wrapper: none\n")
	}
	if z := info.ZFile; z != nil {
		crc := "no block CRCs"
		switch {
		case z.CRCError != "":
			crc = "CRC ERROR: " + z.CRCError
		case z.CRCOK:
			crc = "all block CRCs ok"
		}
		hdr := "trailer"
		if z.HeaderOverwrite {
			hdr = "header overwrite"
		}
		fmt.Fprintf(w, "zfile:       %s, %d-byte blocks, %d blocks, original size %d bytes (%s), %s\n",
			z.Algorithm, z.BlockSize, z.Blocks, z.OriginalSize, hdr, crc)
	} else {
		fmt.Fprintf(w, "zfile:       none\n")
	}
	if l := info.LSMT; l != nil {
		fmt.Fprintf(w, "lsmt:        %s layer, virtual size %s\n", l.Kind, units.Bytes(l.VirtualSize))
		fmt.Fprintf(w, "  uuid:      %s\n  parent:    %s\n", l.UUID, l.ParentUUID)
		switch l.Kind {
		case lsmt.KindRWData, lsmt.KindRWIndex, lsmt.KindSparseRW:
			fmt.Fprintf(w, "  writable:  one file of a writable layer; 'obd layer commit' turns it (with its pair) into a layer\n")
		default:
			fmt.Fprintf(w, "  index:     %d valid of %d entries\n  data:      %d bytes\n", l.ValidEntries, l.IndexEntries, l.DataBytes)
		}
		if l.UserTag != "" {
			fmt.Fprintf(w, "  tag:       %q\n", l.UserTag)
		}
	}
}
