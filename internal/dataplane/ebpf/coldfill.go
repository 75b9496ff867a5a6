package ebpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// A cold node's first full sync writes every entry of every Service into
// empty maps: at 10k Services of 10 endpoints about 220k writes, one bpf()
// system call each, most of the time from the proxy's start until it
// serves. That sync queues its writes instead and applies them map by map,
// thousands per BPF_MAP_UPDATE_BATCH call (Linux 5.6; one write at a time
// where the kernel refuses it).
//
// The order of the maps keeps the reconciler's make-before-break rules for
// every Service at once: every backend is written before any slot or match
// entry names it, every slot and counter entry before any frontend's count
// covers it. Nothing is live before the sync (the maps held nothing of
// ours), so reordering writes within one map changes nothing a program can
// see. A delete, or a read, first applies everything queued, in that order.

// batchUpdater is implemented by maps that write many entries with one
// system call.
type batchUpdater[K comparable, V any] interface {
	UpdateBatch(keys []K, values []V) error
}

// writeBatch is the most entries one batch call writes: it bounds the copy
// the call marshals, not the number of calls that matters.
const writeBatch = 16384

// deferredMap queues a map's updates until its coldFill flushes them.
type deferredMap[K comparable, V any] struct {
	inner  Map[K, V]
	fill   *coldFill
	keys   []K
	values []V
	// tolerate, if set, takes a write that failed and lets the flush go
	// on: counters are not worth failing a port for.
	tolerate func(key K, err error)
}

func (d *deferredMap[K, V]) Update(key K, value V) error {
	if d.fill.err != nil {
		return d.fill.err
	}
	d.keys = append(d.keys, key)
	d.values = append(d.values, value)
	return nil
}

func (d *deferredMap[K, V]) Delete(key K) error {
	if err := d.fill.flush(); err != nil {
		return err
	}
	return d.inner.Delete(key)
}

func (d *deferredMap[K, V]) Iterate(fn func(K, V) error) error {
	if err := d.fill.flush(); err != nil {
		return err
	}
	return d.inner.Iterate(fn)
}

func (d *deferredMap[K, V]) flush() error {
	keys, values := d.keys, d.values
	d.keys, d.values = nil, nil
	if len(keys) == 0 {
		return nil
	}
	if b, ok := d.inner.(batchUpdater[K, V]); ok {
		err := b.UpdateBatch(keys, values)
		if err == nil || d.tolerate == nil {
			return err
		}
		// Find the writes that fail, one at a time; the rest are
		// rewritten, which changes nothing.
	}
	for i := range keys {
		if err := d.inner.Update(keys[i], values[i]); err != nil {
			if d.tolerate == nil {
				return err
			}
			d.tolerate(keys[i], err)
		}
	}
	return nil
}

// coldFill holds the deferred maps of one sync and the maps they stand for.
type coldFill struct {
	real Maps
	// flushers apply the deferred maps' queues in make-before-break order.
	flushers []func() error
	// err is the first flush failure: the maps then hold part of the
	// queue, and every later write of the sync fails with it.
	err error
}

// deferWrites makes r's per-port maps queue their updates until finish.
// The ClusterIP set and the Service ranges are written after the ports
// (syncRejects), once finish has applied them; deferRejects batches those.
func (r *reconciler) deferWrites() *coldFill {
	f := &coldFill{real: r.maps}
	backends := &deferredMap[uint32, backendKey]{inner: r.maps.Backends, fill: f}
	slots := &deferredMap[lbSlotKey, uint32]{inner: r.maps.Slots, fill: f}
	matches := &deferredMap[lbMatchKey, uint32]{inner: r.maps.Matches, fill: f}
	stats := &deferredMap[uint32, lbSvcStats]{inner: r.maps.Stats, fill: f,
		// As resetStatsIfNew: logged, and retried by the port's next sync.
		tolerate: func(id uint32, err error) {
			if g := r.groups[id]; g != nil {
				g.stats = false
				r.statsFailed(err, g.name, id)
			}
		}}
	services := &deferredMap[model.Frontend, lbSvcValue]{inner: r.maps.Services, fill: f}
	f.flushers = []func() error{backends.flush, slots.flush, matches.flush, stats.flush, services.flush}
	r.maps.Backends, r.maps.Slots, r.maps.Matches, r.maps.Stats, r.maps.Services = backends, slots, matches, stats, services
	return f
}

