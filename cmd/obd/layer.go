package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/lz4c"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

func newLayerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "layer",
		Short: "Create, commit and compress single overlaybd layer files (upstream's overlaybd-create/commit/zfile)",
	}
	cmd.AddCommand(newLayerCreateCmd(), newLayerCommitCmd(), newLayerZfileCmd(), newLayerUnzfileCmd())
	return cmd
}

type zfileFlags struct {
	algorithm string
	blockSize int
	threads   int
}

// register adds the flags, defaulting to def (the zero Options: LZ4 in 4 KiB blocks, upstream's defaults).
func (z *zfileFlags) register(cmd *cobra.Command, def zfile.Options) {
	algo, bs := "lz4", 4096
	if def.Algorithm == zfile.AlgoZSTD {
		algo = "zstd"
	}
	if def.BlockSize != 0 {
		bs = def.BlockSize
	}
	cmd.Flags().StringVar(&z.algorithm, "algorithm", algo, "compression: lz4 or zstd")
	cmd.Flags().IntVar(&z.blockSize, "block-size", bs, "ZFile block size in bytes: 4096, 8192, 16384, 32768 or 65536")
	cmd.Flags().IntVar(&z.threads, "threads", 2, "compression workers (output is identical for any number)")
}

func (z *zfileFlags) options() (zfile.Options, error) {
	var algo zfile.Algorithm
	switch z.algorithm {
	case "lz4":
		algo = zfile.AlgoLZ4
	case "zstd":
		algo = zfile.AlgoZSTD
	default:
		return zfile.Options{}, fmt.Errorf("--algorithm %q: want lz4 or zstd", z.algorithm)
	}
	switch z.blockSize {
	case 4096, 8192, 16384, 32768, 65536:
	default:
		return zfile.Options{}, fmt.Errorf("--block-size %d: want 4096, 8192, 16384, 32768 or 65536", z.blockSize)
	}
	return zfile.Options{Algorithm: algo, BlockSize: z.blockSize, Workers: z.threads, LZ4Batch: lz4c.Batch}, nil
}

func newLayerCreateCmd() *cobra.Command {
	var sparse bool
	var uuid, parent string
	cmd := &cobra.Command{
		Use:   "create DATA INDEX VSIZE_GB",
		Short: "Create an empty writable layer (files DATA and INDEX) with a virtual size in GiB",
		Args:  cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			// strconv, not fmt.Sscan: Sscan stops at the first byte that is not a digit, so "1.5" or "2GB" passed.
			gb, err := strconv.ParseInt(args[2], 10, 64)
			if err != nil || gb <= 0 || gb > 1<<14 {
				return fmt.Errorf("virtual size %q: want a whole number of GiB between 1 and 16384", args[2])
			}
			data, err := os.OpenFile(args[0], os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				return err
			}
			defer data.Close()
			index, err := os.OpenFile(args[1], os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				os.Remove(args[0])
				return err
			}
			defer index.Close()
			rw, err := lsmt.CreateRW(data, index, gb<<30, lsmt.CreateOptions{UUID: uuid, ParentUUID: parent, Sparse: sparse})
			if err == nil {
				err = rw.Close()
			}
			if err != nil {
				os.Remove(args[0])
				os.Remove(args[1])
				return err
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&sparse, "sparse", "s", false, "sparse data file (payload at its LBA) instead of append-only")
	cmd.Flags().StringVar(&uuid, "uuid", "", "layer UUID (default: random)")
	cmd.Flags().StringVar(&parent, "parent-uuid", "", "parent layer UUID (default: none)")
	return cmd
}

func newLayerCommitCmd() *cobra.Command {
	var (
		compress, wrap, seal bool
		uuid, parent, tag    string
		zf                   zfileFlags
	)
	cmd := &cobra.Command{
		Use:   "commit DATA INDEX OUT",
		Short: "Compact a writable layer into a read-only layer file (optionally compressed and tar-wrapped)",
		Long: `Compact a writable layer into a read-only committed layer, byte-for-byte as upstream's overlaybd-commit does.
-z compresses it into a ZFile, -t wraps the result in tar so it can be pushed as an image layer blob.
--seal instead seals the writable layer in place (index appended to DATA) and writes nothing to OUT.`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			zopts, err := zf.options()
			if err != nil {
				return err
			}
			data, err := os.OpenFile(args[0], os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer data.Close()
			index, err := os.OpenFile(args[1], os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer index.Close()
			rw, err := lsmt.OpenRW(data, index)
			if err != nil {
				return fmt.Errorf("%s, %s: %w", args[0], args[1], err)
			}
			defer rw.Close()
			if seal {
				_, err := rw.Seal()
				return err
			}
			committed, err := lsmt.NewCommitReader(rw, lsmt.CommitOptions{UUID: uuid, ParentUUID: parent, UserTag: tag})
			if err != nil {
				return err
			}
			return writeLayerFile(args[2], committed, compress, wrap, zopts)
		},
	}
	cmd.Flags().BoolVarP(&compress, "compress", "z", false, "compress into a ZFile")
	cmd.Flags().BoolVarP(&wrap, "tar", "t", false, "wrap in tar (an image layer blob)")
	cmd.Flags().BoolVar(&seal, "seal", false, "seal the writable layer in place instead of committing")
	cmd.Flags().StringVar(&uuid, "uuid", "", "UUID of the committed layer (default: null UUID, like upstream)")
	cmd.Flags().StringVar(&parent, "parent-uuid", "", "parent UUID (default: the writable layer's parent)")
	cmd.Flags().StringVarP(&tag, "message", "m", "", "commit message stored in the layer header (≤256 bytes)")
	zf.register(cmd, zfile.Options{})
	return cmd
}

func newLayerZfileCmd() *cobra.Command {
	var wrap bool
	var zf zfileFlags
	cmd := &cobra.Command{
		Use:   "zfile IN OUT",
		Short: "Compress a layer file into a ZFile (upstream's overlaybd-zfile)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			zopts, err := zf.options()
			if err != nil {
				return err
			}
			in, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer in.Close()
			if st, err := in.Stat(); err != nil {
				return err
			} else if st.IsDir() {
				return fmt.Errorf("%s is a directory, not a layer file", args[0])
			}
			return writeLayerFile(args[1], in, true, wrap, zopts)
		},
	}
	cmd.Flags().BoolVarP(&wrap, "tar", "t", false, "wrap in tar (an image layer blob)")
	zf.register(cmd, zfile.Options{})
	return cmd
}

func newLayerUnzfileCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "unzfile IN OUT",
		Short: "Decompress a ZFile (tar-wrapped or not) back into the layer file",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			in, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer in.Close()
			st, err := in.Stat()
			if err != nil {
				return err
			}
			sr, err := tarwrap.Open(in, st.Size())
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			z, err := zfile.Open(sr, sr.Size(), true)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			return writeLayerFile(args[1], errorPrefix{io.NewSectionReader(z, 0, z.Size()), args[0]}, false, false, zfile.Options{})
		},
	}
}

// writeLayerFile writes the layer file src reads to path (convert.WriteLayer): compressed into a ZFile and/or
// tar-wrapped as asked. It writes a temporary file beside path, renamed to path once complete.
func writeLayerFile(path string, src io.Reader, compress, wrap bool, zopts zfile.Options) error {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return fmt.Errorf("%s is a directory; give the path of the file to write", path)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = convert.WriteLayer(f, src, compress, wrap, zopts)
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
