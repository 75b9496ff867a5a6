package ebpf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Kernel is what the running kernel offers the programs beyond what they
// need (see Preflight), found by loading probe programs, never by reading
// the version: distribution kernels backport features.
type Kernel struct {
	// Release is uname -r, to name the kernel in messages.
	Release string
	// SetRetval: bpf_set_retval in cgroup programs (Linux 5.18). Without
	// it a refused connect() or sendmsg() fails with EPERM instead of
	// ECONNREFUSED.
	SetRetval bool
	// KtimeCoarse: bpf_ktime_get_coarse_ns (Linux 5.11). Without it,
	// session affinity reads the exact clock, which costs a little more.
	KtimeCoarse bool
	// NetnsCookie: user space can read a network namespace's cookie
	// (SO_NETNS_COOKIE, Linux 5.14), which tells the programs which
	// sockets are the node's. Without it, node ports on loopback
	// addresses are not served at socket level.
	NetnsCookie bool
}

// Degraded names what works differently on this kernel than on the newest,
// one entry per feature; empty when nothing does.
func (k Kernel) Degraded() []string {
	var out []string
	if !k.SetRetval {
		out = append(out, "refusals fail with EPERM, not ECONNREFUSED (bpf_set_retval: Linux 5.18)")
	}
	if !k.NetnsCookie {
		out = append(out, "node ports on loopback addresses are not served at socket level, and with --"+FlagHostNetNSOnly+
			" the node's own sockets are served per packet (SO_NETNS_COOKIE: Linux 5.14)")
	}
	return out
}

// A requirement is something the programs cannot run without, with the
// kernel that brought it, for the message when it is missing.
type requirement struct {
	what  string
	since string
	probe func() error
}

// requirements are checked in this order; the first missing one is
// reported. Hooks are probed by loading a program that does nothing for
// that hook: a kernel without it refuses the expected attach type.
var requirements = []requirement{
	{"BPF hash maps", "3.19", func() error { return features.HaveMapType(ebpf.Hash) }},
	{"BPF LRU hash maps", "4.10", func() error { return features.HaveMapType(ebpf.LRUHash) }},
	{"BPF per-CPU hash maps", "4.6", func() error { return features.HaveMapType(ebpf.PerCPUHash) }},
	{"cgroup/connect4 programs", "4.17", hookProbe(ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect)},
	{"cgroup/connect6 programs", "4.17", hookProbe(ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect)},
	{"cgroup/sendmsg4 programs", "4.18", hookProbe(ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Sendmsg)},
	{"cgroup/recvmsg4 and recvmsg6 programs", "5.2", hookProbe(ebpf.CGroupSockAddr, ebpf.AttachCGroupUDP4Recvmsg)},
	{"cgroup/getpeername4 and getpeername6 programs", "5.8", hookProbe(ebpf.CGroupSockAddr, ebpf.AttachCgroupInet4GetPeername)},
	{"cgroup/sock_release programs", "5.9", hookProbe(ebpf.CGroupSock, ebpf.AttachCgroupInetSockRelease)},
	{"bpf_get_socket_cookie in cgroup/connect4", "4.19", helperProbe(ebpf.CGroupSockAddr, asm.FnGetSocketCookie)},
	{"bpf_get_netns_cookie in cgroup/connect4", "5.7", helperProbe(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)},
	{"bpf_get_socket_cookie in cgroup/sock_release", "5.7", helperProbe(ebpf.CGroupSock, asm.FnGetSocketCookie)},
	{"read-only global data (frozen .rodata maps)", "5.2", func() error { return features.HaveMapFlag(features.BPF_F_RDONLY_PROG) }},
}

// hookProbe loads a program of type typ for attach type at that returns 1.
func hookProbe(typ ebpf.ProgramType, at ebpf.AttachType) func() error {
	return func() error {
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:       typ,
			AttachType: at,
			License:    "GPL",
			Instructions: asm.Instructions{
				asm.LoadImm(asm.R0, 1, asm.DWord),
				asm.Return(),
			},
		})
		if err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.E2BIG) {
				return fmt.Errorf("%w: %w", ebpf.ErrNotSupported, err)
			}
			return err
		}
		return p.Close()
	}
}

func helperProbe(typ ebpf.ProgramType, fn asm.BuiltinFunc) func() error {
	return func() error { return features.HaveProgramHelper(typ, fn) }
}

// PreflightError says why the eBPF mode cannot run on this node, in one
// line that names the kernel, what is missing and what to do.
type PreflightError struct {
	msg string
}

func (e *PreflightError) Error() string { return e.msg }

