// Package image is obd's model of container images: references, OCI image layouts, manifests and the overlaybd
// annotations that turn a manifest's layers into a stack of block-diff layers.
package image

import (
	"fmt"
	"strings"

	digest "github.com/opencontainers/go-digest"
)

// Transport says where an image lives.
type Transport string

// Supported transports.
const (
	TransportOCI           Transport = "oci"            // an OCI image layout directory
	TransportDockerArchive Transport = "docker-archive" // a `docker save` tar file
	TransportRegistry      Transport = "registry"       // a distribution registry
)

// Ref is a parsed image reference.
type Ref struct {
	Transport Transport
	// Path is the layout directory or archive file (local transports).
	Path string
	// Name is host[:port]/repository for registry references.
	Name string
	// Tag, or Digest, selects the image; at most one of them is set for a parsed reference.
	Tag    string
	Digest digest.Digest
}

// String formats the reference in the syntax ParseRef reads.
func (r Ref) String() string {
	sel := ""
	switch {
	case r.Digest != "" && r.Transport == TransportRegistry:
		sel = "@" + r.Digest.String()
	case r.Digest != "":
		sel = ":@" + r.Digest.String()
	case r.Tag != "":
		sel = ":" + r.Tag
	}
	switch r.Transport {
	case TransportRegistry:
		return r.Name + sel
	default:
		return string(r.Transport) + ":" + r.Path + sel
	}
}

// ParseRef parses an image reference:
//
//	oci:DIR[:TAG|:@DIGEST]              an OCI image layout (TAG defaults to "latest")
//	docker-archive:FILE[:TAG]           a docker-save archive
//	HOST[:PORT]/REPO[:TAG|@DIGEST]      a registry (TAG defaults to "latest")
func ParseRef(s string) (Ref, error) {
	if s == "" {
		return Ref{}, fmt.Errorf("empty image reference")
	}
	for _, t := range []Transport{TransportOCI, TransportDockerArchive} {
		rest, ok := strings.CutPrefix(s, string(t)+":")
		if !ok {
			continue
		}
		r := Ref{Transport: t, Path: rest}
		if i := strings.LastIndex(rest, ":@"); i >= 0 {
			dg, err := digest.Parse(rest[i+2:])
			if err != nil {
				return Ref{}, fmt.Errorf("image reference %q: %w", s, err)
			}
			r.Path, r.Digest = rest[:i], dg
		} else if i := strings.LastIndex(rest, ":"); i >= 0 && !strings.Contains(rest[i:], "/") {
			r.Path, r.Tag = rest[:i], rest[i+1:]
		}
		if r.Path == "" {
			return Ref{}, fmt.Errorf("image reference %q: missing path after %q", s, t+":")
		}
		if r.Tag == "" && r.Digest == "" && t == TransportOCI {
			r.Tag = "latest"
		}
		return r, nil
	}
	r := Ref{Transport: TransportRegistry, Name: s}
	if name, d, ok := strings.Cut(s, "@"); ok {
		dg, err := digest.Parse(d)
		if err != nil {
			return Ref{}, fmt.Errorf("image reference %q: %w", s, err)
		}
		r.Name, r.Digest = name, dg
	} else if i := strings.LastIndex(s, ":"); i > strings.LastIndex(s, "/") {
		r.Name, r.Tag = s[:i], s[i+1:]
	}
	if r.Tag == "" && r.Digest == "" {
		r.Tag = "latest"
	}
	host, repo, ok := strings.Cut(r.Name, "/")
	if !ok || host == "" || repo == "" || !(strings.ContainsAny(host, ".:") || host == "localhost") {
		return Ref{}, fmt.Errorf("image reference %q: want HOST[:PORT]/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or docker-archive:FILE", s)
	}
	if strings.ToLower(repo) != repo || strings.ContainsAny(repo, " \t@:") {
		return Ref{}, fmt.Errorf("image reference %q: repository %q must be lowercase with no spaces", s, repo)
	}
	if r.Tag != "" && !validTag(r.Tag) {
		return Ref{}, fmt.Errorf("image reference %q: invalid tag %q", s, r.Tag)
	}
	return r, nil
}

// Host is the registry host[:port] of a registry reference.
func (r Ref) Host() string { h, _, _ := strings.Cut(r.Name, "/"); return h }

// Repository is the repository path of a registry reference (without host).
func (r Ref) Repository() string { _, p, _ := strings.Cut(r.Name, "/"); return p }

func validTag(t string) bool {
	if len(t) > 128 {
		return false
	}
	for i, c := range t {
		ok := c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && (c == '.' || c == '-')
		if !ok {
			return false
		}
	}
	return true
}
