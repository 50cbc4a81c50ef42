// Package cri is obd's side of Kubernetes: a CRI image-service proxy between kubelet and containerd that keeps the
// credentials of each image pull for the lazy reads of that image, the store it keeps them in, and kubelet
// credential provider plugins as a credential source.
package cri

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Store keeps credentials in memory, by image repository (registry host and repository), each until ttl has
// passed since it was stored or last used. It never writes them anywhere and its methods never return them in an
// error or a String.
type Store struct {
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	entries map[string]*storeEntry // repoKey → credentials
}

// storeEntry is the credentials of one repository.
type storeEntry struct {
	user, pass string // pass holds an identity token when user is registry.IdentityTokenUser
	expires    time.Time
}

// NewStore returns an empty Store whose entries expire ttl after their last use.
func NewStore(ttl time.Duration) *Store {
	return &Store{ttl: ttl, now: time.Now, entries: map[string]*storeEntry{}}
}

// repoKey is the key of a repository: the registry host as docker matches it (registry.HostKey) and the
// repository.
func repoKey(host, repo string) string { return registry.HostKey(host) + "/" + repo }

// Put stores the credentials for the repository of the registry image reference ref (a tag or digest in it is
// ignored), replacing older ones. user registry.IdentityTokenUser marks pass as an identity token. undo puts back
// what the repository had before, unless another Put replaced these credentials since.
func (s *Store) Put(ref, user, pass string) (undo func(), err error) {
	r, err := image.ParseRef(ref)
	if err != nil {
		return nil, err
	}
	if r.Transport != image.TransportRegistry {
		return nil, fmt.Errorf("image reference %s: not a registry reference", ref)
	}
	key := repoKey(r.Host(), r.Repository())
	e := &storeEntry{user: user, pass: pass, expires: s.now().Add(s.ttl)}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expire()
	prev := s.entries[key]
	s.entries[key] = e
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.entries[key] != e {
			return
		}
		if prev != nil {
			s.entries[key] = prev
		} else {
			delete(s.entries, key)
		}
	}, nil
}

// Get returns the unexpired credentials of host/repo and extends their life by the store's ttl.
func (s *Store) Get(host, repo string) (user, pass string, ok bool) {
	if repo == "" {
		return "", "", false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expire()
	e := s.entries[repoKey(host, repo)]
	if e == nil {
		return "", "", false
	}
	e.expires = s.now().Add(s.ttl)
	return e.user, e.pass, true
}

// Len returns the number of repositories with unexpired credentials.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expire()
	return len(s.entries)
}

// String describes the store without its credentials, so that printing or logging it reveals none.
func (s *Store) String() string { return fmt.Sprintf("CRI credentials of %d repositories", s.Len()) }

// expire drops the expired entries; s.mu is held.
func (s *Store) expire() {
	now := s.now()
	for k, e := range s.entries {
		if !now.Before(e.expires) {
			delete(s.entries, k)
		}
	}
}

// Credentials returns a CredentialFunc that answers the stored credentials of the repository a request is made
// for (registry.RequestRepository), and next's answer for requests it has none for.
func (s *Store) Credentials(next registry.CredentialFunc) registry.CredentialFunc {
	return func(ctx context.Context, host string) (string, string, error) {
		if user, pass, ok := s.Get(host, registry.RequestRepository(ctx, host)); ok {
			return user, pass, nil
		}
		return next(ctx, host)
	}
}
