package registry

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestPing(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mode       string // fake registry auth mode
		user, pass string // credentials the client sends
		want       error  // nil or a sentinel
	}{
		{"anonymous registry", "", "", "", nil},
		{"basic ok", "basic", "alice", "secret", nil},
		{"basic wrong password", "basic", "alice", "wrong", ErrUnauthorized},
		{"basic no credentials", "basic", "", "", ErrUnauthorized},
		{"bearer ok", "bearer", "alice", "secret", nil},
		{"bearer wrong password", "bearer", "alice", "wrong", ErrUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeRegistry(t)
			f.configure(func() { f.authMode, f.user, f.pass = tc.mode, "alice", "secret" })
			c := testClient(t, func(o *Options) { o.Credentials = StaticCredentials(tc.user, tc.pass) })
			err := c.Ping(context.Background(), f.host())
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Ping: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Ping: got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), "obd login "+f.host()) {
				t.Errorf("error %q does not tell the user what to do", err)
			}
		})
	}
}

func TestPingUnreachable(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	host := strings.TrimPrefix(srv.URL, "http://")
	srv.Close()
	c := testClient(t, func(o *Options) { o.RetryBudget = 300 * time.Millisecond })
	err := c.Ping(context.Background(), host)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Ping of a closed port: got %v, want ErrUnavailable", err)
	}
}

func TestPingNotARegistry(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	c := testClient(t, nil)
	err := c.Ping(context.Background(), strings.TrimPrefix(srv.URL, "http://"))
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("Ping of a web server without /v2/: got %v, want ErrNotFound", err)
	}
}

func TestCause(t *testing.T) {
	err := fmt.Errorf("login: %w", &Error{Op: "registry r ping", Err: errors.New("401 Unauthorized"), Kind: ErrUnauthorized, Hint: "run obd login"})
	if got := Cause(err); got != "401 Unauthorized" {
		t.Errorf("Cause = %q", got)
	}
	if got := Cause(errors.New("plain")); got != "plain" {
		t.Errorf("Cause of a plain error = %q", got)
	}
}
