package main

import (
	"fmt"
	"slices"
	"strings"
)

// workload is what the container runs; its time to ready ends when it prints "ready". Every workload runs on the
// same image (the image's own Cmd is the python one): the command is given to ctr run.
type workload struct {
	name string
	// what it reads, for the report
	desc string
	cmd  []string
}

// gccSource is a small C++ file for the gcc workload: the whole standard library's headers (bits/stdc++.h) and a
// few Boost headers, and templates instantiated and optimized at -O2.
var gccSource = []string{
	"#include <bits/stdc++.h>",
	"#include <boost/algorithm/string.hpp>",
	"#include <boost/lexical_cast.hpp>",
	"template <class T> T total(const std::vector<T>& v) { return std::accumulate(v.begin(), v.end(), T{}); }",
	"int words(const std::string& s) {",
	"  std::vector<std::string> w;",
	"  boost::split(w, s, boost::is_any_of(\" \"));",
	"  std::map<std::string, int> m;",
	"  for (auto& x : w) m[boost::to_upper_copy(x)]++;",
	"  std::vector<int> c;",
	"  for (auto& [k, v] : m) c.push_back(v + boost::lexical_cast<int>(std::to_string(k.size())));",
	"  std::sort(c.begin(), c.end());",
	"  std::unordered_set<int> u(c.begin(), c.end());",
	"  return total(c) + int(u.size());",
	"}",
}

var workloads = []workload{
	{
		name: "python",
		desc: "python3 imports numpy and scipy (the BLAS, LAPACK and Fortran libraries they load): many .py files and shared objects of the python and scipy layers",
		cmd:  appCmd,
	},
	{
		name: "gcc",
		desc: "busybox sh writes a 15-line C++ file and runs g++ -O2 -c on it (bits/stdc++.h and Boost string algorithms): the g++ driver, cc1plus (35 MB, page-faulted), as and libbfd, gcc's shared libraries (isl, mpc, mpfr, gmp, zstd, libc) and many header files, across the layers",
		cmd: append([]string{"/bin/busybox", "sh", "-c",
			`printf '%s\n' "$@" > /tmp/w.cc && g++ -O2 -c /tmp/w.cc -o /tmp/w.o && echo ready`, "sh"}, gccSource...),
	},
	{
		name: "scipy",
		desc: "python3 imports numpy and eight scipy subpackages (optimize, stats, signal, sparse.linalg, integrate, interpolate, spatial, ndimage): most of the scipy layer's shared objects, paged in piece by piece, and hundreds of .py files",
		cmd:  []string{"python3", "-c", "import numpy, scipy, scipy.optimize, scipy.stats, scipy.signal, scipy.sparse.linalg, scipy.integrate, scipy.interpolate, scipy.spatial, scipy.ndimage; print('ready')"},
	},
	{
		name: "walk",
		desc: "busybox du sums the sizes of everything under /usr: nearly every directory and inode of the image (25,700 paths) and no file data, the access pattern of a package manager's or a build tool's scan of a tree",
		cmd:  []string{"/bin/busybox", "sh", "-c", "/bin/busybox du -s /usr > /dev/null && echo ready"},
	},
}

func findWorkload(name string) (*workload, error) {
	i := slices.IndexFunc(workloads, func(w workload) bool { return w.name == name })
	if i < 0 {
		var names []string
		for _, w := range workloads {
			names = append(names, w.name)
		}
		return nil, fmt.Errorf("--workload %q: want one of %s", name, strings.Join(names, ", "))
	}
	return &workloads[i], nil
}

// commandLine renders the workload's command for the report (arguments with spaces quoted).
func (w *workload) commandLine() string {
	var parts []string
	for _, a := range w.cmd {
		if strings.ContainsAny(a, " '\"<>&|;$*") {
			a = fmt.Sprintf("%q", a)
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}
