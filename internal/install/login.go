package install

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/term"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/units"
)

// CredFiles are the credentials files 'obd login' and 'obd credentials' work on, and the node's configuration.
type CredFiles struct {
	Docker    string        // docker config file
	Helpers   string        // obd's token helpers file
	Config    config.Config // obd.toml
	ObdConfig string        // the path of obd.toml
}

// FindCredFiles loads obd.toml from obdConfig (a missing file is an error when explicit) and finds the credentials
// files: docker and helpers when given, else those of obd.toml ([registry] docker_config and
// credential_helpers), else docker's default config file and registry.DefaultHelperFile.
func FindCredFiles(docker, helpers, obdConfig string, explicit bool) (CredFiles, error) {
	cfg, _, err := config.Load(obdConfig, explicit)
	if err != nil {
		return CredFiles{}, err
	}
	cf := CredFiles{Docker: docker, Helpers: helpers, Config: cfg, ObdConfig: obdConfig}
	if cf.Docker == "" {
		cf.Docker = cfg.Registry.DockerConfig
	}
	if cf.Docker == "" {
		cf.Docker = registry.DefaultDockerConfigPath()
	}
	if cf.Docker == "" {
		return CredFiles{}, errors.New("no home directory to find ~/.docker/config.json in: pass --config-file")
	}
	if cf.Helpers == "" {
		cf.Helpers = cfg.Registry.CredentialHelpers
	}
	if cf.Helpers == "" {
		cf.Helpers = registry.DefaultHelperFile
	}
	return cf, nil
}

// DaemonDockerConfig returns the docker config file obd-snapshotter reads: [registry] docker_config, else root's
// ~/.docker/config.json (the unit runs it as root with HOME set).
func (cf CredFiles) DaemonDockerConfig() string {
	if cf.Config.Registry.DockerConfig != "" {
		return cf.Config.Registry.DockerConfig
	}
	home := "/root"
	if u, err := user.LookupId("0"); err == nil && u.HomeDir != "" {
		home = u.HomeDir
	}
	return filepath.Join(home, ".docker", "config.json")
}

// Login checks user and pass against host (Ping) when verify is set, then stores them in the docker config file
// ('obd login'), writing to w what it did.
func (cf CredFiles) Login(ctx context.Context, w io.Writer, host, user, pass string, verify bool, reach Reach) error {
	if verify {
		err := cf.Ping(ctx, host, reach, registry.StaticCredentials(user, pass), nil)
		switch {
		case errors.Is(err, registry.ErrUnauthorized):
			return fmt.Errorf("login %s: the registry refused user %q: %s; nothing was saved", host, user, registry.Cause(err))
		case err != nil:
			return fmt.Errorf("login %s: %w; nothing was saved (--no-verify saves without asking the registry)", host, err)
		}
	}
	if err := cf.saveLogin(w, host, user, pass); err != nil {
		return err
	}
	fmt.Fprintf(w, "Login succeeded: credentials of %s for %s saved in %s\n", user, host, cf.Docker)
	cf.noteDaemonFile(w)
	return nil
}

// SaveLogin stores user and pass for host in the docker config file without asking the registry ('obd
// credentials set'), writing to w what it did.
func (cf CredFiles) SaveLogin(w io.Writer, host, user, pass string) error {
	if err := cf.saveLogin(w, host, user, pass); err != nil {
		return err
	}
	fmt.Fprintf(w, "saved credentials of %s for %s in %s\n", user, host, cf.Docker)
	cf.noteDaemonFile(w)
	return nil
}

// saveLogin stores user and pass for host in the docker config file, writing to w what it changed.
func (cf CredFiles) saveLogin(w io.Writer, host, user, pass string) error {
	notes, err := SetDockerLogin(cf.Docker, host, user, pass)
	printNotes(w, notes)
	return err
}

// noteDaemonFile tells the user on w when the docker config file is not the one obd-snapshotter reads.
func (cf CredFiles) noteDaemonFile(w io.Writer) {
	daemon := cf.DaemonDockerConfig()
	if filepath.Clean(cf.Docker) == filepath.Clean(daemon) {
		return
	}
	fmt.Fprintf(w, "note: obd-snapshotter reads %s, not %s: for lazy pulls to use these credentials, run this as root without --config-file, or set docker_config = %q in the [registry] table of %s\n",
		daemon, cf.Docker, cf.Docker, cf.ObdConfig)
}

