package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

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

// files finds the credentials files: flags first, then obd.toml, then docker's defaults.
func (f *credFlags) files(cmd *cobra.Command) (install.CredFiles, error) {
	return install.FindCredFiles(f.configFile, f.helpersFile, f.obdConfig, cmd.Flags().Changed("obd-config"))
}

// registryAndFiles checks the REGISTRY argument and finds the credentials files.
func (f *credFlags) registryAndFiles(cmd *cobra.Command, arg string) (string, install.CredFiles, error) {
	host, err := install.RegistryHost(arg)
	if err != nil {
		return "", install.CredFiles{}, err
	}
	files, err := f.files(cmd)
	return host, files, err
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
			user, pass, err := install.ReadLogin(cmd.InOrStdin(), cmd.ErrOrStderr(), username, passwordStdin)
			if err != nil {
				return err
			}
			return files.Login(cmd.Context(), cmd.OutOrStdout(), host, user, pass, !vf.noVerify, vf.reach)
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
	noVerify bool
	reach    install.Reach
}

func (f *verifyFlags) register(fl *pflag.FlagSet) {
	fl.BoolVar(&f.noVerify, "no-verify", false, "save without checking the credentials against the registry")
	f.registerReach(fl)
}

func (f *verifyFlags) registerReach(fl *pflag.FlagSet) {
	fl.BoolVar(&f.reach.PlainHTTP, "plain-http", false, "talk HTTP to the registry (always so for localhost; see also [registry] plain_http)")
	fl.BoolVar(&f.reach.Insecure, "insecure", false, "do not verify the registry's TLS certificate (see also [registry] insecure)")
	fl.DurationVar(&f.reach.Timeout, "timeout", 15*time.Second, "how long to try to reach a registry")
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
				user, pass, err := install.ReadLogin(cmd.InOrStdin(), cmd.ErrOrStderr(), username, passwordStdin)
				if err != nil {
					return err
				}
				return files.SaveLogin(out, host, user, pass)
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
			return files.SaveHelper(cmd.Context(), out, host, h, !noVerify)
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
			return files.Remove(cmd.OutOrStdout(), host)
		},
	}
}

func newCredentialsListCmd(cf *credFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the registries with credentials and their users (never passwords)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			files, err := cf.files(cmd)
			if err != nil {
				return err
			}
			all, err := files.List(cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return files.WriteList(cmd.OutOrStdout(), all)
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
			files, err := cf.files(cmd)
			if err != nil {
				return err
			}
			return files.Verify(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), args, vf.reach)
		},
	}
	vf.registerReach(cmd.Flags())
	return cmd
}
