package main

import (
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/registry"
)

// registryFlags say how to reach registries.
type registryFlags struct {
	plainHTTP, insecure bool
	creds               string
}

func (f *registryFlags) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&f.plainHTTP, "plain-http", false, "talk HTTP to the registry (always so for localhost)")
	cmd.Flags().BoolVar(&f.insecure, "insecure", false, "do not verify the registry's TLS certificate")
	cmd.Flags().StringVar(&f.creds, "creds", "", "registry credentials user:password (default: the docker config file)")
}

// credentials returns --creds, or the docker config file's credentials.
func (f *registryFlags) credentials() (registry.CredentialFunc, string, error) {
	return registry.UserCredentials(f.creds)
}

// client returns a registry client for host.
func (f *registryFlags) client(host string) (*registry.Client, error) {
	creds, source, err := f.credentials()
	if err != nil {
		return nil, err
	}
	return registry.New(registry.Options{
		PlainHTTP:        f.plainHTTP || registry.IsLocalhost(host),
		Insecure:         f.insecure,
		Credentials:      creds,
		CredentialSource: source,
		UserAgent:        "obd",
	})
}
