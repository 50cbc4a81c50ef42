package main

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

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/install"
	"github.com/obdproject/obd/internal/registry"
)

// credFlags name the credentials files; by default they are the ones obd-snapshotter reads.
type credFlags struct {
	configFile  string // docker config file
	helpersFile string // obd's token helpers file
	obdConfig   string
}

func (f *credFlags) register(fl *pflag.FlagSet, helpers bool) {
	fl.StringVar(&f.configFile, "config-file", "", "credentials file in docker's config.json format (default: [registry] docker_config of obd.toml, else $DOCKER_CONFIG/config.json or ~/.docker/config.json)")
	if helpers {
		fl.StringVar(&f.helpersFile, "helpers-file", "", "token helpers file (default: [registry] credential_helpers of obd.toml, "+registry.DefaultHelperFile+")")
	}
	fl.StringVar(&f.obdConfig, "obd-config", config.DefaultPath, "obd's configuration file")
}

// credFiles are the resolved credentials files and the node configuration.
type credFiles struct {
	docker, helpers string
	cfg             config.Config
	obdConfig       string
}

// resolve finds the files: flags first, then obd.toml, then docker's defaults.
func (f *credFlags) resolve(cmd *cobra.Command) (credFiles, error) {
	cfg, _, err := config.Load(f.obdConfig, cmd.Flags().Changed("obd-config"))
	if err != nil {
		return credFiles{}, err
	}
	cf := credFiles{docker: f.configFile, helpers: f.helpersFile, cfg: cfg, obdConfig: f.obdConfig}
	if cf.docker == "" {
		cf.docker = cfg.Registry.DockerConfig
	}
	if cf.docker == "" {
		cf.docker = registry.DefaultDockerConfigPath()
	}
	if cf.docker == "" {
		return credFiles{}, errors.New("no home directory to find ~/.docker/config.json in: pass --config-file")
	}
	if cf.helpers == "" {
		cf.helpers = cfg.Registry.CredentialHelpers
	}
	if cf.helpers == "" {
		cf.helpers = registry.DefaultHelperFile
	}
	return cf, nil
}

// daemonDockerConfig returns the docker config file obd-snapshotter reads: [registry] docker_config, else root's
// ~/.docker/config.json (the unit runs it as root with HOME set).
func (cf credFiles) daemonDockerConfig() string {
	if cf.cfg.Registry.DockerConfig != "" {
		return cf.cfg.Registry.DockerConfig
	}
	home := "/root"
	if u, err := user.LookupId("0"); err == nil && u.HomeDir != "" {
		home = u.HomeDir
	}
	return filepath.Join(home, ".docker", "config.json")
}

// saveLogin stores user and pass for host in the docker config file, printing what it changed.
func (cf credFiles) saveLogin(w io.Writer, host, user, pass string) error {
	notes, err := install.SetDockerLogin(cf.docker, host, user, pass)
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
	return err
}

// noteDaemonFile tells the user when the file written is not the one obd-snapshotter reads.
func (cf credFiles) noteDaemonFile(w io.Writer) {
	daemon := cf.daemonDockerConfig()
	if filepath.Clean(cf.docker) == filepath.Clean(daemon) {
		return
	}
	fmt.Fprintf(w, "note: obd-snapshotter reads %s, not %s: for lazy pulls to use these credentials, run this as root without --config-file, or set docker_config = %q in the [registry] table of %s\n",
		daemon, cf.docker, cf.docker, cf.obdConfig)
}

func newLoginCmd() *cobra.Command {
	var (
		cf            credFlags
		username      string
		passwordStdin bool
		vf            verifyFlags
	)
	cmd := &cobra.Command{
		Use:   "login REGISTRY",
		Short: "Check and store credentials for a registry where obd-snapshotter finds them",
		Long: `login asks for a password (without echo, or from standard input with --password-stdin), checks it against
the registry (GET /v2/ with the registry's token exchange) and stores it in the docker config format
({"auths": {"host": {"auth": base64(user:password)}}}) in the file obd-snapshotter reads: [registry]
docker_config of obd.toml, else $DOCKER_CONFIG/config.json or ~/.docker/config.json. The file gets mode 0600;
its other entries are kept. Run it as root for the daemon (which runs as root) to see the credentials.`,
		Example: `  obd login registry.example.com -u alice
  cat token.txt | obd login ghcr.io -u alice --password-stdin`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			host, files, err := cf.registryAndFiles(cmd, args[0])
			if err != nil {
				return err
			}
			user, pass, err := readLogin(cmd, username, passwordStdin)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if !vf.noVerify {
				err := vf.ping(cmd.Context(), host, files.cfg, registry.StaticCredentials(user, pass), nil)
				switch {
				case errors.Is(err, registry.ErrUnauthorized):
					return fmt.Errorf("login %s: the registry refused user %q: %s; nothing was saved", host, user, cause(err))
				case err != nil:
					return fmt.Errorf("login %s: %w; nothing was saved (--no-verify saves without asking the registry)", host, err)
				}
			}
			if err := files.saveLogin(out, host, user, pass); err != nil {
				return err
			}
			fmt.Fprintf(out, "Login succeeded: credentials of %s for %s saved in %s\n", user, host, files.docker)
			files.noteDaemonFile(out)
			return nil
		},
	}
	cf.register(cmd.Flags(), false)
	vf.register(cmd.Flags())
	cmd.Flags().StringVarP(&username, "username", "u", "", "user name (asked for when standard input is a terminal)")
	cmd.Flags().BoolVar(&passwordStdin, "password-stdin", false, "read the password (or token) from standard input")
	return cmd
}

