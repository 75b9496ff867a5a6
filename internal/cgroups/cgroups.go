// Package cgroups finds the cgroup v2 hierarchy.
package cgroups

import (
	"bufio"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Cgroup2Mount returns where cgroup v2 is mounted, read from
// /proc/self/mountinfo: /sys/fs/cgroup on most nodes, /sys/fs/cgroup/unified
// on hybrid hosts.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	return cgroup2MountFrom(f)
}

func cgroup2MountFrom(r io.Reader) (string, error) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(s.Text())
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return fields[4], nil
			}
		}
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 mount in /proc/self/mountinfo: mount cgroup v2 or pass --cgroup-path")
}

// IsRoot reports whether dir is the root cgroup of its cgroup v2 hierarchy.
// The kernel gives every cgroup but the root a cgroup.events file
// (CFTYPE_NOT_ON_ROOT, since cgroup v2 itself, Linux 4.5), so a cgroup
// namespace's root, which is what a container's /sys/fs/cgroup shows when
// the runtime gives it a namespace of its own, is told from the node's.
func IsRoot(dir string) (bool, error) {
	if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err != nil {
		return false, err
	}
	_, err := os.Stat(filepath.Join(dir, "cgroup.events"))
	switch {
	case err == nil:
		return false, nil
	case errors.Is(err, os.ErrNotExist):
		return true, nil
	}
	return false, err
}
