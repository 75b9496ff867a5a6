package main

import (
	"runtime/debug"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/cgroups"
)

// defaultGCPercent is the proxy's GOGC when the environment sets none. The
// proxy's heap is mostly long-lived (informer caches, the model, the
// reconciler's copy of the maps) and allocates little between syncs, so
// collecting at 50 % growth rather than Go's 100 % costs little CPU and
// keeps the resident set near the live heap: see docs/memory.md for the
// measurements behind it.
const defaultGCPercent = 50

// memoryLimitShare is the part of the cgroup's memory limit given to the Go
// runtime as its soft limit when GOMEMLIMIT is unset: the rest is headroom
// for what the cgroup counts and the Go runtime does not (the binary's
// pages, page cache), so the collector works harder before the OOM killer
// would act.
const memoryLimitShare = 0.9

// memorySettings are the runtime settings applyMemoryDefaults chose.
type memorySettings struct {
	gcPercent   int   // 0: left to GOGC
	memoryLimit int64 // 0: left to GOMEMLIMIT, or none
}

// chooseMemorySettings picks the defaults for what the environment leaves
// unset: GOGC from defaultGCPercent, GOMEMLIMIT from the cgroup's memory
// limit (a pod's resources.limits.memory), if it has one.
func chooseMemorySettings(getenv func(string) string, cgroupLimit func() (int64, bool, error)) memorySettings {
	var s memorySettings
	if getenv("GOGC") == "" {
		s.gcPercent = defaultGCPercent
	}
	if getenv("GOMEMLIMIT") == "" {
		limit, ok, err := cgroupLimit()
		switch {
		case err != nil:
			klog.V(2).InfoS("Not setting a Go memory limit: cannot read the cgroup's", "err", err)
		case ok && limit > 0:
			s.memoryLimit = int64(float64(limit) * memoryLimitShare)
		}
	}
	return s
}

// applyMemoryDefaults sets the Go runtime's GC percentage and soft memory
// limit where the environment does not (GOGC, GOMEMLIMIT win).
func applyMemoryDefaults(getenv func(string) string) {
	s := chooseMemorySettings(getenv, cgroups.MemoryLimit)
	if s.gcPercent > 0 {
		debug.SetGCPercent(s.gcPercent)
	}
	if s.memoryLimit > 0 {
		debug.SetMemoryLimit(s.memoryLimit)
	}
	klog.V(1).InfoS("Go runtime memory settings", "gcPercent", s.gcPercent, "memoryLimitBytes", s.memoryLimit,
		"GOGC", getenv("GOGC"), "GOMEMLIMIT", getenv("GOMEMLIMIT"))
}
