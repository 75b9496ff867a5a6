package main

import (
	"runtime/debug"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/cgroups"
)

// defaultGCPercent is the proxy's GOGC, once its first sync has programmed
// the node, when the environment sets none. The heap is then mostly
// long-lived (informer caches, the model, the reconciler's copy of the
// maps) and allocates little between syncs, so collecting at 10 % growth
// rather than Go's 100 % costs little CPU when idle and keeps the resident
// set near the live heap: Go's background scavenger keeps about 10 % over
// the heap goal (the live heap times 1 + GOGC/100) mapped and returns the
// rest of the freed pages to the kernel. A sync that allocates much runs
// more collections for it. The cold start, which allocates most, runs with
// Go's default, so that it is not slowed: see docs/memory.md for the
// measurements.
const defaultGCPercent = 10

// memoryLimitShare is the part of the cgroup's memory limit given to the Go
// runtime as its soft limit when GOMEMLIMIT is unset: the rest is headroom
// for what the cgroup counts and the Go runtime does not (the binary's
// pages, page cache), so the collector works harder before the OOM killer
// would act.
const memoryLimitShare = 0.9

// memorySettings are the runtime settings applyMemoryDefaults chose.
type memorySettings struct {
	gcPercent   int   // after the first sync; 0: left to GOGC
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

// applyMemoryDefaults sets the Go runtime's soft memory limit where the
// environment does not (GOMEMLIMIT wins), and returns what to run once the
// first sync has programmed the node: the steady-state GC percentage (GOGC
// wins), then a collection that returns the cold start's garbage to the
// kernel, which the runtime would otherwise hand back only slowly.
func applyMemoryDefaults(getenv func(string) string) (afterFirstSync func()) {
	s := chooseMemorySettings(getenv, cgroups.MemoryLimit)
	if s.memoryLimit > 0 {
		debug.SetMemoryLimit(s.memoryLimit)
	}
	klog.V(1).InfoS("Go runtime memory settings", "gcPercentAfterFirstSync", s.gcPercent, "memoryLimitBytes", s.memoryLimit,
		"GOGC", getenv("GOGC"), "GOMEMLIMIT", getenv("GOMEMLIMIT"))
	return func() {
		if s.gcPercent > 0 {
			debug.SetGCPercent(s.gcPercent)
		}
		debug.FreeOSMemory()
	}
}
