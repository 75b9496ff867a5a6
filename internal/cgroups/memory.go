package cgroups

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// MemoryLimit returns the memory limit of this process's cgroup: the least
// memory.max of its cgroup and of every ancestor up to the cgroup v2 mount
// (a Kubernetes pod has one on the pod's cgroup and one on the
// container's). ok is false when none sets a limit.
func MemoryLimit() (limit int64, ok bool, err error) {
	mount, err := Cgroup2Mount()
	if err != nil {
		return 0, false, err
	}
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	self, err := ownCgroup(f)
	if err != nil {
		return 0, false, err
	}
	return memoryLimitUnder(mount, self)
}

// ownCgroup reads the cgroup v2 path ("0::/path") of /proc/self/cgroup.
func ownCgroup(r io.Reader) (string, error) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		if p, ok := strings.CutPrefix(s.Text(), "0::"); ok {
			return p, nil
		}
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup v2 entry in /proc/self/cgroup")
}

// memoryLimitUnder walks from mount/self up to mount. The path of a cgroup
// namespace's root is "/", so inside a container this reads the
// container's cgroup at the mount itself.
func memoryLimitUnder(mount, self string) (limit int64, ok bool, err error) {
	dir := filepath.Join(mount, filepath.Clean("/"+self))
	for {
		b, err := os.ReadFile(filepath.Join(dir, "memory.max"))
		switch {
		case errors.Is(err, os.ErrNotExist):
			// The root cgroup has no memory.max; nor has a cgroup whose
			// parent does not enable the memory controller.
		case err != nil:
			return 0, false, err
		default:
			v := strings.TrimSpace(string(b))
			if v != "max" {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					return 0, false, fmt.Errorf("reading %s: %w", filepath.Join(dir, "memory.max"), err)
				}
				if !ok || n < limit {
					limit, ok = n, true
				}
			}
		}
		if dir == mount || dir == filepath.Dir(dir) {
			return limit, ok, nil
		}
		dir = filepath.Dir(dir)
	}
}
