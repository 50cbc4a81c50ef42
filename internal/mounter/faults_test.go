package mounter

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
)

// pushBlob uploads blob to repo of the registry at host (monolithic upload).
func pushBlob(t *testing.T, host, repo string, blob []byte) {
	t.Helper()
	resp, err := http.Post("http://"+host+"/v2/"+repo+"/blobs/uploads/", "application/octet-stream", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusAccepted || loc == "" {
		t.Fatalf("start upload: %s", resp.Status)
	}
	sep := "?"
	if bytes.ContainsRune([]byte(loc), '?') {
		sep = "&"
	}
	if loc[0] == '/' {
		loc = "http://" + host + loc
	}
	req, err := http.NewRequest(http.MethodPut, loc+sep+"digest="+digest.FromBytes(blob).String(), bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("finish upload: %s", resp.Status)
	}
}

// TestRegistryFaults runs every fault of testenv.FaultProxy in front of a real registry, while an image is opened
// and while its files are read, transient (the next requests) and persistent (every request until cleared). What
// must hold: a transient fault is invisible (the file reads right); a persistent one gives a clear error within the
// retry budget, never wrong data; and nothing bad is kept: once the fault is cleared, the same cache directory —
// also after a restart — serves the image correctly without anyone deleting anything.
func TestRegistryFaults(t *testing.T) {
	needSystem(t)
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	want := helloBinary(t)
	up := testenv.Registry(t, "")
	pushBlob(t, up, "faults/hello", blob)
	proxy := testenv.NewFaultProxy(t, up)
	layers := []snapshotter.Layer{{Digest: blobDigest, Size: int64(len(blob)), ImageRef: proxy.Host() + "/faults/hello:obd"}}
	const budget = 3 * time.Second
	newMounter := func(s *setup) *Mounter {
		return s.newMounter(mounterOptions{host: proxy.Host(), retryBudget: budget, requestTimeout: budget / 6,
			refresh: func(string) bool { return true }, cache: s.openCacheReadahead(16<<10, -1)})
	}
	// readsRight mounts the image with a fresh Mounter over the setup's cache directory and reads /hello.
	readsRight := func(t *testing.T, s *setup, id string) {
		t.Helper()
		m := newMounter(s)
		target := filepath.Join(s.root, id)
		if err := s.mount(m, id, layers, target); err != nil {
			t.Fatalf("mount after the fault was cleared: %v", err)
		}
		if b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute); err != nil || !bytes.Equal(b, want) {
			t.Fatalf("read after the fault was cleared: %d bytes, %v (equal %v)", len(b), err, bytes.Equal(b, want))
		}
		if err := m.Unmount(context.Background(), id, target); err != nil {
			t.Fatal(err)
		}
	}

	for _, f := range testenv.AllFaults {
		transient := 2
		if f == testenv.FaultUnauthorized {
			transient = 1 // fresh credentials are asked for once, then the request is repeated
		}
		for _, phase := range []string{"open", "read"} {
			t.Run(fmt.Sprintf("%s/transient-at-%s", f, phase), func(t *testing.T) {
				s := newSetup(t)
				m := newMounter(s)
				target := filepath.Join(s.root, "mnt")
				spoiled := proxy.Spoiled.Load()
				if phase == "open" {
					proxy.Spoil(f, transient)
				}
				err := s.mount(m, "img", layers, target)
				if phase == "read" {
					proxy.Spoil(f, transient)
				}
				defer proxy.Spoil(testenv.FaultNone, 0)
				if err != nil {
					t.Fatalf("mount with a transient %s: %v", f, err)
				}
				b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute)
				if err != nil || !bytes.Equal(b, want) {
					t.Fatalf("read with a transient %s: %d bytes, %v (equal %v)", f, len(b), err, bytes.Equal(b, want))
				}
				if proxy.Spoiled.Load() == spoiled {
					t.Fatalf("no request got the fault: the test did not test it")
				}
				proxy.Spoil(testenv.FaultNone, 0)
				if err := m.Unmount(context.Background(), "img", target); err != nil {
					t.Fatal(err)
				}
				readsRight(t, s, "again")
			})
		}
		t.Run(fmt.Sprintf("%s/persistent-at-open", f), func(t *testing.T) {
			s := newSetup(t)
			m := newMounter(s)
			target := filepath.Join(s.root, "mnt")
			proxy.Spoil(f, -1)
			defer proxy.Spoil(testenv.FaultNone, 0)
			start := time.Now()
			err := s.mount(m, "img", layers, target)
			took := time.Since(start)
			if f == testenv.FaultLong {
				// Extra bytes after the range are never read: the image works.
				if err != nil {
					t.Fatalf("mount with bodies running past their range: %v", err)
				}
				if err := m.Unmount(context.Background(), "img", target); err != nil {
					t.Fatal(err)
				}
			} else {
				if err == nil {
					t.Fatalf("mount with every blob request spoiled (%s) succeeded", f)
				}
				t.Logf("mount failed after %s: %v", took.Round(time.Millisecond), err)
			}
			proxy.Spoil(testenv.FaultNone, 0)
			readsRight(t, s, "again")
		})
	}
}
