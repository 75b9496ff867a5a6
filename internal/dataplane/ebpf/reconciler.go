package ebpf

import (
	"errors"
	"fmt"
	"slices"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// appliedService is what the kernel holds for one frontend.
type appliedService struct {
	id uint32
	// slots[i] is the backend id in slot i; len(slots) is the count the
	// programs read. 0 marks a slot found missing or dangling at restore,
	// which the next sync rewrites.
	slots []uint32
	// stale lists slot numbers at or past the count that are still in the
	// kernel, left by a shrink that was interrupted; programs never read them.
	stale []uint32
}

type appliedBackend struct {
	id   uint32
	refs int // services whose slots hold this backend
}

// reconciler owns the contents of the load-balancing maps. It keeps a copy of
// what it wrote, diffs each snapshot against it and writes only the
// difference, in an order that never lets a program find a hole:
//
//  1. backends are written before any slot points at them;
//  2. a service's slots are written before its count grows to cover them;
//  3. a shrink writes the new count before deleting the surplus slots;
//  4. a backend is deleted only once no slot references it.
//
// Retained backends keep their slot, so one endpoint change costs a couple of
// map writes whatever the size of the service.
type reconciler struct {
	maps        Maps
	maxServices uint32
	maxBackends uint32

	services    map[model.Frontend]*appliedService
	backends    map[backendKey]*appliedBackend
	backendKeys map[uint32]backendKey
	svcIDs      *idAllocator
	backendIDs  *idAllocator

	// unreferenced holds backend ids whose reference count reached zero in
	// this sync (or that were found unreferenced at restore): candidates for
	// deletion once every service has been updated.
	unreferenced map[uint32]struct{}
	// orphanSlots are slots of service ids that have no service entry,
	// found at restore (a creation interrupted before its count was written).
	orphanSlots []lbSlotKey

	// owners records the frontends each Service had at the last sync, so
	// that a partial snapshot can remove frontends its services dropped.
	owners map[model.ServiceName][]model.Frontend

	// reload asks the next sync to re-read the maps first: after a failed
	// write the copy above may no longer match the kernel.
	reload bool
}

func newReconciler(maps Maps, maxServices, maxBackends uint32) *reconciler {
	return &reconciler{
		maps:        maps,
		maxServices: maxServices,
		maxBackends: maxBackends,
		owners:      make(map[model.ServiceName][]model.Frontend),
		reload:      true,
	}
}

// restore rebuilds the reconciler's copy from the maps, as a restarted proxy
// finds them pinned, including the leftovers of a sync that died half-way.
func (r *reconciler) restore() error {
	r.services = make(map[model.Frontend]*appliedService)
	r.backends = make(map[backendKey]*appliedBackend)
	r.backendKeys = make(map[uint32]backendKey)
	r.svcIDs = newIDAllocator(r.maxServices)
	r.backendIDs = newIDAllocator(r.maxBackends)
	r.unreferenced = make(map[uint32]struct{})
	r.orphanSlots = nil

	err := r.maps.Backends.Iterate(func(id uint32, v lbBackendValue) error {
		key := backendKeyFromValue(v)
		r.backendIDs.reserve(id)
		r.backendKeys[id] = key
		if existing, dup := r.backends[key]; dup {
			// Two ids for one backend: keep the lower, let the other go
			// once nothing points at it.
			if id > existing.id {
				r.unreferenced[id] = struct{}{}
				return nil
			}
			r.unreferenced[existing.id] = struct{}{}
		}
		r.backends[key] = &appliedBackend{id: id}
		return nil
	})
	if err != nil {
		return err
	}

	byID := make(map[uint32]*appliedService)
	err = r.maps.Services.Iterate(func(k lbSvcKey, v lbSvcValue) error {
		svc := &appliedService{id: v.Id, slots: make([]uint32, v.Count)}
		r.services[frontendFromKey(k)] = svc
		byID[v.Id] = svc
		r.svcIDs.reserve(v.Id)
		return nil
	})
	if err != nil {
		return err
	}

	err = r.maps.Slots.Iterate(func(k lbSlotKey, backendID uint32) error {
		svc, ok := byID[k.SvcId]
		switch {
		case !ok:
			r.orphanSlots = append(r.orphanSlots, k)
		case k.Slot >= uint32(len(svc.slots)):
			svc.stale = append(svc.stale, k.Slot)
		default:
			svc.slots[k.Slot] = backendID
		}
		return nil
	})
	if err != nil {
		return err
	}

	for _, svc := range r.services {
		slices.Sort(svc.stale)
		for i, id := range svc.slots {
			key, ok := r.backendKeys[id]
			if !ok {
				svc.slots[i] = 0 // dangling: rewritten by the next sync
				continue
			}
			// Resolve duplicates to the id that was kept.
			svc.slots[i] = r.backends[key].id
		}
		for _, id := range uniqueIDs(svc.slots) {
			r.backends[r.backendKeys[id]].refs++
		}
	}
	for _, b := range r.backends {
		if b.refs == 0 {
			r.unreferenced[b.id] = struct{}{}
		}
	}
	slices.SortFunc(r.orphanSlots, compareSlotKeys)
	r.reload = false
	klog.V(2).InfoS("Read BPF load-balancing maps", "services", len(r.services),
		"backends", len(r.backendKeys), "orphanSlots", len(r.orphanSlots))
	return nil
}

// sync applies a snapshot. Services that fail are left as they were in the
// kernel and reported in the returned error; the others are applied.
func (r *reconciler) sync(snap *model.Snapshot) error {
	if r.reload {
		if err := r.restore(); err != nil {
			return fmt.Errorf("reading BPF maps: %w", err)
		}
	}

	desired := make(map[model.Frontend]*model.ServicePort)
	for _, name := range sortedServiceNames(snap.Services) {
		ports := snap.Services[name]
		for i := range ports {
			p := &ports[i]
			if other, dup := desired[p.ClusterIP]; dup {
				klog.InfoS("Frontend claimed twice, keeping the first", "frontend", p.ClusterIP,
					"servicePort", p.Name, "kept", other.Name)
				continue
			}
			desired[p.ClusterIP] = p
		}
	}

	var remove []model.Frontend
	if snap.Full {
		for fe := range r.services {
			if desired[fe] == nil {
				remove = append(remove, fe)
			}
		}
	} else {
		for name := range snap.Services {
			for _, fe := range r.owners[name] {
				if desired[fe] == nil && r.services[fe] != nil {
					remove = append(remove, fe)
				}
			}
		}
	}
	slices.SortFunc(remove, compareFrontends)

	var errs []error
	// Removals first: they free ids and map entries that additions may need.
	for _, fe := range remove {
		if err := r.removeService(fe); err != nil {
			errs = append(errs, fmt.Errorf("removing frontend %s: %w", fe, err))
		}
	}
	frontends := make([]model.Frontend, 0, len(desired))
	for fe := range desired {
		frontends = append(frontends, fe)
	}
	slices.SortFunc(frontends, compareFrontends)
	for _, fe := range frontends {
		if err := r.applyService(desired[fe]); err != nil {
			errs = append(errs, fmt.Errorf("service port %s (%s): %w", desired[fe].Name, fe, err))
		}
	}
	if err := r.collectGarbage(); err != nil {
		errs = append(errs, err)
	}

	if snap.Full {
		clear(r.owners)
	}
	for name, ports := range snap.Services {
		if len(ports) == 0 {
			delete(r.owners, name)
			continue
		}
		fes := make([]model.Frontend, len(ports))
		for i := range ports {
			fes[i] = ports[i].ClusterIP
		}
		r.owners[name] = fes
	}

	if len(errs) > 0 {
		r.reload = true
		return errors.Join(errs...)
	}
	return nil
}

func (r *reconciler) applyService(p *model.ServicePort) error {
	fe := p.ClusterIP
	ids, err := r.ensureBackends(p.Backends, fe.Protocol)
	if err != nil {
		return err
	}

	cur := r.services[fe]
	isNew := cur == nil
	if isNew {
		id, err := r.svcIDs.allocate()
		if err != nil {
			return fmt.Errorf("%w: no free service id (%v); raise --%s", ErrMapFull, err, FlagMaxServices)
		}
		cur = &appliedService{id: id}
	}
	newSlots := layoutSlots(cur.slots, ids)

	// Slots first: past the current count they are invisible, below it each
	// write swaps one valid backend for another.
	for i, id := range newSlots {
		if i < len(cur.slots) && cur.slots[i] == id {
			continue
		}
		if err := r.maps.Slots.Update(lbSlotKey{SvcId: cur.id, Slot: uint32(i)}, id); err != nil {
			if isNew {
				r.svcIDs.release(cur.id)
			}
			return err
		}
	}
	if isNew || len(newSlots) != len(cur.slots) {
		v := lbSvcValue{Id: cur.id, Count: uint32(len(newSlots))}
		if err := r.maps.Services.Update(frontendKey(fe), v); err != nil {
			if isNew {
				r.svcIDs.release(cur.id)
			}
			return err
		}
	}
	// The count now excludes the surplus: delete it.
	for i := len(newSlots); i < len(cur.slots); i++ {
		if err := r.maps.Slots.Delete(lbSlotKey{SvcId: cur.id, Slot: uint32(i)}); err != nil {
			return err
		}
	}
	for _, slot := range cur.stale {
		if int(slot) < len(newSlots) {
			continue // overwritten above
		}
		if err := r.maps.Slots.Delete(lbSlotKey{SvcId: cur.id, Slot: slot}); err != nil {
			return err
		}
	}

	r.retarget(cur.slots, newSlots)
	cur.slots = newSlots
	cur.stale = nil
	r.services[fe] = cur
	return nil
}

// ensureBackends returns the ids of the given backends, writing entries for
// the ones the kernel does not have yet.
func (r *reconciler) ensureBackends(backends []model.Backend, proto model.Protocol) ([]uint32, error) {
	ids := make([]uint32, 0, len(backends))
	for _, b := range backends {
		key := backendKey{Backend: b, Protocol: proto}
		if ab := r.backends[key]; ab != nil {
			ids = append(ids, ab.id)
			continue
		}
		id, err := r.backendIDs.allocate()
		if err != nil {
			return nil, fmt.Errorf("%w: no free backend id (%v); raise --%s", ErrMapFull, err, FlagMaxBackends)
		}
		if err := r.maps.Backends.Update(id, key.value()); err != nil {
			r.backendIDs.release(id)
			return nil, err
		}
		r.backends[key] = &appliedBackend{id: id}
		r.backendKeys[id] = key
		// Unreferenced until a service takes it; collected if none does.
		r.unreferenced[id] = struct{}{}
		ids = append(ids, id)
	}
	return ids, nil
}

// retarget moves backend reference counts from the old slot set to the new,
// in time linear in the size of the service.
func (r *reconciler) retarget(oldSlots, newSlots []uint32) {
	inOld := idSet(oldSlots)
	inNew := idSet(newSlots)
	for id := range inNew {
		if !inOld[id] {
			r.backends[r.backendKeys[id]].refs++
		}
	}
	for id := range inOld {
		if inNew[id] {
			continue
		}
		b := r.backends[r.backendKeys[id]]
		b.refs--
		if b.refs == 0 {
			r.unreferenced[id] = struct{}{}
		}
	}
}

func (r *reconciler) removeService(fe model.Frontend) error {
	cur := r.services[fe]
	// The frontend goes first: from then on no program reads its slots.
	if err := r.maps.Services.Delete(frontendKey(fe)); err != nil {
		return err
	}
	for i := range cur.slots {
		if err := r.maps.Slots.Delete(lbSlotKey{SvcId: cur.id, Slot: uint32(i)}); err != nil {
			return err
		}
	}
	for _, slot := range cur.stale {
		if err := r.maps.Slots.Delete(lbSlotKey{SvcId: cur.id, Slot: slot}); err != nil {
			return err
		}
	}
	r.retarget(cur.slots, nil)
	r.svcIDs.release(cur.id)
	delete(r.services, fe)
	return nil
}

// collectGarbage deletes what no service references any more: backends last,
// after every slot that pointed at them is gone.
func (r *reconciler) collectGarbage() error {
	for _, k := range r.orphanSlots {
		if err := r.maps.Slots.Delete(k); err != nil {
			return fmt.Errorf("removing orphaned slot: %w", err)
		}
	}
	r.orphanSlots = nil
	ids := make([]uint32, 0, len(r.unreferenced))
	for id := range r.unreferenced {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		key, ok := r.backendKeys[id]
		if !ok {
			delete(r.unreferenced, id)
			continue
		}
		if b := r.backends[key]; b.id == id && b.refs > 0 {
			delete(r.unreferenced, id)
			continue
		}
		if err := r.maps.Backends.Delete(id); err != nil {
			return fmt.Errorf("removing unused backend %s: %w", key.Backend, err)
		}
		if r.backends[key].id == id {
			delete(r.backends, key)
		}
		delete(r.backendKeys, id)
		r.backendIDs.release(id)
		delete(r.unreferenced, id)
	}
	return nil
}

// counts reports what the maps hold, for metrics.
func (r *reconciler) counts() (services, backends int) {
	return len(r.services), len(r.backendKeys)
}

// layoutSlots places the wanted backend ids into slots, keeping every
// retained backend in the slot it already has when that slot survives, and
// filling the free slots with the rest in the order given. Keeping places
// keeps writes, and the set a racing connect can see, to the minimum.
func layoutSlots(old, want []uint32) []uint32 {
	want = uniqueIDs(want)
	out := make([]uint32, len(want))
	placed := make(map[uint32]bool, len(want))
	wanted := make(map[uint32]bool, len(want))
	for _, id := range want {
		wanted[id] = true
	}
	for i := 0; i < len(old) && i < len(out); i++ {
		if id := old[i]; id != 0 && wanted[id] && !placed[id] {
			out[i] = id
			placed[id] = true
		}
	}
	next := 0
	for _, id := range want {
		if placed[id] {
			continue
		}
		for out[next] != 0 {
			next++
		}
		out[next] = id
		placed[id] = true
	}
	return out
}

// idSet returns the non-zero ids as a set.
func idSet(ids []uint32) map[uint32]bool {
	set := make(map[uint32]bool, len(ids))
	for _, id := range ids {
		if id != 0 {
			set[id] = true
		}
	}
	return set
}

// uniqueIDs returns the non-zero ids in order of first appearance.
func uniqueIDs(ids []uint32) []uint32 {
	out := make([]uint32, 0, len(ids))
	seen := make(map[uint32]bool, len(ids))
	for _, id := range ids {
		if id != 0 && !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out
}

func compareFrontends(a, b model.Frontend) int {
	if c := a.IP.Compare(b.IP); c != 0 {
		return c
	}
	if a.Port != b.Port {
		return int(a.Port) - int(b.Port)
	}
	return int(a.Protocol) - int(b.Protocol)
}

func compareSlotKeys(a, b lbSlotKey) int {
	if a.SvcId != b.SvcId {
		return int(a.SvcId) - int(b.SvcId)
	}
	return int(a.Slot) - int(b.Slot)
}

func sortedServiceNames(m map[model.ServiceName][]model.ServicePort) []model.ServiceName {
	names := make([]model.ServiceName, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b model.ServiceName) int {
		if a.Namespace != b.Namespace {
			if a.Namespace < b.Namespace {
				return -1
			}
			return 1
		}
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return names
}