// SaveHelper stores the token helper h for host in the token helpers file, writing to w what it changed and what
// it stored. With check it first runs the helper once and saves nothing when it prints no token.
func (cf CredFiles) SaveHelper(ctx context.Context, w io.Writer, host string, h registry.Helper, check bool) error {
	if check {
		if _, err := h.Token(ctx); err != nil {
			return fmt.Errorf("token helper: %w; nothing was saved (--no-verify saves it anyway)", err)
		}
	}
	notes, err := SetTokenHelper(cf.Helpers, host, h)
	printNotes(w, notes)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "saved token helper for %s in %s: user %s, token from %q, renewed every %s\n", host, cf.Helpers, h.User(), h.Command, units.Duration(h.Lifetime()))
	if first, _, _ := strings.Cut(strings.TrimSpace(h.Command), " "); !strings.HasPrefix(first, "/") {
		fmt.Fprintln(w, "note: obd-snapshotter runs the helper with systemd's PATH and root's HOME: if the command lives elsewhere or needs your login, give its absolute path and check it works as root")
	}
	return nil
}

// Remove removes the credentials and the token helper of host, writing to w what it removed; it fails when
// there was neither.
func (cf CredFiles) Remove(w io.Writer, host string) error {
	removedLogin, notes, err := RemoveDockerLogin(cf.Docker, host)
	printNotes(w, notes)
	if err != nil {
		return err
	}
	if removedLogin {
		fmt.Fprintf(w, "removed the credentials for %s from %s\n", host, cf.Docker)
	}
	removedHelper, notes, err := RemoveTokenHelper(cf.Helpers, host)
	printNotes(w, notes)
	if err != nil {
		return err
	}
	if removedHelper {
		fmt.Fprintf(w, "removed the token helper for %s from %s\n", host, cf.Helpers)
	}
	if !removedLogin && !removedHelper {
		return fmt.Errorf("no credentials for %s in %s or %s", host, cf.Docker, cf.Helpers)
	}
	return nil
}

func printNotes(w io.Writer, notes []string) {
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
}

// List lists the entries of both files, sorted by host, writing what is wrong with them to warn; token helpers
// come first for a host that has both (they win).
func (cf CredFiles) List(warn io.Writer) ([]Credential, error) {
	helpers, warnings, err := ListTokenHelpers(cf.Helpers)
	if err != nil {
		return nil, err
	}
	logins, w, err := ListDockerLogins(cf.Docker)
	if err != nil {
		return nil, err
	}
	for _, w := range append(warnings, w...) {
		fmt.Fprintln(warn, "warning:", w)
	}
	all := append(helpers, logins...)
	slices.SortStableFunc(all, func(a, b Credential) int { return strings.Compare(a.Host, b.Host) })
	return all, nil
}

// WriteList writes the credentials of List as a table (registry, user, where the secret is; never a secret).
func (cf CredFiles) WriteList(w io.Writer, all []Credential) error {
	if len(all) == 0 {
		fmt.Fprintf(w, "no credentials in %s or %s\n", cf.Docker, cf.Helpers)
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REGISTRY\tUSER\tFROM")
	seen := map[string]bool{}
	for _, c := range all {
		from := c.Source
		if c.Helper != nil {
			from = fmt.Sprintf("token helper %q (renewed every %s) in %s", c.Helper.Command, units.Duration(c.Helper.Lifetime()), cf.Helpers)
		} else if seen[c.Host] {
			from += " (not used: the token helper wins)"
		}
		seen[c.Host] = true
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Registry, c.User, from)
	}
	return tw.Flush()
}

// RegistryHost turns a REGISTRY argument (host[:port], or a URL) into the host key credentials are stored under.
func RegistryHost(s string) (string, error) {
	h := registry.HostKey(s)
	if h == "" || strings.ContainsAny(h, " \t@") {
		return "", fmt.Errorf("registry %q: want a host name such as registry.example.com or localhost:5000", s)
	}
	if h == "index.docker.io" {
		return "docker.io", nil
	}
	return h, nil
}

// Reach says how to reach registries to check credentials; obd.toml's [registry] plain_http and insecure lists
// apply too.
type Reach struct {
	PlainHTTP, Insecure bool
	Timeout             time.Duration // how long to try
}

