package ebpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
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
	Services Map[model.Frontend, lbSvcValue]
	Slots    Map[lbSlotKey, uint32]
	Backends Map[uint32, backendKey]
	// Stats holds one entry of counters per service id in use, summed
	// over CPUs (see perCPUMap). The reconciler only creates entries at
	// zero and deletes them.
	Stats Map[uint32, lbSvcStats]
	// Matches holds, for each service id with session affinity, an entry
	// per backend in its live slots, valued its affinity timeout in
	// seconds: what the programs check an affinity entry against.
	Matches Map[lbMatchKey, uint32]
	// ClusterIPs is the set of ClusterIPs (the value is unused), and
	// Ranges the Service address ranges, an array indexed from 0: what
	// refuses a connect to a ClusterIP port no Service has, or to an
	// unallocated Service address.
	ClusterIPs Map[netip.Addr, uint32]
	Ranges     Map[uint32, svcRange]
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
	return k.updateError(err)
}

// updateError says what a failed update means for the user.
func (k *kernelMap[K, V]) updateError(err error) error {
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

// perCPUMap adapts a per-CPU hash map of service counters as if it held one
// value per key: Iterate reports the sum over CPUs, and Update writes the
// value on the first CPU and zero on the others, so the sum is the value.
type perCPUMap struct {
	kernelMap[uint32, lbSvcStats]
}

func newPerCPUMap(m *ebpf.Map, name string) *perCPUMap {
	return &perCPUMap{kernelMap[uint32, lbSvcStats]{m: m, name: name, capacityFlag: capacityFlag(name)}}
}

func (p *perCPUMap) Update(key uint32, value lbSvcStats) error {
	// cilium/ebpf zeroes the CPUs past the slice's length.
	if err := p.m.Update(&key, []lbSvcStats{value}, ebpf.UpdateAny); err != nil {
		return p.updateError(err)
	}
	return nil
}

// Iterate reads the map in batches, as kernelMap.Iterate does: a per-CPU
// batch holds each key's values for every possible CPU one after another.
func (p *perCPUMap) Iterate(fn func(uint32, lbSvcStats) error) error {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("reading %s: %w", p.name, err)
	}
	keys := make([]uint32, iterateBatch)
	values := make([]lbSvcStats, iterateBatch*cpus)
	var cursor ebpf.MapBatchCursor
	for first := true; ; first = false {
		n, err := p.m.BatchLookup(&cursor, keys, values, nil)
		if first && errors.Is(err, ebpf.ErrNotSupported) {
			return p.iterateOneByOne(fn)
		}
		for i := range n {
			if err := fn(keys[i], sumStats(values[i*cpus:(i+1)*cpus])); err != nil {
				return err
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading %s: %w", p.name, err)
		}
	}
}

func (p *perCPUMap) iterateOneByOne(fn func(uint32, lbSvcStats) error) error {
	var (
		key    uint32
		values []lbSvcStats
	)
	it := p.m.Iterate()
	for it.Next(&key, &values) {
		if err := fn(key, sumStats(values)); err != nil {
			return err
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", p.name, err)
	}
	return nil
}

func sumStats(perCPU []lbSvcStats) lbSvcStats {
	var sum lbSvcStats
	for _, v := range perCPU {
		sum.Connections += v.Connections
		sum.Datagrams += v.Datagrams
		sum.Refused += v.Refused
		sum.Reverse += v.Reverse
	}
	return sum
}

// countEntries counts the keys of m, a map whose values are one V each
// (not per-CPU), in batches, values read and dropped.
func countEntries[K, V any](m *ebpf.Map) (int, error) {
	keys := make([]K, iterateBatch)
	values := make([]V, iterateBatch)
	var cursor ebpf.MapBatchCursor
	total := 0
	for first := true; ; first = false {
		n, err := m.BatchLookup(&cursor, keys, values, nil)
		if first && errors.Is(err, ebpf.ErrNotSupported) {
			var (
				k K
				v V
			)
			it := m.Iterate()
			for it.Next(&k, &v) {
				total++
			}
			return total, it.Err()
		}
		total += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}
