// Package version says which build of kube-bpf-proxy is running, for
// --version and the kube_bpf_proxy_info metric.
package version

import (
	"runtime/debug"
)

// stamp is set at link time by release builds:
//
//	go build -ldflags "-X github.com/kube-bpf-proxy/kube-bpf-proxy/internal/version.stamp=v0.3.0"
var stamp string

// Get returns the build's version: the link-time stamp if there is one;
// else the module version Go recorded (a tag, or a pseudo-version derived
// from the commit when built from a git checkout); else the commit itself,
// with "-dirty" for uncommitted changes; else "unknown" (a build from a
// source tree without git metadata).
func Get() string {
	if stamp != "" {
		return stamp
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	return fromBuildInfo(info)
}

func fromBuildInfo(info *debug.BuildInfo) string {
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev string
	dirty := false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "unknown"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if dirty {
		rev += "-dirty"
	}
	return rev
}
