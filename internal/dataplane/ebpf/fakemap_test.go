package ebpf

import (
	"fmt"
	"maps"
	"sort"
	"strings"
)

// fakeMap is an in-memory Map with a capacity, an operation log and failure
// injection, so reconciler logic is tested without a kernel.
type fakeMap[K comparable, V any] struct {
	name     string
	capacity int
	entries  map[K]V
	log      *[]string
	onOp     *func()
	// describe renders an entry for the log; value is nil for deletes.
	describe func(K, *V) string
	// failUpdate, when set, is asked before each update; a non-nil error is
	// returned instead of writing.
	failUpdate func(K, V) error
}

func newFakeMap[K comparable, V any](name string, capacity int, log *[]string, onOp *func()) *fakeMap[K, V] {
	return &fakeMap[K, V]{name: name, capacity: capacity, entries: make(map[K]V), log: log, onOp: onOp}
}

func (f *fakeMap[K, V]) Update(k K, v V) error {
	if f.failUpdate != nil {
		if err := f.failUpdate(k, v); err != nil {
			return err
		}
	}
	if _, ok := f.entries[k]; !ok && len(f.entries) >= f.capacity {
		return fmt.Errorf("updating %s: %w", f.name, ErrMapFull)
	}
	f.entries[k] = v
	*f.log = append(*f.log, fmt.Sprintf("update %s %s", f.name, f.describe(k, &v)))
	f.afterOp()
	return nil
}

func (f *fakeMap[K, V]) Delete(k K) error {
	if _, ok := f.entries[k]; ok {
		delete(f.entries, k)
		*f.log = append(*f.log, fmt.Sprintf("delete %s %s", f.name, f.describe(k, nil)))
		f.afterOp()
	}
	return nil
}

func (f *fakeMap[K, V]) afterOp() {
	if *f.onOp != nil {
		(*f.onOp)()
	}
}

func (f *fakeMap[K, V]) Iterate(fn func(K, V) error) error {
	for k, v := range maps.Clone(f.entries) {
		if err := fn(k, v); err != nil {
			return err
		}
	}
	return nil
}

type fakeMaps struct {
	services *fakeMap[lbSvcKey, lbSvcValue]
	slots    *fakeMap[lbSlotKey, uint32]
	backends *fakeMap[uint32, lbBackendValue]
	log      []string
	// onOp runs after every write or delete.
	onOp func()
}

func newFakeMaps(maxServices, maxBackends int) *fakeMaps {
	f := &fakeMaps{}
	f.services = newFakeMap[lbSvcKey, lbSvcValue]("services", maxServices, &f.log, &f.onOp)
	f.services.describe = func(k lbSvcKey, v *lbSvcValue) string {
		if v == nil {
			return frontendFromKey(k).String()
		}
		return fmt.Sprintf("%s id=%d count=%d", frontendFromKey(k), v.Id, v.Count)
	}
	f.slots = newFakeMap[lbSlotKey, uint32]("slots", maxBackends, &f.log, &f.onOp)
	f.slots.describe = func(k lbSlotKey, v *uint32) string {
		if v == nil {
			return fmt.Sprintf("svc=%d slot=%d", k.SvcId, k.Slot)
		}
		return fmt.Sprintf("svc=%d slot=%d backend=%d", k.SvcId, k.Slot, *v)
	}
	f.backends = newFakeMap[uint32, lbBackendValue]("backends", maxBackends, &f.log, &f.onOp)
	f.backends.describe = func(id uint32, v *lbBackendValue) string {
		if v == nil {
			return fmt.Sprint(id)
		}
		k := backendKeyFromValue(*v)
		return fmt.Sprintf("%d %s/%s", id, k.Backend, k.Protocol)
	}
	return f
}

func (f *fakeMaps) maps() Maps {
	return Maps{Services: f.services, Slots: f.slots, Backends: f.backends}
}

// takeLog returns and clears the operation log.
func (f *fakeMaps) takeLog() []string {
	l := f.log
	f.log = nil
	return l
}

// dump renders the maps sorted and resolved, one entry a line, for golden
// files: each frontend with its count and the backend address in each slot.
func (f *fakeMaps) dump() string {
	return dumpMaps(f.services.entries, f.slots.entries, f.backends.entries)
}

func dumpMaps(services map[lbSvcKey]lbSvcValue, slots map[lbSlotKey]uint32, backends map[uint32]lbBackendValue) string {
	var lines []string
	for k, v := range services {
		lines = append(lines, fmt.Sprintf("service %s id=%d count=%d", frontendFromKey(k), v.Id, v.Count))
	}
	for k, id := range slots {
		addr := "<missing backend>"
		if b, ok := backends[id]; ok {
			addr = backendKeyFromValue(b).Backend.String()
		}
		lines = append(lines, fmt.Sprintf("slot    svc=%d slot=%d backend=%d %s", k.SvcId, k.Slot, id, addr))
	}
	for id, b := range backends {
		k := backendKeyFromValue(b)
		lines = append(lines, fmt.Sprintf("backend %d %s/%s", id, k.Backend, k.Protocol))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}
