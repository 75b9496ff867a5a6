package cgroups

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCgroup2MountFrom(t *testing.T) {
	tests := []struct {
		name      string
		mountinfo string
		want      string
		wantErr   bool
	}{
		{
			name: "hybrid host",
			mountinfo: `25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw`,
			want: "/sys/fs/cgroup/unified",
		},
		{
			name:      "unified host with optional fields",
			mountinfo: `35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate`,
			want:      "/sys/fs/cgroup",
		},
		{
			name:      "cgroup v1 only",
			mountinfo: `40 31 0:37 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu`,
			wantErr:   true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cgroup2MountFrom(strings.NewReader(tt.mountinfo))
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("got %q, %v; want %q, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

// The hierarchy's root has no cgroup.events; every cgroup under it has.
func TestIsRoot(t *testing.T) {
	mount, err := Cgroup2Mount()
	if err != nil {
		t.Skip(err)
	}
	if _, err := os.Stat(filepath.Join(mount, "cgroup.events")); err == nil {
		t.Skipf("this test runs in a cgroup namespace: %s is not the hierarchy's root", mount)
	}
	if root, err := IsRoot(mount); err != nil || !root {
		t.Errorf("IsRoot(%s) = %v, %v; want true", mount, root, err)
	}
	// A cgroup of the test's own, as the test helpers make them.
	child, err := os.MkdirTemp(mount, "kbp-isroot-")
	if err != nil {
		t.Skip(err)
	}
	t.Cleanup(func() { os.Remove(child) })
	if root, err := IsRoot(child); err != nil || root {
		t.Errorf("IsRoot(%s) = %v, %v; want false", child, root, err)
	}
	if _, err := IsRoot(t.TempDir()); err == nil {
		t.Error("IsRoot of a directory that is no cgroup: no error")
	}
}