// Ping checks creds (refreshed with refresh, when set, after a refusal) against host: GET /v2/ with the
// registry's token exchange.
func (cf CredFiles) Ping(ctx context.Context, host string, reach Reach, creds registry.CredentialFunc, refresh func(string) bool) error {
	c, err := registry.New(registry.Options{
		PlainHTTP:          reach.PlainHTTP || registry.IsLocalhost(host) || slices.Contains(cf.Config.Registry.PlainHTTP, host),
		Insecure:           reach.Insecure || slices.Contains(cf.Config.Registry.Insecure, host),
		Credentials:        creds,
		RefreshCredentials: refresh,
		RetryBudget:        reach.Timeout,
		RequestTimeout:     min(reach.Timeout, 10*time.Second),
		UserAgent:          "obd",
		Logger:             slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		return err
	}
	defer c.Close()
	if host == "index.docker.io" {
		host = "docker.io"
	}
	return c.Ping(ctx, host)
}

// Verify checks the stored credentials of each registry in hosts (REGISTRY arguments; every registry with stored
// credentials when empty) with the credentials obd-snapshotter would use, and writes a table of the results to w:
// OK, unauthorized (with what to do) or unreachable. Problems of the files go to warn. It fails when any check
// does.
func (cf CredFiles) Verify(ctx context.Context, w, warn io.Writer, hosts []string, reach Reach) error {
	all, err := cf.List(warn)
	if err != nil {
		return err
	}
	docker, err := registry.LoadDockerConfig(cf.Docker)
	if err != nil {
		return err
	}
	creds, err := registry.NewHelperCredentials(cf.Helpers, docker)
	if err != nil {
		return err
	}
	type target struct{ host, user string }
	var targets []target
	users := map[string]string{}
	for _, c := range all {
		if _, ok := users[c.Host]; !ok {
			users[c.Host] = c.User
			targets = append(targets, target{c.Host, c.User})
		}
	}
	if len(hosts) > 0 {
		targets = nil
		for _, a := range hosts {
			h, err := RegistryHost(a)
			if err != nil {
				return err
			}
			u, ok := users[registry.HostKey(h)]
			if !ok {
				u = "(anonymous)"
			}
			targets = append(targets, target{h, u})
		}
	}
	if len(targets) == 0 {
		fmt.Fprintf(w, "no credentials in %s or %s: nothing to verify\n", cf.Docker, cf.Helpers)
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REGISTRY\tUSER\tRESULT")
	failed := 0
	for _, t := range targets {
		err := cf.Ping(ctx, t.host, reach, creds.Credential, creds.Refresh)
		if err != nil {
			failed++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", t.host, t.user, cf.checkResult(t.host, err, creds.Has(t.host)))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if failed > 0 {
		noun := "registries"
		if len(targets) == 1 {
			noun = "registry"
		}
		return fmt.Errorf("%d of %d %s failed the check", failed, len(targets), noun)
	}
	return nil
}

// checkResult says what the Ping of host returned, and what to do about a failure; helper says whether a token
// helper gives host's credentials.
func (cf CredFiles) checkResult(host string, err error, helper bool) string {
	switch {
	case err == nil:
		return "OK"
	case errors.Is(err, registry.ErrUnauthorized):
		fix := fmt.Sprintf("run 'obd login %s' to store working credentials in %s", host, cf.Docker)
		if helper {
			fix = fmt.Sprintf("check the token helper (obd credentials list); set it again with 'obd credentials set %s --helper CMD'", host)
		}
		return fmt.Sprintf("unauthorized (%s) — %s", registry.Cause(err), fix)
	case errors.Is(err, registry.ErrUnavailable):
		result := "unreachable: " + registry.Cause(err)
		var re *registry.Error
		if errors.As(err, &re) && re.Hint != "" {
			result += " — " + re.Hint
		}
		return result
	case errors.Is(err, registry.ErrNotFound):
		return "not a registry: GET /v2/ answered 404"
	}
	return "failed: " + err.Error()
}

// ReadLogin gets the user name (username, else asked for on prompt and read from in when in is a terminal) and
// the password: from in with passwordStdin, else from a terminal prompt without echo. It never prints the
// password.
func ReadLogin(in io.Reader, prompt io.Writer, username string, passwordStdin bool) (name, pass string, err error) {
	f, isFile := in.(*os.File)
	tty := isFile && term.IsTerminal(int(f.Fd()))
	if username == "" {
		if passwordStdin || !tty {
			return "", "", errors.New("no user name: pass -u USER")
		}
		fmt.Fprint(prompt, "Username: ")
		line, err := bufio.NewReader(io.LimitReader(in, 4096)).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return "", "", fmt.Errorf("reading the user name: %w", err)
		}
		if username = strings.TrimSpace(line); username == "" {
			return "", "", errors.New("no user name given")
		}
	}
	switch {
	case passwordStdin:
		b, err := io.ReadAll(io.LimitReader(in, 64<<10))
		if err != nil {
			return "", "", fmt.Errorf("reading the password from standard input: %w", err)
		}
		pass = strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	case tty:
		fmt.Fprint(prompt, "Password: ")
		b, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(prompt)
		if err != nil {
			return "", "", fmt.Errorf("reading the password: %w", err)
		}
		pass = string(b)
	default:
		return "", "", errors.New("standard input is not a terminal, so the password cannot be asked for without echo: pipe it in with --password-stdin (e.g. obd login REGISTRY -u USER --password-stdin < file)")
	}
	if pass == "" {
		return "", "", errors.New("empty password")
	}
	return username, pass, nil
}
