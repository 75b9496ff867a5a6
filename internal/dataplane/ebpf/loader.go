package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Config says where the datapath lives and how big its maps are.
type Config struct {
	// BPFFSPath is the directory of our pins on a bpffs; bpffs is mounted on
	// its parent if it is not there yet.
	BPFFSPath string
	// CgroupPath is the cgroup v2 directory the programs attach to: the
	// root on a node, a test's own cgroup in tests.
	CgroupPath  string
	MaxServices uint32
	MaxBackends uint32
	MaxSockets  uint32
	// MaxFrontends sizes the frontend map: ClusterIPs, and NodePorts on
	// each node address, external IPs and LoadBalancer IPs; 0 is four per
	// service port (--bpf-frontends-max).
	MaxFrontends uint32
	// MaxAffinity sizes the session affinity map: (client network
	// namespace, Service port) pairs; 0 is DefaultMaxAffinity
	// (--bpf-affinity-max).
	MaxAffinity uint32
	// NodeNetNS is the node's network namespace, as a path to its nsfs
	// file, where connected UDP sockets of removed backends are destroyed
	// (see sockets.go); empty means this process's own, which is the
	// node's in the DaemonSet (hostNetwork). Tests name their own.
	NodeNetNS string
	// NetNSDirs are directories of pinned pod network namespaces whose
	// sockets are destroyed likewise (DefaultNetNSDirs on a node); none if
	// empty. Tests name a directory of their own pods' namespaces only.
	// Unused with HostNetNSOnly: pods' sockets are never translated then.
	NetNSDirs []string
	// HostNetNSOnly confines socket-level load balancing to the node's
	// network namespace (NodeNetNS): sockets of every other namespace, the
	// pods', are neither translated nor refused, and their packets meet
	// the packet layer's rules, which must then serve the ClusterIPs too
	// (iptables.Config.ClusterIPs). For service meshes whose sidecars
	// redirect a pod's traffic with iptables and read the original
	// destination: they must see the Service address.
	HostNetNSOnly bool

	// ops does the steps of the program swap; nil is the kernel. Tests
	// set it to fail a step.
	ops swapOps
	// withoutFeatures, in tests, loads the programs as for a kernel that
	// lacks what it clears of the probes' answer.
	withoutFeatures func(*Kernel)
}

// withDefaults fills the capacities a caller may leave at 0.
func (c Config) withDefaults() Config {
	if c.MaxFrontends == 0 {
		c.MaxFrontends = 4 * c.MaxServices
	}
	if c.MaxAffinity == 0 {
		c.MaxAffinity = DefaultMaxAffinity
	}
	return c
}

// program is one of our socket programs and where it hooks.
type program struct {
	name   string // pin name under links/
	attach ebpf.AttachType
	prog   func(*lbObjects) *ebpf.Program
}

var programs = []program{
	{"connect4", ebpf.AttachCGroupInet4Connect, func(o *lbObjects) *ebpf.Program { return o.KbpConnect4 }},
	{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, func(o *lbObjects) *ebpf.Program { return o.KbpSendmsg4 }},
	{"recvmsg4", ebpf.AttachCGroupUDP4Recvmsg, func(o *lbObjects) *ebpf.Program { return o.KbpRecvmsg4 }},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername, func(o *lbObjects) *ebpf.Program { return o.KbpGetpeername4 }},
	{"connect6", ebpf.AttachCGroupInet6Connect, func(o *lbObjects) *ebpf.Program { return o.KbpConnect6 }},
	{"sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, func(o *lbObjects) *ebpf.Program { return o.KbpSendmsg6 }},
	{"recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, func(o *lbObjects) *ebpf.Program { return o.KbpRecvmsg6 }},
	{"getpeername6", ebpf.AttachCgroupInet6GetPeername, func(o *lbObjects) *ebpf.Program { return o.KbpGetpeername6 }},
	{"sock_release", ebpf.AttachCgroupInetSockRelease, func(o *lbObjects) *ebpf.Program { return o.KbpSockRelease }},
}

// pinnedMaps are the maps we pin, with the flag that sizes each and the
// capacity it gives; those without have the size lb.c gives them. A map a
// datapath pinned by an earlier version lacks is created at start.
var pinnedMaps = []struct {
	name     string
	flag     string
	capacity func(Config) uint32
	// replaces tells whether a pinned map of another layout is an
	// earlier version's that a start replaces with a new map of its own
	// (pinned when the swap commits; load carries over what entries it
	// can); nil: such a map is an error.
	replaces func(*ebpf.Map) bool
}{
	{lbMapKbpServices, FlagMaxFrontends, func(c Config) uint32 { return c.MaxFrontends }, nil},
	{lbMapKbpSlots, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }, nil},
	{lbMapKbpBackends, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }, nil},
	{lbMapKbpRevnat, FlagMaxRevNAT, func(c Config) uint32 { return c.MaxSockets }, isLRURevnat},
	// One entry per event; it grows when a version adds events.
	{lbMapKbpStats, "", nil, nil},
	// One entry per service id, and ids go up to --bpf-service-ports-max.
	{lbMapKbpSvcStats, FlagMaxServices, func(c Config) uint32 { return c.MaxServices }, nil},
	{lbMapKbpAffinity, FlagMaxAffinity, func(c Config) uint32 { return c.MaxAffinity }, nil},
	// At most one entry per slot.
	{lbMapKbpAffMatch, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }, nil},
	// At most one ClusterIP per service port.
	{lbMapKbpClusterIps, FlagMaxServices, func(c Config) uint32 { return c.MaxServices }, nil},
	{lbMapKbpSvcRanges, "", nil, nil},
	{lbMapKbpNode, "", nil, nil},
	// The IPv6 maps, sized by the same flags as the IPv4 ones: each
	// family has its own maps of those sizes. A datapath pinned by a
	// version without them gets them created at start, empty.
	{lbMapKbp6Services, FlagMaxFrontends, func(c Config) uint32 { return c.MaxFrontends }, nil},
	{lbMapKbp6Slots, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }, nil},
	{lbMapKbp6Backends, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }, nil},
	{lbMapKbp6Revnat, FlagMaxRevNAT, func(c Config) uint32 { return c.MaxSockets }, nil},
	{lbMapKbp6SvcStats, FlagMaxServices, func(c Config) uint32 { return c.MaxServices }, nil},
	{lbMapKbp6Affinity, FlagMaxAffinity, func(c Config) uint32 { return c.MaxAffinity }, nil},
	{lbMapKbp6AffMatch, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }, nil},
	{lbMapKbp6Clusterips, FlagMaxServices, func(c Config) uint32 { return c.MaxServices }, nil},
	{lbMapKbp6SvcRanges, "", nil, nil},
}

