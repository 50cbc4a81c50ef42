// Package lsmt reads and writes LSMT layer files, the block-diff layers of overlaybd (DADI)
// images, byte-compatible with upstream overlaybd.
//
// A layer maps sectors of a virtual disk to data stored in the layer file through a sorted index
// of 16-byte entries. Read-only layers (committed by Commit, or sealed RW layers) are opened with
// Open and stacked with NewStack; writable layers (upstream's writable_data/writable_index pair,
// or a sparse data file) are created with CreateRW and reopened with OpenRW. Commit compacts any
// of them into the exact bytes upstream's overlaybd-commit produces.
//
// Everything is an io.ReaderAt (and io.WriterAt for writable layers) over caller-owned files;
// the package does no other I/O. See FORMAT.md §2.1 of the project for the byte layout.
package lsmt
