#!/usr/bin/env bash
# End-to-end demo on local defaults: open an overlaybd image converted by upstream's tools, export its virtual
# disk, check the filesystem and run the program it contains. Everything happens in a private temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
obd=bin/obd
work=$(mktemp -d -t obd-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
image=oci:testdata/upstream/hello-world-oci:amd64-converted
blob=testdata/upstream/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d

step() { printf '\n== %s\n' "$*"; }
t0=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms"; }

step "1. What is in an upstream overlaybd layer blob?"
$obd inspect "$blob"

step "2. Stack the image's layers and export its virtual disk (sparse) — $image"
$obd export-raw "$image" "$work/disk.img"
printf 'virtual size %s, allocated on disk %s\n' "$(du -h --apparent-size "$work/disk.img" | cut -f1)" "$(du -h "$work/disk.img" | cut -f1)"

step "3. The disk is a clean ext4 filesystem (e2fsck -fn)"
e2fsck -fn "$work/disk.img"

step "4. Run /hello from inside it"
debugfs -R "dump /hello $work/hello" "$work/disk.img" 2>/dev/null
chmod +x "$work/hello"
"$work/hello" | head -3

step "done in $(elapsed)"
