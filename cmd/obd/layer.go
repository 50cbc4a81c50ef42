package main

import (
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/lz4c"
	"github.com/obdproject/obd/lsmt"
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
	algo, err := zfile.ParseAlgorithm(z.algorithm)
	if err != nil {
		return zfile.Options{}, fmt.Errorf("--algorithm: %w", err)
	}
	o := zfile.Options{Algorithm: algo, BlockSize: z.blockSize, Workers: z.threads, LZ4Batch: lz4c.Batch}
	if err := o.Validate(); err != nil {
		return o, fmt.Errorf("--block-size: %w", err)
	}
	return o, nil
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
			return convert.CreateLayerFiles(args[0], args[1], gb<<30, lsmt.CreateOptions{UUID: uuid, ParentUUID: parent, Sparse: sparse})
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
			return convert.CommitLayerFiles(args[0], args[1], args[2], seal, lsmt.CommitOptions{UUID: uuid, ParentUUID: parent, UserTag: tag}, compress, wrap, zopts)
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
			return convert.CompressLayerFile(args[0], args[1], wrap, zopts)
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
			return convert.DecompressLayerFile(args[0], args[1])
		},
	}
}
