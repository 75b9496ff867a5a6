package ebpf

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// gracePeriod waits until every program run that may have read the maps
// before the call has returned. The reconciler calls it between the writes
// that make entries unreachable and the deletes of those entries: a connect
// that read a service's old count, or a slot's old backend id, a moment
// before an update must still find what it read.
type gracePeriod interface {
	wait() error
}

// The cgroup sock_addr programs run under rcu_read_lock()
// (bpf_prog_run_array_cg), so an RCU grace period that starts after a write
// ends only once every program run that could have seen the old value has
// returned.
const (
	membarrierCmdQuery  = 0
	membarrierCmdGlobal = 1 << 0 // Linux 4.16; MEMBARRIER_CMD_SHARED before
)

// rcuGracePeriod waits for an RCU grace period from user space, in the
// first of these ways the kernel allows:
//
//   - membarrier(MEMBARRIER_CMD_GLOBAL) runs synchronize_rcu(). The kernel
//     refuses it under nohz_full, and skips the wait altogether when only one
//     CPU is online, where a program preempted inside its read-side section
//     (CONFIG_PREEMPT_RCU) could still be running: it is used only while
//     more than one CPU is online.
//   - an update of a map-in-map: since Linux 4.20 (commit 1ae80cf31938) the
//     bpf() syscall waits in synchronize_rcu() after changing an outer map,
//     so that user space knows no program still uses the inner map it
//     replaced. Two one-entry maps of our own, never read by a program.
//   - failing both, a fixed sleep far longer than a program run, logged.
type rcuGracePeriod struct {
	membarrier bool
	outer      *ebpf.Map
	inner      *ebpf.Map
}

// fallbackSleep stands in for a grace period on a kernel that offers no way
// to wait for one; sock_addr programs run for microseconds.
const fallbackSleep = 50 * time.Millisecond

func newRCUGracePeriod() *rcuGracePeriod {
	g := &rcuGracePeriod{}
	mask, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdQuery, 0, 0)
	g.membarrier = errno == 0 && mask&membarrierCmdGlobal != 0
	outer, inner, err := newMapInMap()
	if err == nil {
		g.outer, g.inner = outer, inner
	} else {
		klog.InfoS("Cannot wait for running BPF programs with a map-in-map update", "err", err)
	}
	if !g.membarrier && g.outer == nil {
		klog.InfoS("This kernel offers no way to wait for running BPF programs: deletions wait a fixed time instead",
			"wait", fallbackSleep)
	}
	klog.V(2).InfoS("Waiting for running BPF programs before deletions", "membarrier", g.membarrier, "mapInMap", g.outer != nil)
	return g
}

func newMapInMap() (outer, inner *ebpf.Map, err error) {
	innerSpec := &ebpf.MapSpec{Name: "kbp_grace_in", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	inner, err = ebpf.NewMap(innerSpec)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the inner map: %w", err)
	}
	outer, err = ebpf.NewMap(&ebpf.MapSpec{Name: "kbp_grace", Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4,
		MaxEntries: 1, InnerMap: innerSpec})
	if err != nil {
		inner.Close()
		return nil, nil, fmt.Errorf("creating the outer map: %w", err)
	}
	return outer, inner, nil
}

func (g *rcuGracePeriod) wait() error {
	if g.membarrier && moreThanOneCPUOnline() {
		_, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0)
		if errno == 0 {
			return nil
		}
		klog.V(2).InfoS("membarrier(MEMBARRIER_CMD_GLOBAL) failed, waiting another way", "err", errno)
	}
	if g.outer != nil {
		if err := g.outer.Put(uint32(0), g.inner); err != nil {
			return fmt.Errorf("map-in-map update: %w", err)
		}
		return nil
	}
	time.Sleep(fallbackSleep)
	return nil
}

// moreThanOneCPUOnline reads /sys/devices/system/cpu/online ("0", "0-3",
// "0,2-5"); when it cannot tell, it says no, which picks the map-in-map wait.
func moreThanOneCPUOnline() bool {
	data, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		return false
	}
	s := strings.TrimSpace(string(data))
	return strings.ContainsAny(s, ",-")
}

func (g *rcuGracePeriod) Close() error {
	var errs []error
	if g.outer != nil {
		errs = append(errs, g.outer.Close(), g.inner.Close())
	}
	return errors.Join(errs...)
}