// Preflight checks, without changing anything on the node, that the eBPF
// mode can run here: the capabilities, cgroup v2 at cgroupPath, bpffs, and
// every kernel feature the programs need. It returns what the kernel offers
// beyond that, or a *PreflightError. A datapath already running stays as it
// is: nothing is unpinned or detached before this passes.
func Preflight(cgroupPath string) (Kernel, error) {
	k := Kernel{Release: kernelRelease()}
	fail := func(missing, todo string) (Kernel, error) {
		return k, &PreflightError{msg: fmt.Sprintf("the eBPF mode cannot run on this node (Linux %s): %s; %s", k.Release, missing, todo)}
	}
	if missing := missingCapabilities(); missing != "" {
		return fail("this process lacks "+missing,
			"grant it in the DaemonSet's securityContext (manifests/base/daemonset.yaml adds BPF, PERFMON and NET_ADMIN), or run as root")
	}
	if err := checkCgroup2(cgroupPath); err != nil {
		return fail(fmt.Sprintf("no cgroup v2 hierarchy at %s (%v)", cgroupPath, err),
			"boot the node with cgroup v2 (systemd.unified_cgroup_hierarchy=1, the default since systemd 247) or pass --cgroup-path")
	}
	if !kernelHasFilesystem("bpf") {
		return fail("the kernel has no bpf filesystem (CONFIG_BPF_SYSCALL)", "run on a kernel built with BPF, or start with --mode=iptables")
	}
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, probes too.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fail(fmt.Sprintf("the memlock limit cannot be lifted (%v)", err), "grant CAP_SYS_RESOURCE or raise RLIMIT_MEMLOCK for the proxy")
	}
	for _, r := range requirements {
		err := r.probe()
		switch {
		case err == nil:
		case errors.Is(err, ebpf.ErrNotSupported):
			return fail(fmt.Sprintf("the kernel has no %s (Linux %s)", r.what, r.since),
				"run on Linux 5.10 or later, or start with --mode=iptables")
		default:
			return fail(fmt.Sprintf("probing for %s failed: %v", r.what, err),
				"check the proxy's capabilities and the kernel's BPF settings (kernel.unprivileged_bpf_disabled does not matter; a LSM may), or start with --mode=iptables")
		}
	}
	var err error
	if k.SetRetval, err = optional(features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSetRetval)); err != nil {
		return fail(fmt.Sprintf("probing for bpf_set_retval failed: %v", err), "check the proxy's capabilities")
	}
	if k.KtimeCoarse, err = optional(features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnKtimeGetCoarseNs)); err != nil {
		return fail(fmt.Sprintf("probing for bpf_ktime_get_coarse_ns failed: %v", err), "check the proxy's capabilities")
	}
	k.NetnsCookie = haveNetnsCookie()
	return k, nil
}

// haveNetnsCookie reports whether a socket tells its network namespace's
// cookie (SO_NETNS_COOKIE, Linux 5.14).
func haveNetnsCookie() bool {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	_, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	return err == nil
}

// optional turns a probe's answer into whether the feature is there; only
// an inconclusive probe is an error.
func optional(err error) (bool, error) {
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ebpf.ErrNotSupported):
		return false, nil
	default:
		return false, err
	}
}

// setKernelConstants writes what k offers into the programs' read-only
// constants (kbp_have_* in bpf/lb.c) before they load.
func setKernelConstants(spec *ebpf.CollectionSpec, k Kernel) error {
	for name, v := range map[string]bool{
		lbVarKbpHaveSetRetval:   k.SetRetval,
		lbVarKbpHaveKtimeCoarse: k.KtimeCoarse,
	} {
		vs, ok := spec.Variables[name]
		if !ok {
			return fmt.Errorf("the BPF object has no constant %s", name)
		}
		var b uint8
		if v {
			b = 1
		}
		if err := vs.Set(b); err != nil {
			return fmt.Errorf("setting %s: %w", name, err)
		}
	}
	return nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// kernelHasFilesystem reports whether /proc/filesystems lists name.
func kernelHasFilesystem(name string) bool {
	f, err := os.Open("/proc/filesystems")
	if err != nil {
		return true // cannot tell: let the mount say
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 0 && fields[len(fields)-1] == name {
			return true
		}
	}
	return false
}

// Capability numbers (include/uapi/linux/capability.h).
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capPerfmon  = 38 // Linux 5.8
	capBPF      = 39 // Linux 5.8; before it, CAP_SYS_ADMIN loads programs
)

// missingCapabilities names the capabilities the eBPF mode needs that this
// process lacks in its effective set, or "" when it has them: loading
// cgroup programs needs CAP_BPF and CAP_NET_ADMIN, and the verifiers of
// Linux 5.10 to 6.1 refuse our programs without CAP_PERFMON too ("attempt
// to corrupt spilled pointer on stack": pointer spills are checked as for
// unprivileged programs). CAP_SYS_ADMIN stands for both BPF and PERFMON.
func missingCapabilities() string {
	eff, err := effectiveCapabilities(filepath.Join("/proc", "self", "status"))
	if err != nil {
		return "" // cannot tell: the probes will
	}
	has := func(c uint) bool { return eff&(1<<c) != 0 }
	var missing []string
	if !has(capSysAdmin) {
		if !has(capBPF) {
			missing = append(missing, "CAP_BPF")
		}
		if !has(capPerfmon) {
			missing = append(missing, "CAP_PERFMON")
		}
	}
	if !has(capNetAdmin) {
		missing = append(missing, "CAP_NET_ADMIN")
	}
	return strings.Join(missing, " and ")
}

// effectiveCapabilities reads CapEff from a /proc/PID/status file.
func effectiveCapabilities(statusPath string) (uint64, error) {
	f, err := os.Open(statusPath)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no CapEff in %s", statusPath)
}
