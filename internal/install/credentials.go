package install

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/obdproject/obd/internal/registry"
)

// Credentials files: the docker config (config.json, {"auths": {"host": {"auth": base64(user:pass)}}}) that
// obd-snapshotter, docker and containerd's tools read, and obd's token helpers file. Both hold secrets: they are
// written with mode 0600, merged with what they already hold (unknown keys kept), and never overwritten when they
// cannot be parsed.

// Names of the two files in messages.
const (
	dockerWhat  = "credentials file"
	helpersWhat = "token helpers file"
)

// secretMode is the mode of credentials files.
const secretMode fs.FileMode = 0o600

// Credential is one registry's entry in a credentials file, without its secret.
type Credential struct {
	Registry string // host[:port] as written in the file
	Host     string // the registry host it applies to (HostKey)
	User     string // username, or what stands in for one ("(identity token)")
	Source   string // where the secret is: the file, a docker credential helper or obd's token helper
	Helper   *registry.Helper
}

// DockerKey returns the key docker writes for host in "auths": Docker Hub's is "https://index.docker.io/v1/".
func DockerKey(host string) string {
	h := registry.HostKey(host)
	if h == "index.docker.io" {
		return "https://index.docker.io/v1/"
	}
	return h
}

// readJSONObject reads a JSON object file, keeping each member's raw bytes; a missing file is an empty object.
// what names the file in errors.
func readJSONObject(path, what string) (top map[string]json.RawMessage, mode fs.FileMode, exists bool, err error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]json.RawMessage{}, 0, false, nil
	}
	if err != nil {
		return nil, 0, false, fmt.Errorf("%s %s: %w", what, path, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, 0, false, fmt.Errorf("%s %s: %w", what, path, err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return map[string]json.RawMessage{}, st.Mode().Perm(), true, nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&top); err != nil || top == nil || dec.More() {
		if err == nil {
			err = errors.New("not a single JSON object")
		}
		return nil, 0, false, fmt.Errorf("%s %s is not valid: %w — fix it or move it away; it was not changed", what, path, err)
	}
	return top, st.Mode().Perm(), true, nil
}

// writeSecretFile writes a JSON object with mode 0600 and returns notes about what it did to the file.
func writeSecretFile(path, what string, top map[string]json.RawMessage, oldMode fs.FileMode, exists bool) ([]string, error) {
	data, err := json.MarshalIndent(top, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	data = append(data, '\n')
	validate := registry.ValidateDockerConfig
	if what == helpersWhat {
		validate = func(b []byte) error { _, err := registry.ParseHelperFile(b); return err }
	}
	if _, hasAuths := top["auths"]; what == helpersWhat || hasAuths {
		if err := validate(data); err != nil {
			return nil, fmt.Errorf("%s %s is not valid: %w — fix it or move it away; it was not changed", what, path, err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	if exists {
		// writeFileAtomic keeps an existing file's mode: tighten it first.
		if err := os.Chmod(path, secretMode); err != nil {
			return nil, fmt.Errorf("%s %s: %w", what, path, err)
		}
	}
	if err := writeFileAtomic(path, data, secretMode); err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	var notes []string
	if !exists {
		notes = append(notes, fmt.Sprintf("created %s (mode 0600)", path))
	} else if oldMode&0o077 != 0 {
		notes = append(notes, fmt.Sprintf("%s was readable by others (mode %04o): set its mode to 0600", path, oldMode))
	}
	return notes, nil
}

// objectMember decodes member key of top as a JSON object (missing: empty).
func objectMember(top map[string]json.RawMessage, key, path, what string) (map[string]json.RawMessage, error) {
	m := map[string]json.RawMessage{}
	raw, ok := top[key]
	if !ok {
		return m, nil
	}
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return nil, fmt.Errorf("%s %s is not valid: %q is not an object — fix it or move it away; it was not changed", what, path, key)
	}
	return m, nil
}

// SetDockerLogin stores user and pass for host in the docker config file at path, replacing the entries that
// stand for the same registry and keeping everything else. It returns notes for the user (file created, mode
// tightened).
func SetDockerLogin(path, host, user, pass string) ([]string, error) {
	const what = dockerWhat
	if user == "" || strings.Contains(user, ":") {
		return nil, fmt.Errorf("username %q: want a non-empty name without ':'", user)
	}
	if pass == "" {
		return nil, errors.New("empty password")
	}
	top, mode, exists, err := readJSONObject(path, what)
	if err != nil {
		return nil, err
	}
	auths, err := objectMember(top, "auths", path, what)
	if err != nil {
		return nil, err
	}
	for k := range auths {
		if registry.HostKey(k) == registry.HostKey(host) {
			delete(auths, k)
		}
	}
	entry, _ := json.Marshal(map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))})
	auths[DockerKey(host)] = entry
	top["auths"], _ = json.Marshal(auths)
	return writeSecretFile(path, what, top, mode, exists)
}

// RemoveDockerLogin removes the entries for host from the docker config file; removed says whether there were any.
func RemoveDockerLogin(path, host string) (removed bool, notes []string, err error) {
	const what = dockerWhat
	top, mode, exists, err := readJSONObject(path, what)
	if err != nil || !exists {
		return false, nil, err
	}
	auths, err := objectMember(top, "auths", path, what)
	if err != nil {
		return false, nil, err
	}
	for k := range auths {
		if registry.HostKey(k) == registry.HostKey(host) {
			delete(auths, k)
			removed = true
		}
	}
	if !removed {
		return false, nil, nil
	}
	top["auths"], _ = json.Marshal(auths)
	notes, err = writeSecretFile(path, what, top, mode, exists)
	return true, notes, err
}

// ListDockerLogins lists the registries of the docker config file, without secrets, sorted. warnings tell about a
// file readable by others.
func ListDockerLogins(path string) (creds []Credential, warnings []string, err error) {
	const what = dockerWhat
	top, mode, exists, err := readJSONObject(path, what)
	if err != nil || !exists {
		return nil, nil, err
	}
	if mode&0o077 != 0 {
		warnings = append(warnings, fmt.Sprintf("%s is readable by others (mode %04o): chmod 600 %s", path, mode, path))
	}
	auths, err := objectMember(top, "auths", path, what)
	if err != nil {
		return nil, warnings, err
	}
	var store string
	if raw, ok := top["credsStore"]; ok {
		_ = json.Unmarshal(raw, &store)
	}
	var helpers map[string]string
	if raw, ok := top["credHelpers"]; ok {
		_ = json.Unmarshal(raw, &helpers)
	}
	seen := map[string]bool{}
	for k, raw := range auths {
		c := Credential{Registry: k, Host: registry.HostKey(k), Source: path}
		var e struct {
			Auth, Username, IdentityToken string
		}
		if err := json.Unmarshal(raw, &e); err != nil {
			return nil, warnings, fmt.Errorf("%s %s is not valid: \"auths\" entry %q: %w", what, path, k, err)
		}
		switch {
		case e.IdentityToken != "":
			c.User = "(identity token)"
		case e.Auth != "":
			dec, err := base64.StdEncoding.DecodeString(e.Auth)
			user, _, ok := strings.Cut(string(dec), ":")
			if err != nil || !ok {
				return nil, warnings, fmt.Errorf("%s %s is not valid: \"auths\" entry %q: \"auth\" is not base64 of user:password", what, path, k)
			}
			c.User = user
		case e.Username != "":
			c.User = e.Username
		default:
			h := helpers[k]
			if h == "" {
				h = helpers[c.Host]
			}
			if h == "" {
				h = store
			}
			c.User, c.Source = "?", "docker-credential-"+h
			if h == "" {
				c.Source = path + " (empty entry)"
			}
		}
		seen[c.Host] = true
		creds = append(creds, c)
	}
	for k, h := range helpers {
		if !seen[registry.HostKey(k)] {
			creds = append(creds, Credential{Registry: k, Host: registry.HostKey(k), User: "?", Source: "docker-credential-" + h})
		}
	}
	sort.Slice(creds, func(i, j int) bool { return creds[i].Registry < creds[j].Registry })
	return creds, warnings, nil
}

// SetTokenHelper stores h as the token helper of host in obd's helpers file at path.
func SetTokenHelper(path, host string, h registry.Helper) ([]string, error) {
	const what = helpersWhat
	if err := h.Validate(); err != nil {
		return nil, err
	}
	top, mode, exists, err := readJSONObject(path, what)
	if err != nil {
		return nil, err
	}
	helpers, err := objectMember(top, "helpers", path, what)
	if err != nil {
		return nil, err
	}
	for k := range helpers {
		if registry.HostKey(k) == registry.HostKey(host) {
			delete(helpers, k)
		}
	}
	helpers[registry.HostKey(host)], _ = json.Marshal(h)
	top["helpers"], _ = json.Marshal(helpers)
	return writeSecretFile(path, what, top, mode, exists)
}

// RemoveTokenHelper removes the helper of host from the helpers file; removed says whether it had one.
func RemoveTokenHelper(path, host string) (removed bool, notes []string, err error) {
	const what = helpersWhat
	top, mode, exists, err := readJSONObject(path, what)
	if err != nil || !exists {
		return false, nil, err
	}
	helpers, err := objectMember(top, "helpers", path, what)
	if err != nil {
		return false, nil, err
	}
	for k := range helpers {
		if registry.HostKey(k) == registry.HostKey(host) {
			delete(helpers, k)
			removed = true
		}
	}
	if !removed {
		return false, nil, nil
	}
	top["helpers"], _ = json.Marshal(helpers)
	notes, err = writeSecretFile(path, what, top, mode, exists)
	return true, notes, err
}

// ListTokenHelpers lists the helpers of the helpers file, sorted.
func ListTokenHelpers(path string) (creds []Credential, warnings []string, err error) {
	hf, err := registry.ReadHelperFile(path)
	if err != nil {
		return nil, nil, err
	}
	if st, err := os.Stat(path); err == nil && st.Mode().Perm()&0o077 != 0 {
		warnings = append(warnings, fmt.Sprintf("%s is readable by others (mode %04o): chmod 600 %s", path, st.Mode().Perm(), path))
	}
	for k, h := range hf.Helpers {
		creds = append(creds, Credential{Registry: k, Host: registry.HostKey(k), User: h.User(), Source: "token helper in " + path, Helper: &h})
	}
	sort.Slice(creds, func(i, j int) bool { return creds[i].Registry < creds[j].Registry })
	return creds, warnings, nil
}
