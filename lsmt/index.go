package lsmt

import "math/bits"

// fanout is the number of keys per node of the lookup tree.
const fanout = 16

// segIndex is an immutable, sorted, non-overlapping index with fast point lookups.
//
// Besides the entries (16 bytes each) it keeps a static search tree over their end sectors
// (an S-tree): keys[0] holds every entry's end, keys[1] the end of every node of fanout keys of
// keys[0], and so on up to a single root node; each level is padded to whole nodes with the
// maximum key. A lookup does a branchless 4-step binary search in one node per level. With
// 32-bit keys (used whenever every end fits, i.e. disks below 2 TiB) a node is one 64-byte cache
// line; the upper levels stay cache resident, and the short branch-free instruction stream lets
// the CPU overlap the cache misses of consecutive lookups. The tree costs 4 × (1 + 1/16 + …) ≈
// 4.3 bytes per segment (8.5 with 64-bit keys) on top of the 16-byte entry.
type segIndex struct {
	ents   []mapping
	keys32 [][]uint32 // used when every end < 2^32
	keys64 [][]uint64 // used otherwise
	maxEnd uint64     // end of the last entry (0 when empty)
	data   uint64     // sectors of non-zeroed data referenced
}

type keyType interface{ ~uint32 | ~uint64 }

// buildLevels builds the padded key levels over n per-entry ends.
func buildLevels[K keyType](n int, end func(i int) K) [][]K {
	max := ^K(0)
	var levels [][]K
	real := n
	keys := makeIndexSlice[K](max1((n + fanout - 1) / fanout * fanout))
	for i := range keys {
		if i < n {
			keys[i] = end(i)
		} else {
			keys[i] = max
		}
	}
	for {
		levels = append(levels, keys)
		if real <= fanout {
			return levels
		}
		nodes := len(keys) / fanout
		up := makeIndexSlice[K]((nodes + fanout - 1) / fanout * fanout)
		for i := range up {
			if i < nodes {
				up[i] = keys[min(i*fanout+fanout-1, real-1)]
			} else {
				up[i] = max
			}
		}
		keys, real = up, nodes
	}
}

// max1 rounds an empty level up to one node.
func max1(n int) int { return max(n, fanout) }

// newSegIndex builds the lookup structure over ents, which must be sorted, non-overlapping and
// free of empty entries. It takes ownership of ents.
func newSegIndex(ents []mapping) *segIndex {
	x := &segIndex{ents: ents}
	for _, m := range ents {
		if !m.zeroed() {
			x.data += uint64(m.length())
		}
	}
	if n := len(ents); n > 0 {
		x.maxEnd = ents[n-1].end()
	}
	if x.maxEnd < 1<<32 {
		x.keys32 = buildLevels(len(ents), func(i int) uint32 { return uint32(ents[i].end()) })
	} else {
		x.keys64 = buildLevels(len(ents), func(i int) uint64 { return ents[i].end() })
	}
	return x
}

// len returns the number of entries.
func (x *segIndex) len() int { return len(x.ents) }

// find returns the index of the first entry whose end is greater than lba (the entry containing
// lba, or the next one after a gap), or len() when there is none.
func (x *segIndex) find(lba uint64) int {
	if lba >= x.maxEnd {
		return len(x.ents)
	}
	// Below the root, every node's last key is > lba (it equals the parent's key that selected
	// it), so the number of keys <= lba in a node, found by the binary search, is < fanout.
	j := 0
	if x.keys32 != nil {
		for l := len(x.keys32) - 1; l >= 0; l-- {
			node := (*[fanout]uint32)(x.keys32[l][j*fanout:])
			i := le32(node[7], lba, 8)
			i += le32(node[(i+3)&15], lba, 4)
			i += le32(node[(i+1)&15], lba, 2)
			i += le32(node[i&15], lba, 1)
			j = j*fanout + i
		}
		return j
	}
	for l := len(x.keys64) - 1; l >= 0; l-- {
		node := (*[fanout]uint64)(x.keys64[l][j*fanout:])
		i := le64(node[7], lba, 8)
		i += le64(node[(i+3)&15], lba, 4)
		i += le64(node[(i+1)&15], lba, 2)
		i += le64(node[i&15], lba, 1)
		j = j*fanout + i
	}
	return j
}

// le32 returns n if k <= lba and 0 otherwise, without a branch (k and lba below 2^32).
func le32(k uint32, lba uint64, n int) int {
	return int(((lba-uint64(k))>>63 - 1) & uint64(n))
}

// le64 returns n if k <= lba and 0 otherwise, without a branch.
func le64(k, lba uint64, n int) int {
	_, b := bits.Sub64(lba, k, 0) // borrow iff k > lba
	return int((b - 1) & uint64(n))
}

// memBytes returns the memory held by the index, in bytes.
func (x *segIndex) memBytes() int {
	n := cap(x.ents) * EntrySize
	for _, l := range x.keys32 {
		n += cap(l) * 4
	}
	for _, l := range x.keys64 {
		n += cap(l) * 8
	}
	return n
}
