package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
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
	{"recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, func(o *lbObjects) *ebpf.Program { return o.KbpRecvmsg6 }},
	{"getpeername6", ebpf.AttachCgroupInet6GetPeername, func(o *lbObjects) *ebpf.Program { return o.KbpGetpeername6 }},
	{"sock_release", ebpf.AttachCgroupInetSockRelease, func(o *lbObjects) *ebpf.Program { return o.KbpSockRelease }},
}

// pinnedMaps are the maps we pin, with the flag that sizes each and the
// capacity it gives. The stats map has a fixed size set in lb.c.
var pinnedMaps = []struct {
	name     string
	flag     string
	capacity func(Config) uint32
}{
	{lbMapKbpServices, FlagMaxServices, func(c Config) uint32 { return c.MaxServices }},
	{lbMapKbpSlots, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }},
	{lbMapKbpBackends, FlagMaxBackends, func(c Config) uint32 { return c.MaxBackends }},
	{lbMapKbpRevnat, FlagMaxRevNAT, func(c Config) uint32 { return c.MaxSockets }},
	{lbMapKbpStats, "", nil},
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
// the programs to the cgroup. Links found pinned from an earlier run are
// updated in place, which swaps the program atomically: at no moment is the
// cgroup without one.
func load(cfg Config) (_ *kernelObjects, err error) {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("lifting the memlock limit for BPF maps: %w", err)
	}
	if err := ensureBPFFS(cfg.BPFFSPath); err != nil {
		return nil, err
	}
	spec, err := loadLb()
	if err != nil {
		return nil, err
	}
	for _, m := range pinnedMaps {
		if m.capacity != nil {
			spec.Maps[m.name].MaxEntries = m.capacity(cfg)
		}
	}
	resized, err := resizePinnedMaps(spec, cfg.BPFFSPath)
	if err != nil {
		return nil, err
	}
	defer closeMaps(resized) // the collection holds clones

	k := &kernelObjects{}
	opts := &ebpf.CollectionOptions{
		Maps:            ebpf.MapOptions{PinPath: cfg.BPFFSPath},
		MapReplacements: resized,
	}
	if err := spec.LoadAndAssign(&k.objs, opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("loading BPF programs: %+v", verr)
		}
		return nil, fmt.Errorf("loading BPF programs and maps: %w", err)
	}
	defer func() {
		if err != nil {
			k.Close()
		}
	}()

	cgroupID, err := cgroupID(cfg.CgroupPath)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.BPFFSPath, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("creating links directory: %w", err)
	}
	for _, p := range programs {
		l, err := attach(p, p.prog(&k.objs), cfg, cgroupID)
		if err != nil {
			return nil, err
		}
		k.links = append(k.links, l)
	}
	if err := pinResized(resized, cfg.BPFFSPath); err != nil {
		return nil, err
	}
	return k, nil
}

func attach(p program, prog *ebpf.Program, cfg Config, cgroupID uint64) (link.Link, error) {
	pin := filepath.Join(cfg.BPFFSPath, linksDir, p.name)
	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		info, infoErr := old.Info()
		if infoErr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == cgroupID {
			if err := old.Update(prog); err != nil {
				old.Close()
				return nil, fmt.Errorf("updating pinned %s link to the new program: %w", p.name, err)
			}
			klog.V(2).InfoS("Updated pinned program link", "program", p.name, "cgroup", cfg.CgroupPath)
			return old, nil
		}
		// Attached to another cgroup (the flag changed) or to one that is
		// gone: attach anew first, then drop the old link.
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cfg.CgroupPath, Attach: p.attach, Program: prog})
		if err != nil {
			old.Close()
			return nil, fmt.Errorf("attaching %s to %s: %w", p.name, cfg.CgroupPath, err)
		}
		if err := old.Unpin(); err != nil {
			klog.ErrorS(err, "Removing stale link pin", "pin", pin)
		}
		old.Close()
		if err := l.Pin(pin); err != nil {
			l.Close()
			return nil, fmt.Errorf("pinning %s link: %w", p.name, err)
		}
		klog.InfoS("Moved program to a new cgroup", "program", p.name, "cgroup", cfg.CgroupPath)
		return l, nil
	case errors.Is(err, os.ErrNotExist):
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cfg.CgroupPath, Attach: p.attach, Program: prog})
		if err != nil {
			return nil, fmt.Errorf("attaching %s to %s: %w", p.name, cfg.CgroupPath, err)
		}
		if err := l.Pin(pin); err != nil {
			l.Close()
			return nil, fmt.Errorf("pinning %s link (the kernel needs bpf_link support for cgroups, Linux 5.7+): %w", p.name, err)
		}
		klog.InfoS("Attached program", "program", p.name, "cgroup", cfg.CgroupPath)
		return l, nil
	default:
		return nil, fmt.Errorf("opening pinned %s link: %w", p.name, err)
	}
}