// isLRURevnat tells whether m is kbp_revnat as versions before the
// per-socket entries made it: an LRU hash of {cookie, backend address,
// port} -> frontend, whose entries could outlive their sockets. Only the
// entries of open connected UDP sockets are carried over
// (migrateLegacyRevnat): an entry copied for a closed socket would never
// be deleted. Other sockets translated before the upgrade show their
// backend's address to recvmsg and getpeername from then on.
func isLRURevnat(m *ebpf.Map) bool {
	return m.Type() == ebpf.LRUHash && m.KeySize() == 16 && m.ValueSize() == 8
}

// capacityFlag names the flag that sizes a map.
func capacityFlag(name string) string {
	for _, m := range pinnedMaps {
		if m.name == name {
			return m.flag
		}
	}
	return ""
}

const linksDir = "links"

// kernelObjects are the loaded programs, pinned maps and attached links.
type kernelObjects struct {
	objs  lbObjects
	links []link.Link
	// kernel is what the programs were loaded for.
	kernel Kernel
}

func (k *kernelObjects) Close() error {
	var errs []error
	for _, l := range k.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, k.objs.Close())
	return errors.Join(errs...)
}

// load loads the programs, opens or creates the pinned maps, and attaches
// the programs to the cgroup, replacing the links an earlier run pinned. The
// swap is all or nothing, and at no moment is a hook without a program (see
// swap).
func load(cfg Config) (_ *kernelObjects, err error) {
	// Before anything on the node changes: a kernel or a pod that cannot
	// run the programs leaves a running datapath's pins serving.
	kernel, err := Preflight(cfg.CgroupPath)
	if err != nil {
		return nil, err
	}
	if err := ensureBPFFS(cfg.BPFFSPath); err != nil {
		return nil, err
	}
	spec, err := loadLb()
	if err != nil {
		return nil, err
	}
	if cfg.withoutFeatures != nil {
		cfg.withoutFeatures(&kernel)
	}
	if err := setKernelConstants(spec, kernel); err != nil {
		return nil, err
	}
	for _, m := range pinnedMaps {
		if m.capacity != nil {
			spec.Maps[m.name].MaxEntries = m.capacity(cfg)
		}
	}
	if err := os.MkdirAll(filepath.Join(cfg.BPFFSPath, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("creating links directory: %w", err)
	}

	k := &kernelObjects{kernel: kernel}
	sw := newSwap(cfg.ops)
	defer func() {
		if err != nil {
			err = sw.rollback(err)
			k.Close()
		}
		sw.release()
	}()
	maps, err := sw.openMaps(spec, cfg.BPFFSPath)
	if err != nil {
		return nil, err
	}
	// Every map is given, so the collection pins none itself.
	if err := spec.LoadAndAssign(&k.objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("loading BPF programs: %+v", verr)
		}
		return nil, fmt.Errorf("loading BPF programs and maps: %w", err)
	}
	for _, p := range programs {
		l, err := sw.attachProgram(p, p.prog(&k.objs), cfg)
		if err != nil {
			return nil, err
		}
		k.links = append(k.links, l)
	}
	if pinned := sw.resizedFrom[lbMapKbpRevnat]; pinned != nil {
		resyncRevnat[lbSockRevnat](pinned, k.objs.KbpRevnat, lbMapKbpRevnat)
	}
	if pinned := sw.resizedFrom[lbMapKbp6Revnat]; pinned != nil {
		resyncRevnat[lbSockRevnat6](pinned, k.objs.Kbp6Revnat, lbMapKbp6Revnat)
	}
	if legacy := sw.legacy[lbMapKbpRevnat]; legacy != nil {
		migrateLegacyRevnat(legacy, k.objs.KbpRevnat, kernelSocketHost{nodeNetNS: cfg.NodeNetNS, dirs: cfg.NetNSDirs})
	}
	if err := sw.commit(); err != nil {
		return nil, err
	}
	klog.InfoS("Programs in place", "cgroup", cfg.CgroupPath, "programs", len(k.links), "replaced", len(sw.replaced),
		"kernel", kernel.Release, "setRetval", kernel.SetRetval, "ktimeCoarse", kernel.KtimeCoarse, "netnsCookie", kernel.NetnsCookie)
	for _, d := range kernel.Degraded() {
		klog.InfoS("Degraded on this kernel", "kernel", kernel.Release, "feature", d)
	}
	return k, nil
}