// verifyFlags say how to reach registries to check credentials.
type verifyFlags struct {
	noVerify            bool
	plainHTTP, insecure bool
	timeout             time.Duration
}

func (f *verifyFlags) register(fl *pflag.FlagSet) {
	fl.BoolVar(&f.noVerify, "no-verify", false, "save without checking the credentials against the registry")
	f.registerReach(fl)
}

func (f *verifyFlags) registerReach(fl *pflag.FlagSet) {
	fl.BoolVar(&f.plainHTTP, "plain-http", false, "talk HTTP to the registry (always so for localhost; see also [registry] plain_http)")
	fl.BoolVar(&f.insecure, "insecure", false, "do not verify the registry's TLS certificate (see also [registry] insecure)")
	fl.DurationVar(&f.timeout, "timeout", 15*time.Second, "how long to try to reach a registry")
}

// ping checks creds against host.
func (f *verifyFlags) ping(ctx context.Context, host string, cfg config.Config, creds registry.CredentialFunc, refresh func(string) bool) error {
	c, err := registry.New(registry.Options{
		PlainHTTP:          f.plainHTTP || registry.IsLocalhost(host) || slices.Contains(cfg.Registry.PlainHTTP, host),
		Insecure:           f.insecure || slices.Contains(cfg.Registry.Insecure, host),
		Credentials:        creds,
		RefreshCredentials: refresh,
		RetryBudget:        f.timeout,
		RequestTimeout:     min(f.timeout, 10*time.Second),
		UserAgent:          "obd",
		Logger:             slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Ping(ctx, pingHost(host))
}

// cause returns the cause of a registry error without its operation and hint.
func cause(err error) string {
	var re *registry.Error
	if errors.As(err, &re) && re.Err != nil {
		return re.Err.Error()
	}
	return err.Error()
}

// registryAndFiles checks the REGISTRY argument and finds the credential files.
func (f *credFlags) registryAndFiles(cmd *cobra.Command, arg string) (string, credFiles, error) {
	host, err := registryArg(arg)
	if err != nil {
		return "", credFiles{}, err
	}
	files, err := f.resolve(cmd)
	return host, files, err
}

// registryArg turns a REGISTRY argument (host[:port], or a URL) into the host key credentials are stored under.
func registryArg(s string) (string, error) {
	h := registry.HostKey(s)
	if h == "" || strings.ContainsAny(h, " \t@") {
		return "", fmt.Errorf("registry %q: want a host name such as registry.example.com or localhost:5000", s)
	}
	if h == "index.docker.io" {
		return "docker.io", nil
	}
	return h, nil
}

// pingHost is the registry name to ask for a host key.
func pingHost(host string) string {
	if host == "index.docker.io" {
		return "docker.io"
	}
	return host
}

// readLogin gets the user name and the password: the password from standard input with passwordStdin, else from
// a terminal prompt without echo. It never prints the password.
func readLogin(cmd *cobra.Command, username string, passwordStdin bool) (string, string, error) {
	in := cmd.InOrStdin()
	f, isFile := in.(*os.File)
	tty := isFile && term.IsTerminal(int(f.Fd()))
	prompt := cmd.ErrOrStderr()
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
	var pass string
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

func newCredentialsCmd() *cobra.Command {
	var cf credFlags
	cmd := &cobra.Command{
		Use:   "credentials",
		Short: "Manage the registry credentials obd-snapshotter uses",
		Long: `credentials manages the registry credentials obd-snapshotter uses for lazy reads: user names and passwords
in the docker config file ([registry] docker_config of obd.toml, else ~/.docker/config.json), and token helpers
(commands that print a fresh token, run by the daemon before the token expires) in obd's token helpers file
([registry] credential_helpers, ` + registry.DefaultHelperFile + `). Both files get mode 0600.`,
		Args: cobra.NoArgs,
	}
	cf.register(cmd.PersistentFlags(), true)
	cmd.AddCommand(newCredentialsSetCmd(&cf), newCredentialsRemoveCmd(&cf), newCredentialsListCmd(&cf), newCredentialsVerifyCmd(&cf))
	return cmd
}

func newCredentialsSetCmd(cf *credFlags) *cobra.Command {
	var (
		username      string
		passwordStdin bool
		helper        string
		ttl           time.Duration
		noVerify      bool
	)
	cmd := &cobra.Command{
		Use:   "set REGISTRY",
		Short: "Store a user and password, or a token helper, for a registry (without asking the registry)",
		Long: `set stores credentials for REGISTRY without asking the registry (see 'obd login' and 'obd credentials verify').

With --helper CMD it stores a token helper instead: obd-snapshotter runs CMD with /bin/sh -c, as root, and sends
what it prints as the password (with user -u, default ` + registry.DefaultHelperUsername + `), running it again when
the token is older than --ttl or the registry refuses it. set runs CMD once to check that it prints a token.`,
		Example: `  obd credentials set registry.example.com -u alice --password-stdin < password.txt
  obd credentials set gcr.io --helper 'gcloud auth print-access-token'
  obd credentials set 123456789012.dkr.ecr.eu-west-1.amazonaws.com -u AWS --ttl 6h \
      --helper 'aws ecr get-login-password --region eu-west-1'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			host, files, err := cf.registryAndFiles(cmd, args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if helper == "" {
				if cmd.Flags().Changed("ttl") {
					return errors.New("--ttl goes with --helper")
				}
				user, pass, err := readLogin(cmd, username, passwordStdin)
				if err != nil {
					return err
				}
				if err := files.saveLogin(out, host, user, pass); err != nil {
					return err
				}
				fmt.Fprintf(out, "saved credentials of %s for %s in %s\n", user, host, files.docker)
				files.noteDaemonFile(out)
				return nil
			}
			if passwordStdin {
				return errors.New("--password-stdin and --helper exclude each other: the helper prints the token")
			}
			h := registry.Helper{Command: helper, Username: username}
			if cmd.Flags().Changed("ttl") {
				h.TTL = ttl.String()
			}
			if err := h.Validate(); err != nil {
				return fmt.Errorf("--helper/--ttl: %w", err)
			}
			if !noVerify {
				if _, err := h.Token(cmd.Context()); err != nil {
					return fmt.Errorf("token helper: %w; nothing was saved (--no-verify saves it anyway)", err)
				}
			}
			notes, err := install.SetTokenHelper(files.helpers, host, h)
			for _, n := range notes {
				fmt.Fprintln(out, n)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "saved token helper for %s in %s: user %s, token from %q, renewed every %s\n", host, files.helpers, h.User(), h.Command, shortDuration(h.Lifetime()))
			if first, _, _ := strings.Cut(strings.TrimSpace(helper), " "); !strings.HasPrefix(first, "/") {
				fmt.Fprintln(out, "note: obd-snapshotter runs the helper with systemd's PATH and root's HOME: if the command lives elsewhere or needs your login, give its absolute path and check it works as root")
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&username, "username", "u", "", "user name (with --helper: the name sent with the token, default "+registry.DefaultHelperUsername+")")
	f.BoolVar(&passwordStdin, "password-stdin", false, "read the password from standard input")
	f.StringVar(&helper, "helper", "", "command that prints a registry token (run with /bin/sh -c)")
	f.DurationVar(&ttl, "ttl", registry.DefaultHelperTTL, "with --helper: run the helper again when its token is older than this")
	f.BoolVar(&noVerify, "no-verify", false, "with --helper: save without running the helper once")
	return cmd
}

func newCredentialsRemoveCmd(cf *credFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "remove REGISTRY",
		Short: "Remove the credentials and the token helper of a registry",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			host, files, err := cf.registryAndFiles(cmd, args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			removedLogin, notes, err := install.RemoveDockerLogin(files.docker, host)
			for _, n := range notes {
				fmt.Fprintln(out, n)
			}
			if err != nil {
				return err
			}
			if removedLogin {
				fmt.Fprintf(out, "removed the credentials for %s from %s\n", host, files.docker)
			}
			removedHelper, notes, err := install.RemoveTokenHelper(files.helpers, host)
			for _, n := range notes {
				fmt.Fprintln(out, n)
			}
			if err != nil {
				return err
			}
			if removedHelper {
				fmt.Fprintf(out, "removed the token helper for %s from %s\n", host, files.helpers)
			}
			if !removedLogin && !removedHelper {
				return fmt.Errorf("no credentials for %s in %s or %s", host, files.docker, files.helpers)
			}
			return nil
		},
	}
}

// allCredentials finds the credential files and lists the entries of both, printing what is wrong with them as
// warnings; helpers come first for a host that has both (they win).
func (f *credFlags) allCredentials(cmd *cobra.Command) (credFiles, []install.Credential, error) {
	files, err := f.resolve(cmd)
	if err != nil {
		return files, nil, err
	}
	helpers, warnings, err := install.ListTokenHelpers(files.helpers)
	if err != nil {
		return files, nil, err
	}
	logins, w, err := install.ListDockerLogins(files.docker)
	if err != nil {
		return files, nil, err
	}
	for _, w := range append(warnings, w...) {
		fmt.Fprintln(cmd.ErrOrStderr(), "warning:", w)
	}
	all := append(helpers, logins...)
	slices.SortStableFunc(all, func(a, b install.Credential) int { return strings.Compare(a.Host, b.Host) })
	return files, all, nil
}

func newCredentialsListCmd(cf *credFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the registries with credentials and their users (never passwords)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			files, all, err := cf.allCredentials(cmd)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if len(all) == 0 {
				fmt.Fprintf(out, "no credentials in %s or %s\n", files.docker, files.helpers)
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REGISTRY\tUSER\tFROM")
			seen := map[string]bool{}
			for _, c := range all {
				from := c.Source
				if c.Helper != nil {
					from = fmt.Sprintf("token helper %q (renewed every %s) in %s", c.Helper.Command, shortDuration(c.Helper.Lifetime()), files.helpers)
				} else if seen[c.Host] {
					from += " (not used: the token helper wins)"
				}
				seen[c.Host] = true
				fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Registry, c.User, from)
			}
			return tw.Flush()
		},
	}
}

func newCredentialsVerifyCmd(cf *credFlags) *cobra.Command {
	var vf verifyFlags
	cmd := &cobra.Command{
		Use:   "verify [REGISTRY...]",
		Short: "Check the stored credentials against their registries",
		Long: `verify asks each registry with stored credentials (or each REGISTRY given) for its API root (GET /v2/, with the
registry's token exchange), using the credentials obd-snapshotter would use, and prints which work: OK,
unauthorized (with what to do) or unreachable. It fails when any does not work.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			files, all, err := cf.allCredentials(cmd)
			if err != nil {
				return err
			}
			docker, err := registry.LoadDockerConfig(files.docker)
			if err != nil {
				return err
			}
			creds, err := registry.NewHelperCredentials(files.helpers, docker)
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
			if len(args) > 0 {
				targets = nil
				for _, a := range args {
					h, err := registryArg(a)
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
			out := cmd.OutOrStdout()
			if len(targets) == 0 {
				fmt.Fprintf(out, "no credentials in %s or %s: nothing to verify\n", files.docker, files.helpers)
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REGISTRY\tUSER\tRESULT")
			failed := 0
			for _, t := range targets {
				err := vf.ping(cmd.Context(), t.host, files.cfg, creds.Credential, creds.Refresh)
				var result string
				switch {
				case err == nil:
					result = "OK"
				case errors.Is(err, registry.ErrUnauthorized):
					fix := fmt.Sprintf("run 'obd login %s' to store working credentials in %s", t.host, files.docker)
					if creds.Has(t.host) {
						fix = fmt.Sprintf("check the token helper (obd credentials list); set it again with 'obd credentials set %s --helper CMD'", t.host)
					}
					result = fmt.Sprintf("unauthorized (%s) — %s", cause(err), fix)
				case errors.Is(err, registry.ErrUnavailable):
					result = "unreachable: " + cause(err)
					var re *registry.Error
					if errors.As(err, &re) && re.Hint != "" {
						result += " — " + re.Hint
					}
				case errors.Is(err, registry.ErrNotFound):
					result = "not a registry: GET /v2/ answered 404"
				default:
					result = "failed: " + err.Error()
				}
				if err != nil {
					failed++
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", t.host, t.user, result)
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
		},
	}
	vf.registerReach(cmd.Flags())
	return cmd
}

// shortDuration formats d without zero units: 30m, 6h, 1h30m.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