// deferRejects queues the ClusterIP set's and the Service ranges' updates
// until finish, then writes the set before the ranges, as syncRejects does
// one entry at a time: no range refuses an address before the set has it.
func (r *reconciler) deferRejects() *coldFill {
	f := &coldFill{real: r.maps}
	vips := &deferredMap[netip.Addr, uint32]{inner: r.maps.ClusterIPs, fill: f}
	ranges := &deferredMap[uint32, svcRange]{inner: r.maps.Ranges, fill: f}
	f.flushers = []func() error{vips.flush, ranges.flush}
	r.maps.ClusterIPs, r.maps.Ranges = vips, ranges
	return f
}

// flush applies every queue, in order, stopping at the first failure.
func (f *coldFill) flush() error {
	if f.err != nil {
		return f.err
	}
	for _, fl := range f.flushers {
		if err := fl(); err != nil {
			f.err = err
			return err
		}
	}
	return nil
}

// errColdFill marks a failure to apply the queued writes: the sync then
// writes entry by entry (reconciler.sync).
var errColdFill = errors.New("writing the first full sync's entries in batches")

// finish applies what is queued and gives r its maps back. On failure the
// maps hold only part of what r recorded: r reads them back first at its
// next sync, which sync runs at once, writing entry by entry.
func (f *coldFill) finish(r *reconciler) error {
	err := f.flush()
	r.maps = f.real
	if err != nil {
		r.reload = true
		return fmt.Errorf("%w: %w", errColdFill, err)
	}
	return nil
}

// inChunks writes n entries chunk at a time with batch(lo, hi), or, where
// the kernel has no batch operations, every entry from the first unwritten
// one on with one(i).
func inChunks(n, chunk int, batch func(lo, hi int) error, one func(i int) error) error {
	for lo := 0; lo < n; lo += chunk {
		err := batch(lo, min(n, lo+chunk))
		if errors.Is(err, ebpf.ErrNotSupported) {
			for i := lo; i < n; i++ {
				if err := one(i); err != nil {
					return err
				}
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// UpdateBatch writes entries writeBatch at a time, or one at a time where
// the kernel has no batch operations.
func (k *kernelMap[K, V]) UpdateBatch(keys []K, values []V) error {
	return inChunks(len(keys), writeBatch, func(lo, hi int) error {
		if _, err := k.m.BatchUpdate(keys[lo:hi], values[lo:hi], nil); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return err
			}
			return k.updateError(err)
		}
		return nil
	}, func(i int) error { return k.Update(keys[i], values[i]) })
}

// UpdateBatch writes each value on the first CPU and zero on the others,
// as Update does. A chunk holds every possible CPU's value of each key, so
// it is bounded in values, writeBatch in all (512 KiB), not in keys: on a
// node of hundreds of CPUs, a chunk of writeBatch keys would allocate tens
// of MiB at start.
func (p *perCPUMap) UpdateBatch(keys []uint32, values []lbSvcStats) error {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("updating %s: %w", p.name, err)
	}
	return inChunks(len(keys), max(1, writeBatch/cpus), func(lo, hi int) error {
		flat := make([]lbSvcStats, (hi-lo)*cpus)
		for i := range hi - lo {
			flat[i*cpus] = values[lo+i]
		}
		if _, err := p.m.BatchUpdate(keys[lo:hi], flat, nil); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return err
			}
			return p.updateError(err)
		}
		return nil
	}, func(i int) error { return p.Update(keys[i], values[i]) })
}
