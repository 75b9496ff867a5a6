package cgroups

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMemoryLimitUnder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		files  map[string]string // path under the mount -> memory.max
		self   string
		want   int64
		wantOK bool
	}{
		{"no limit anywhere", map[string]string{"kubepods/pod1/ctr/memory.max": "max", "kubepods/pod1/memory.max": "max"}, "/kubepods/pod1/ctr", 0, false},
		{"container limit", map[string]string{"kubepods/pod1/ctr/memory.max": "268435456", "kubepods/pod1/memory.max": "max"}, "/kubepods/pod1/ctr", 256 << 20, true},
		{"pod limit below the container's", map[string]string{"kubepods/pod1/ctr/memory.max": "268435456\n", "kubepods/pod1/memory.max": "134217728\n"}, "/kubepods/pod1/ctr", 128 << 20, true},
		{"cgroup namespace root", map[string]string{"memory.max": "104857600"}, "/", 100 << 20, true},
		{"no memory controller", map[string]string{}, "/a/b", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mount := t.TempDir()
			if err := os.MkdirAll(filepath.Join(mount, tc.self), 0o755); err != nil {
				t.Fatal(err)
			}
			for p, v := range tc.files {
				if err := os.MkdirAll(filepath.Dir(filepath.Join(mount, p)), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(mount, p), []byte(v), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, ok, err := memoryLimitUnder(mount, tc.self)
			if err != nil || got != tc.want || ok != tc.wantOK {
				t.Errorf("memoryLimitUnder = %d, %t, %v; want %d, %t", got, ok, err, tc.want, tc.wantOK)
			}
		})
	}
}

func TestOwnCgroup(t *testing.T) {
	got, err := ownCgroup(strings.NewReader("12:memory:/old\n0::/kubepods/pod1/ctr\n"))
	if err != nil || got != "/kubepods/pod1/ctr" {
		t.Errorf("ownCgroup = %q, %v", got, err)
	}
	if _, err := ownCgroup(strings.NewReader("12:memory:/old\n")); err == nil {
		t.Error("cgroup v1 only: want an error")
	}
}

// The machine's own answer: whatever it is, reading it works.
func TestMemoryLimitHere(t *testing.T) {
	if _, _, err := MemoryLimit(); err != nil {
		t.Fatal(err)
	}
}