// resizePinnedMaps handles pinned maps that differ from their spec in
// capacity only (a --bpf-max-* flag changed): each gets a new map of the
// new size holding the old one's entries, to be used when the programs are
// loaded and pinned in its place once they are attached. The datapath keeps
// serving from the old map until the programs are swapped. Any other
// difference means a pin from an incompatible version.
func resizePinnedMaps(spec *ebpf.CollectionSpec, dir string) (_ map[string]*ebpf.Map, err error) {
	resized := make(map[string]*ebpf.Map)
	defer func() {
		if err != nil {
			closeMaps(resized)
		}
	}()
	for _, m := range pinnedMaps {
		pinned, err := ebpf.LoadPinnedMap(filepath.Join(dir, m.name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("opening pinned map %s: %w", m.name, err)
		}
		fresh, err := resized1(spec.Maps[m.name], pinned, m.flag)
		pinned.Close()
		if err != nil {
			return nil, err
		}
		if fresh != nil {
			resized[m.name] = fresh
		}
	}
	return resized, nil
}

// resized1 returns nil if pinned fits want as it is, else a resized copy.
func resized1(want *ebpf.MapSpec, pinned *ebpf.Map, flag string) (*ebpf.Map, error) {
	if want.Compatible(pinned) == nil {
		return nil, nil
	}
	sameButSize := want.Copy()
	sameButSize.MaxEntries = pinned.MaxEntries()
	if err := sameButSize.Compatible(pinned); err != nil || flag == "" {
		return nil, fmt.Errorf("pinned map %s was made by an incompatible version (%v): run --cleanup, then start again", want.Name, err)
	}
	fresh := want.Copy()
	fresh.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(fresh)
	if err != nil {
		return nil, fmt.Errorf("creating %s with %d entries (--%s): %w", want.Name, want.MaxEntries, flag, err)
	}
	var (
		key, value []byte
		copied     int
	)
	it := pinned.Iterate()
	for it.Next(&key, &value) {
		if err := m.Update(key, value, ebpf.UpdateAny); err != nil {
			m.Close()
			if errors.Is(err, unix.E2BIG) {
				return nil, fmt.Errorf("--%s=%d is too small for the %s entries already in use: raise it", flag, want.MaxEntries, want.Name)
			}
			return nil, fmt.Errorf("copying %s: %w", want.Name, err)
		}
		copied++
	}
	if err := it.Err(); err != nil {
		m.Close()
		return nil, fmt.Errorf("reading pinned %s: %w", want.Name, err)
	}
	klog.InfoS("Resizing pinned map", "map", want.Name, "flag", "--"+flag,
		"from", pinned.MaxEntries(), "to", want.MaxEntries, "entries", copied)
	return m, nil
}

// pinResized puts resized maps in place of the old pins. Programs already
// use them; the old maps go when their pins do.
func pinResized(resized map[string]*ebpf.Map, dir string) error {
	for name, m := range resized {
		path := filepath.Join(dir, name)
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("unpinning the old %s: %w", name, err)
		}
		if err := m.Pin(path); err != nil {
			return fmt.Errorf("pinning the resized %s: %w", name, err)
		}
	}
	return nil
}

func closeMaps(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}

// ensureBPFFS makes dir, mounting a bpffs on its parent first when neither
// is on one (a fresh node, or one whose runtime does not mount it).
func ensureBPFFS(dir string) error {
	if onBPFFS(dir) {
		return nil
	}
	parent := filepath.Dir(dir)
	if !onBPFFS(parent) {
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return fmt.Errorf("creating bpffs mount point %s: %w", parent, err)
		}
		if err := unix.Mount("bpffs", parent, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mounting bpffs on %s (or pass --bpffs-path on a mounted bpffs): %w", parent, err)
		}
		klog.InfoS("Mounted bpffs, it was not mounted", "path", parent)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	return nil
}

func onBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && uint32(st.Type) == uint32(unix.BPF_FS_MAGIC)
}

// cgroupID is the kernel's id of a cgroup v2 directory: its inode number.
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not a cgroup v2 directory; pass --cgroup-path", path)
	}
	return st.Ino, nil
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
		remove(filepath.Join(dir, linksDir, e.Name()))
	}
	remove(filepath.Join(dir, linksDir))
	for _, m := range pinnedMaps {
		remove(filepath.Join(dir, m.name))
	}
	remove(dir)
	return errors.Join(errs...)
}
