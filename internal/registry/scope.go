package registry

import (
	"context"
	"strings"

	"oras.land/oras-go/v2/registry/remote/auth"
)

// RequestRepository returns the repository a request to the registry host ("host[:port]", as a CredentialFunc
// receives it) is made for: the pull scope the Client puts in the context of every blob and manifest request.
// It is "" for requests that name no repository (a ping). A CredentialFunc uses it to answer per repository.
func RequestRepository(ctx context.Context, host string) string {
	hosts := []string{host}
	if host == apiHost("docker.io") { // Docker Hub: the scope names docker.io, the request goes to its API host
		hosts = append(hosts, "docker.io")
	}
	for _, h := range hosts {
		for _, s := range auth.GetScopesForHost(ctx, h) {
			rest, ok := strings.CutPrefix(s, "repository:") // "repository:<name>:<actions>"
			if i := strings.LastIndexByte(rest, ':'); ok && i > 0 {
				return rest[:i]
			}
		}
	}
	return ""
}
