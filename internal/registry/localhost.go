package registry

import (
	"net"
	"strings"
)

// IsLocalhost reports whether host (host[:port]) names this machine, where registries are usually plain HTTP
// (containerd and docker treat them so too).
func IsLocalhost(host string) bool {
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	h = strings.Trim(h, "[]")
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}
