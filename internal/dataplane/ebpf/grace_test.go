package ebpf

import (
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkKernelGracePeriod is what one wait costs in each way the kernel
// offers; a sync with deletions pays it once.
func BenchmarkKernelGracePeriod(b *testing.B) {
	outer, inner, err := newMapInMap()
	if err != nil {
		b.Fatal(err)
	}
	defer outer.Close()
	defer inner.Close()
	ways := []struct {
		name string
		g    *rcuGracePeriod
	}{
		{"membarrier", &rcuGracePeriod{membarrier: true}},
		{"map-in-map", &rcuGracePeriod{outer: outer, inner: inner}},
	}
	for _, w := range ways {
		b.Run(w.name, func(b *testing.B) {
			for b.Loop() {
				if err := w.g.wait(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	_ = unix.Getpid
}
