package testimage

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Deb is a downloaded Debian package.
type Deb struct {
	Package, Version string
	Path             string
}

// Fetch returns the .deb files of pkgs, downloading the ones not yet in cacheDir with `apt-get download` (running
// `apt-get update` once, as root, when apt does not know a package). Cached files are kept as PACKAGE.deb, so
// later runs use the same bytes even after the archive moves on. Errors wrap ErrUnavailable when apt cannot
// deliver.
func Fetch(ctx context.Context, pkgs []string, cacheDir string, log func(string, ...any)) ([]Deb, error) {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("deb cache %s: %w", cacheDir, err)
	}
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		return nil, fmt.Errorf("%w: dpkg-deb is not installed", ErrUnavailable)
	}
	var missing []string
	for _, p := range pkgs {
		if _, err := os.Stat(filepath.Join(cacheDir, p+".deb")); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		if log != nil {
			log("testimage: apt-get download %d packages into %s", len(missing), cacheDir)
		}
		if err := download(ctx, missing, cacheDir); err != nil {
			return nil, err
		}
	}
	debs := make([]Deb, 0, len(pkgs))
	for _, p := range pkgs {
		file := filepath.Join(cacheDir, p+".deb")
		out, err := exec.CommandContext(ctx, "dpkg-deb", "--showformat=${Package} ${Version}", "--show", file).Output()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w (delete it to download it again)", file, err)
		}
		name, version, _ := strings.Cut(string(out), " ")
		if name != p {
			return nil, fmt.Errorf("%s holds package %q, want %q (delete it to download it again)", file, name, p)
		}
		debs = append(debs, Deb{Package: p, Version: version, Path: file})
	}
	return debs, nil
}

// download fetches pkgs into a scratch directory under cacheDir and moves each into place as PACKAGE.deb.
func download(ctx context.Context, pkgs []string, cacheDir string) error {
	if _, err := exec.LookPath("apt-get"); err != nil {
		return fmt.Errorf("%w: apt-get is not installed", ErrUnavailable)
	}
	tmp, err := os.MkdirTemp(cacheDir, ".download-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	out, err := aptDownload(ctx, tmp, pkgs)
	if err != nil && os.Geteuid() == 0 {
		// The package lists may be missing or stale (a fresh container has none).
		if uout, uerr := aptGet(ctx, "", "update"); uerr != nil {
			return fmt.Errorf("%w: apt-get update: %v\n%s", ErrUnavailable, uerr, uout)
		}
		out, err = aptDownload(ctx, tmp, pkgs)
	}
	if err != nil {
		return fmt.Errorf("%w: apt-get download %s: %v\n%s", ErrUnavailable, strings.Join(pkgs, " "), err, out)
	}
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".deb") {
			continue
		}
		p := filepath.Join(tmp, e.Name())
		name, err := exec.CommandContext(ctx, "dpkg-deb", "--showformat=${Package}", "--show", p).Output()
		if err != nil {
			return fmt.Errorf("downloaded %s: %w", e.Name(), err)
		}
		if err := os.Rename(p, filepath.Join(cacheDir, string(bytes.TrimSpace(name))+".deb")); err != nil {
			return err
		}
	}
	for _, p := range pkgs {
		if _, err := os.Stat(filepath.Join(cacheDir, p+".deb")); err != nil {
			return fmt.Errorf("%w: apt-get download did not deliver %s", ErrUnavailable, p)
		}
	}
	return nil
}

func aptDownload(ctx context.Context, dir string, pkgs []string) ([]byte, error) {
	args := []string{"download"}
	if os.Geteuid() == 0 {
		// apt drops to the _apt user to download, which cannot write into a private scratch directory.
		args = append([]string{"-o", "APT::Sandbox::User=root"}, args...)
	}
	return aptGet(ctx, dir, append(args, pkgs...)...)
}

func aptGet(ctx context.Context, dir string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "apt-get", append([]string{"-q"}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
	return cmd.CombinedOutput()
}
