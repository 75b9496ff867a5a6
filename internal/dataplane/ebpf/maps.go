package ebpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Map is the access the reconciler needs to one BPF map. The kernel
// implementation wraps *ebpf.Map; tests use a fake that records operations
// and injects failures.
type Map[K comparable, V any] interface {
	Update(key K, value V) error
	// Delete removes key; deleting a missing key is not an error, so that a
	// retried sync can repeat deletes.
	Delete(key K) error
	// Iterate calls fn for each entry, in no particular order.
	Iterate(fn func(K, V) error) error
}

// Maps are the load-balancing maps the reconciler writes.
type Maps struct {
	Services Map[lbSvcKey, lbSvcValue]
	Slots    Map[lbSlotKey, uint32]
	Backends Map[uint32, lbBackendValue]
}

// ErrMapFull is wrapped by updates that failed because a map is at capacity.
var ErrMapFull = errors.New("BPF map is full")

// kernelMap adapts a loaded map. It knows the command-line flag that sizes
// it, so that a full map tells the user what to raise.
type kernelMap[K comparable, V any] struct {
	m            *ebpf.Map
	name         string
	capacityFlag string
}

func newKernelMap[K comparable, V any](m *ebpf.Map, name string) *kernelMap[K, V] {
	return &kernelMap[K, V]{m: m, name: name, capacityFlag: capacityFlag(name)}
}

func (k *kernelMap[K, V]) Update(key K, value V) error {
	err := k.m.Update(&key, &value, ebpf.UpdateAny)
	if err == nil {
		return nil
	}
	// Hash maps answer E2BIG when max_entries is reached. ENOMEM is another
	// matter: our maps allocate entries on demand (BPF_F_NO_PREALLOC), and
	// the kernel could not, which a bigger capacity would not fix.
	switch {
	case errors.Is(err, unix.E2BIG):
		return fmt.Errorf("updating %s: %w: all %d entries are in use; raise --%s",
			k.name, ErrMapFull, k.m.MaxEntries(), k.capacityFlag)
	case errors.Is(err, unix.ENOMEM):
		return fmt.Errorf("updating %s: the kernel could not allocate memory for the entry "+
			"(check the memory limit of this process's cgroup): %w", k.name, err)
	}
	return fmt.Errorf("updating %s: %w", k.name, err)
}

func (k *kernelMap[K, V]) Delete(key K) error {
	err := k.m.Delete(&key)
	if err == nil || errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return fmt.Errorf("deleting from %s: %w", k.name, err)
}

// iterateBatch is how many entries one BPF_MAP_LOOKUP_BATCH call reads.
const iterateBatch = 4096

// Iterate reads the map in batches (Linux 5.6+), one system call per
// iterateBatch entries instead of two per entry: restoring 10k services x 10
// backends goes from most of a second to a few tens of milliseconds.
func (k *kernelMap[K, V]) Iterate(fn func(K, V) error) error {
	keys := make([]K, iterateBatch)
	values := make([]V, iterateBatch)
	var cursor ebpf.MapBatchCursor
	for first := true; ; first = false {
		n, err := k.m.BatchLookup(&cursor, keys, values, nil)
		if first && errors.Is(err, ebpf.ErrNotSupported) {
			return k.iterateOneByOne(fn)
		}
		for i := range n {
			if err := fn(keys[i], values[i]); err != nil {
				return err
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil // the end
		}
		if err != nil {
			return fmt.Errorf("reading %s: %w", k.name, err)
		}
	}
}

func (k *kernelMap[K, V]) iterateOneByOne(fn func(K, V) error) error {
	var (
		key   K
		value V
	)
	it := k.m.Iterate()
	for it.Next(&key, &value) {
		if err := fn(key, value); err != nil {
			return err
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", k.name, err)
	}
	return nil
}
