package cri

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	orasregistry "oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// fakeClock is a settable clock.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time      { return c.t }
func (c *fakeClock) add(d time.Duration) { c.t = c.t.Add(d) }
func newClockedStore(ttl time.Duration) (*Store, *fakeClock) {
	c := &fakeClock{t: time.Unix(1700000000, 0)}
	s := NewStore(ttl)
	s.now = c.now
	return s, c
}

func TestStoreKeysByRepository(t *testing.T) {
	s, _ := newClockedStore(time.Hour)
	for _, c := range []struct{ ref, user string }{
		{"reg.example.com:5000/team/app:v1", "app"},
		{"reg.example.com:5000/team/lib@sha256:" + strings.Repeat("a", 64), "lib"},
		{"docker.io/library/nginx:latest", "hub"}, // as kubelet normalizes it
	} {
		if _, err := s.Put(c.ref, c.user, "pw-"+c.user); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		host, repo, user string
		ok               bool
	}{
		{"reg.example.com:5000", "team/app", "app", true},
		{"REG.example.com:5000", "team/app", "app", true}, // hosts compare as docker compares them
		{"reg.example.com:5000", "team/lib", "lib", true},
		{"reg.example.com:5000", "team/other", "", false}, // another repository of the same registry
		{"reg.example.com", "team/app", "", false},        // another port is another registry
		{"registry-1.docker.io", "library/nginx", "hub", true},
		{"reg.example.com:5000", "", "", false}, // a request that names no repository
	} {
		user, pass, ok := s.Get(c.host, c.repo)
		if ok != c.ok || user != c.user || (ok && pass != "pw-"+c.user) {
			t.Errorf("Get(%s, %s) = %q, %v; want %q, %v", c.host, c.repo, user, ok, c.user, c.ok)
		}
	}
	if _, err := s.Put("oci:/some/dir:tag", "u", "p"); err == nil {
		t.Error("Put of a layout reference succeeded")
	}
}

func TestStoreExpiry(t *testing.T) {
	s, clock := newClockedStore(time.Hour)
	if _, err := s.Put("r.io/app:v1", "u", "p"); err != nil {
		t.Fatal(err)
	}
	clock.add(50 * time.Minute)
	if _, _, ok := s.Get("r.io", "app"); !ok {
		t.Fatal("expired before its ttl")
	}
	clock.add(50 * time.Minute) // 100 minutes after the pull, 50 after the last use
	if _, _, ok := s.Get("r.io", "app"); !ok {
		t.Fatal("a use did not extend the credentials' life")
	}
	clock.add(time.Hour)
	if _, _, ok := s.Get("r.io", "app"); ok || s.Len() != 0 {
		t.Fatalf("credentials unused for the ttl are still there (%d entries)", s.Len())
	}
	// A new pull stores them again.
	if _, err := s.Put("r.io/app:v2", "u", "p2"); err != nil {
		t.Fatal(err)
	}
	if _, pass, ok := s.Get("r.io", "app"); !ok || pass != "p2" {
		t.Fatal("credentials of a new pull not stored")
	}
}

// TestStoreCredentials checks the CredentialFunc: stored credentials for the request's repository, next's answer
// for other repositories, and that neither the store's errors nor its formatting reveals a password.
func TestStoreCredentials(t *testing.T) {
	s, _ := newClockedStore(time.Hour)
	if _, err := s.Put("r.io/app:v1", "alice", "hunter2-secret"); err != nil {
		t.Fatal(err)
	}
	next := func(context.Context, string) (string, string, error) { return "node", "node-pw", nil }
	f := s.Credentials(next)
	ctx := scopedContext(t, "r.io", "app")
	if u, p, err := f(ctx, "r.io"); err != nil || u != "alice" || p != "hunter2-secret" {
		t.Errorf("for r.io/app: %q %q %v", u, p, err)
	}
	if u, _, err := f(scopedContext(t, "r.io", "other"), "r.io"); err != nil || u != "node" {
		t.Errorf("for r.io/other: %q %v, want next's answer", u, err)
	}
	if u, _, err := f(context.Background(), "r.io"); err != nil || u != "node" {
		t.Errorf("without a repository: %q %v, want next's answer", u, err)
	}
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("store", "store", s, "printed", fmt.Sprintf("%v %+v %s", s, s, s))
	if _, err := s.Put("not a ref::", "alice", "hunter2-secret"); err != nil {
		buf.WriteString(err.Error())
	}
	if strings.Contains(buf.String(), "hunter2") {
		t.Errorf("a password shows in the log or an error: %s", buf.String())
	}
}

// scopedContext returns the context of a registry request for host/repo: the scope the registry client puts in
// it (registry's TestRequestRepository checks that the client does).
func scopedContext(t *testing.T, host, repo string) context.Context {
	t.Helper()
	return auth.AppendRepositoryScope(context.Background(), orasregistry.Reference{Registry: host, Repository: repo}, auth.ActionPull)
}

// Undoing a Put (the credentials of a pull that failed) puts back what the repository had, unless a later Put
// replaced them.
func TestStorePutUndo(t *testing.T) {
	s := NewStore(time.Hour)
	if _, err := s.Put("r.io/app:v1", "old", "p1"); err != nil {
		t.Fatal(err)
	}
	undo, err := s.Put("r.io/app:v2", "new", "p2")
	if err != nil {
		t.Fatal(err)
	}
	undo()
	if user, _, ok := s.Get("r.io", "app"); !ok || user != "old" {
		t.Fatalf("after undo: user %q, %v; want the older credentials", user, ok)
	}
	undo, _ = s.Put("r.io/other:v1", "x", "p3")
	undo()
	if _, _, ok := s.Get("r.io", "other"); ok {
		t.Fatal("undo of the first Put of a repository left credentials")
	}
	undo, _ = s.Put("r.io/app:v3", "third", "p4")
	if _, err := s.Put("r.io/app:v4", "fourth", "p5"); err != nil {
		t.Fatal(err)
	}
	undo()
	if user, _, _ := s.Get("r.io", "app"); user != "fourth" {
		t.Fatalf("an undo replaced newer credentials: user %q", user)
	}
}
