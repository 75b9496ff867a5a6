package ebpf

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// ensureBPFFS makes dir, mounting a bpffs on its parent first when neither
// is on one (a node whose init system does not mount /sys/fs/bpf), as
// Cilium does. It refuses to mount where the new bpffs could not be seen
// outside this process's mount namespace: in a container whose /sys/fs/bpf
// is a hostPath volume with mountPropagation HostToContainer, a bpffs
// mounted there would be the container's own, and the pins, and with them
// the datapath, would go with the container.
func ensureBPFFS(dir string) error {
	if onBPFFS(dir) {
		return nil
	}
	parent := filepath.Dir(dir)
	if !onBPFFS(parent) {
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return fmt.Errorf("creating bpffs mount point %s: %w", parent, err)
		}
		if err := mountWouldBeVisible(parent); err != nil {
			return err
		}
		if err := unix.Mount("bpffs", parent, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mounting bpffs on %s (mount one on the node, or pass --bpffs-path on a mounted bpffs): %w", parent, err)
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

// mountWouldBeVisible fails if a bpffs mounted on path would die with this
// process's mount namespace, taking the pins with it. A mount on a shared
// mount propagates to its peers (a hostPath volume with Bidirectional
// propagation reaches the node's namespace); any mount in the node's
// initial mount namespace lives as long as the node. Anything else - a
// slave mount (a hostPath volume with HostToContainer propagation, which
// receives the node's mounts and sends none back) or a private one in a
// container's namespace - is the container's own.
func mountWouldBeVisible(path string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("reading mount propagation: %w", err)
	}
	defer f.Close()
	m, err := mountOf(f, path)
	if err != nil {
		return err
	}
	initial, known := inInitialMountNamespace()
	return checkMountVisible(path, m, initial, known)
}

// checkMountVisible decides for mountWouldBeVisible. When the namespace is
// unknown (PID 1's namespace cannot be read, as in some sandboxes), only a
// slave mount is refused: it is how a container sees a hostPath volume
// with HostToContainer propagation, which the DaemonSet's bpffs volume has.
func checkMountVisible(path string, m mountEntry, initialNS, known bool) error {
	if m.shared || (known && initialNS) || (!known && !m.slave) {
		return nil
	}
	how := "is private to this mount namespace"
	if m.slave {
		how = "receives the node's mounts but propagates none back"
	}
	return fmt.Errorf("no bpffs on %s, and one mounted here would be private to this container "+
		"(%s %s): the pins would go with the container. "+
		"Mount bpffs on the node (systemd does at /sys/fs/bpf; else `mount -t bpf bpffs /sys/fs/bpf`) "+
		"or pass --bpffs-path on a mounted bpffs", path, m.point, how)
}

// inInitialMountNamespace reports whether this process shares the mount
// namespace of the node's init, and whether it could tell: in a PID
// namespace of a container (more than one entry in NSpid) it does not; in
// the initial PID namespace it does if it shares PID 1's mount namespace.
func inInitialMountNamespace() (initial, known bool) {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false, false
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok && len(strings.Fields(rest)) != 1 {
			return false, true // PID 1 here is the container's init, not the node's
		}
	}
	self, err1 := os.Readlink("/proc/self/ns/mnt")
	init, err2 := os.Readlink("/proc/1/ns/mnt")
	if err1 != nil || err2 != nil {
		return false, false
	}
	return self == init, true
}

// mountEntry is what mountinfo says of one mount.
type mountEntry struct {
	point  string
	shared bool // propagates to its peer group ("shared:N")
	slave  bool // receives from a master ("master:N")
}

// mountOf finds the mount holding path in mountinfo: the last-listed entry
// with the longest mount point that is path or one of its parents (a later
// mount on the same point hides an earlier one).
func mountOf(r io.Reader, path string) (mountEntry, error) {
	if p, err := filepath.EvalSymlinks(path); err == nil {
		path = p
	}
	var best mountEntry
	found := false
	s := bufio.NewScanner(r)
	for s.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(s.Text())
		if len(fields) < 7 {
			continue
		}
		point := unescapeMountinfo(fields[4])
		if !within(path, point) || (found && len(point) < len(best.point)) {
			continue
		}
		e := mountEntry{point: point}
		for _, opt := range fields[6:] {
			if opt == "-" {
				break
			}
			e.shared = e.shared || strings.HasPrefix(opt, "shared:")
			e.slave = e.slave || strings.HasPrefix(opt, "master:")
		}
		best, found = e, true
	}
	if err := s.Err(); err != nil {
		return mountEntry{}, fmt.Errorf("reading mountinfo: %w", err)
	}
	if !found {
		return mountEntry{}, fmt.Errorf("no mount holds %s in /proc/self/mountinfo", path)
	}
	return best, nil
}

// within reports whether path is point or below it.
func within(path, point string) bool {
	if point == "/" {
		return true
	}
	return path == point || strings.HasPrefix(path, point+"/")
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
