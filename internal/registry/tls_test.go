package registry

import (
	"bytes"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestTLS(t *testing.T) {
	data := []byte("blob over TLS")
	dg := digest.FromBytes(data)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes are expected
	srv.StartTLS()
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "https://")
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(caFile, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	read := func(mod func(*Options)) error {
		c := testClient(t, func(o *Options) {
			o.PlainHTTP = false
			o.RetryBudget = time.Hour // an untrusted certificate must fail at once, not after the budget
			mod(o)
		})
		b := mustBlob(t, c, host, "app", dg, int64(len(data)))
		p := make([]byte, len(data))
		if _, err := b.ReadAt(p, 0); err != nil {
			return err
		}
		if !bytes.Equal(p, data) {
			t.Fatal("wrong bytes")
		}
		return nil
	}
	if err := read(func(o *Options) { o.CAFile = caFile }); err != nil {
		t.Fatalf("with the CA file: %v", err)
	}
	if err := read(func(o *Options) { o.Insecure = true }); err != nil {
		t.Fatalf("insecure: %v", err)
	}
	err := read(func(o *Options) {})
	if err == nil || !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("untrusted certificate: err = %v", err)
	}
	if _, err := New(Options{CAFile: filepath.Join(t.TempDir(), "missing.pem")}); err == nil {
		t.Fatal("missing CA file accepted")
	}
	if err := os.WriteFile(caFile, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{CAFile: caFile, Credentials: StaticCredentials("", "")}); err == nil {
		t.Fatal("CA file without certificates accepted")
	}
}

func TestBrokenCredentialsFailFast(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "bearer", "u", "p" })
	data, dg := f.addBlob(100)
	cfg := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfg, []byte(`{"auths":{"`+f.host()+`":{"auth":"`+basicAuth("u", "p")+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	creds, err := LoadDockerConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := testClient(t, func(o *Options) {
		o.Credentials, o.CredentialSource = creds, cfg
		o.RetryBudget = time.Hour
	})
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	if _, err := b.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	// The file is replaced by one of the wrong shape, and the tokens expire.
	if err := os.WriteFile(cfg, []byte(`{"auths":{"`+f.host()+`":"u:p"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	future := time.Now().Add(time.Minute)
	_ = os.Chtimes(cfg, future, future)
	f.rotate("p")
	_, err = b.ReadAt(make([]byte, 10), 0)
	if err == nil || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), cfg) {
		t.Fatalf("err = %v, want an immediate error naming %s", err, cfg)
	}
}