// resized1 returns nil if pinned fits want as it is, else a resized copy.
// A map sized by a flag is resized either way; one whose size lb.c fixes
// only grows (a version that adds events), as it is never smaller in a
// later version.
func resized1(want *ebpf.MapSpec, pinned *ebpf.Map, flag string) (*ebpf.Map, error) {
	if want.Compatible(pinned) == nil {
		return nil, nil
	}
	sameButSize := want.Copy()
	sameButSize.MaxEntries = pinned.MaxEntries()
	if err := sameButSize.Compatible(pinned); err != nil || (flag == "" && want.MaxEntries < pinned.MaxEntries()) {
		return nil, fmt.Errorf("pinned map %s was made by an incompatible version (%v): run --cleanup, then start again", want.Name, err)
	}
	fresh := want.Copy()
	fresh.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(fresh)
	if err != nil {
		return nil, fmt.Errorf("creating %s with %d entries (--%s): %w", want.Name, want.MaxEntries, flag, err)
	}
	var copied int
	switch want.Type {
	case ebpf.PerCPUHash:
		copied, err = copyEntries[[]lbSvcStats](m, pinned)
	case ebpf.PerCPUArray:
		copied, err = copyEntries[[]uint64](m, pinned)
	default:
		copied, err = copyEntries[[]byte](m, pinned)
	}
	if err != nil {
		m.Close()
		if errors.Is(err, unix.E2BIG) {
			return nil, fmt.Errorf("--%s=%d is too small for the %s entries already in use: raise it", flag, want.MaxEntries, want.Name)
		}
		return nil, fmt.Errorf("copying %s: %w", want.Name, err)
	}
	klog.InfoS("Resizing pinned map", "map", want.Name, "flag", "--"+flag,
		"from", pinned.MaxEntries(), "to", want.MaxEntries, "entries", copied)
	return m, nil
}

// copyEntries copies every entry of from into to. V is how a value is read
// and written: raw bytes, except for a per-CPU map, whose value cilium/ebpf
// reads and writes as a slice of one value per possible CPU (kbp_svc_stats
// and kbp_stats are the per-CPU maps that are resized).
func copyEntries[V any](to, from *ebpf.Map) (int, error) {
	var (
		key    []byte
		value  V
		copied int
	)
	it := from.Iterate()
	for it.Next(&key, &value) {
		if err := to.Update(key, value, ebpf.UpdateAny); err != nil {
			return copied, err
		}
		copied++
	}
	if err := it.Err(); err != nil {
		return copied, fmt.Errorf("reading the pinned map: %w", err)
	}
	return copied, nil
}

// checkCgroup2 fails unless path is a cgroup v2 directory.
func checkCgroup2(path string) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return fmt.Errorf("cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not a cgroup v2 directory; pass --cgroup-path", path)
	}
	return nil
}

// Cleanup removes every pin this binary owns under dir: unpinning the links
// detaches the programs (nothing else holds them), unpinning the maps frees
// them. Other files directly under dir are left alone, so a --bpffs-path
// pointed at a shared directory by mistake loses nothing of others'.
// Cleaning an absent datapath succeeds.
func Cleanup(dir string) error {
	var errs []error
	remove := func(path string) {
		err := os.Remove(path)
		switch {
		case err == nil:
			klog.V(2).InfoS("Removed", "pin", path)
		case !errors.Is(err, os.ErrNotExist):
			errs = append(errs, err)
		}
	}
	// Every link pin goes, also those of programs another version had:
	// links/ is ours alone.
	entries, err := os.ReadDir(filepath.Join(dir, linksDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, e := range entries {
		path := filepath.Join(dir, linksDir, e.Name())
		// Detached first: the kernel releases a link whose last pin goes
		// in a work item, so its program could still run for a moment
		// after the pin is gone; Cleanup returns when none does.
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			if err := detach(l); err != nil {
				errs = append(errs, fmt.Errorf("detaching %s: %w", path, err))
			}
		}
		remove(path)
	}
	remove(filepath.Join(dir, linksDir))
	for _, m := range pinnedMaps {
		remove(filepath.Join(dir, m.name))
		remove(filepath.Join(dir, m.name+pinSuffix))
	}
	remove(dir)
	return errors.Join(errs...)
}
