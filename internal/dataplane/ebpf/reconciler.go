package ebpf

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// appliedService is what the kernel holds under one service id: the count
// in its frontend's entry, and every slot entry of the id.
type appliedService struct {
	id uint32
	// name is the service port last applied under this id, for errors; it
	// is unknown for what a restart found.
	name model.ServicePortName
	// slots[i] is the backend id slot i holds; len(slots) is the count the
	// programs read. 0 marks a slot missing from the kernel (found so at
	// restore), which the next sync fills.
	slots []uint32
	// hidden are slot entries no new program run can reach: at or past the
	// count, or every slot once the frontend's entry is gone (slot number ->
	// backend id). They are deleted one grace period after they were hidden.
	hidden map[uint32]uint32
	// stats records that the id's entry in the counters map exists. It is
	// created, at zero, before the frontend's entry, and deleted when the
	// id is released, so that an id handed out again counts from zero.
	stats bool
}

// reconciler owns the contents of the load-balancing maps. It keeps a copy
// of them, exactly as the kernel holds them whatever write fails, diffs each
// snapshot against it and writes only the difference, in an order that never
// lets a program find a hole:
//
//  1. backends are written before any slot points at them;
//  2. a service's slots are written before its count grows to cover them;
//  3. each service port changes all or nothing: writes that can fail for
//     capacity (new keys) come first, while still invisible; overwrites of
//     live entries come last and are undone if one fails;
//  4. nothing a program could have read is deleted until an RCU grace period
//     has passed since the write that hid it (a lower count, a deleted
//     frontend, an overwritten slot): a connect that read the old count or
//     the old backend id a moment before still finds what it read. One
//     sync hides everything first, waits once, then deletes.
//
// Retained backends keep their slot, so one endpoint change costs a couple of
// map writes whatever the size of the service.
type reconciler struct {
	maps        Maps
	grace       gracePeriod
	maxServices uint32
	maxBackends uint32

	// services are the frontends in the kernel's service map.
	services map[model.Frontend]*appliedService
	// detached are service ids with slot entries but no frontend entry: a
	// removed service whose slots await their grace period, a creation that
	// failed before its entry was written, or what a restart found so.
	detached map[uint32]*appliedService
	// withHidden indexes the services and detached ids that have hidden slots.
	withHidden map[uint32]*appliedService

	// backends maps each backend to the id slots are pointed at. A restart
	// may find more ids holding one backend (debris of another process, two
	// proxies overlapping in an upgrade for one): dupIDs keeps the others,
	// which stay as long as a slot holds them.
	backends    map[backendKey]uint32
	dupIDs      map[backendKey][]uint32
	backendKeys map[uint32]backendKey
	// refs counts, per backend id, the slot entries in the kernel, live or
	// hidden, that hold it. An id is deleted only at zero.
	refs map[uint32]int
	// unreferenced holds backend ids whose count reached zero, or that were
	// written or found without one: candidates for deletion.
	unreferenced map[uint32]struct{}
	// slotEntries counts the slot entries recorded above, live (non-zero)
	// or hidden: what the slot map holds, for admitting a port before it
	// writes anything.
	slotEntries int

	svcIDs     *idAllocator
	backendIDs *idAllocator

	// statsOrphans are counter entries found at restore for ids nothing
	// else holds (a proxy killed between releasing an id and deleting
	// them), deleted with the next garbage.
	statsOrphans map[uint32]struct{}

	// owners records the frontends each Service had at the last sync, so
	// that a partial snapshot can remove frontends its services dropped.
	owners map[model.ServiceName][]model.Frontend

	// reload asks the next sync to read the maps first: on start, and after
	// reading them failed half-way.
	reload bool
}

func newReconciler(maps Maps, grace gracePeriod, maxServices, maxBackends uint32) *reconciler {
	return &reconciler{
		maps:        maps,
		grace:       grace,
		maxServices: maxServices,
		maxBackends: maxBackends,
		owners:      make(map[model.ServiceName][]model.Frontend),
		reload:      true,
	}
}

// restore rebuilds the reconciler's copy from the maps, as a restarted proxy
// finds them pinned, including the leftovers of a sync that died half-way:
// every entry is recorded as what it is, and whatever no program can reach
// is hidden already, to be deleted after the next grace period.
func (r *reconciler) restore() error {
	r.services = make(map[model.Frontend]*appliedService)
	r.detached = make(map[uint32]*appliedService)
	r.withHidden = make(map[uint32]*appliedService)
	r.backends = make(map[backendKey]uint32)
	r.dupIDs = make(map[backendKey][]uint32)
	r.backendKeys = make(map[uint32]backendKey)
	r.refs = make(map[uint32]int)
	r.unreferenced = make(map[uint32]struct{})
	r.slotEntries = 0
	r.statsOrphans = make(map[uint32]struct{})
	r.svcIDs = newIDAllocator(r.maxServices)
	r.backendIDs = newIDAllocator(r.maxBackends)

	err := r.maps.Backends.Iterate(func(id uint32, v lbBackendValue) error {
		key := backendKeyFromValue(v)
		r.backendIDs.reserve(id)
		r.backendKeys[id] = key
		kept, dup := r.backends[key]
		switch {
		case !dup:
			r.backends[key] = id
		case id < kept:
			// Slots are pointed at the lowest id; the others go once
			// nothing holds them.
			r.backends[key] = id
			r.dupIDs[key] = append(r.dupIDs[key], kept)
		default:
			r.dupIDs[key] = append(r.dupIDs[key], id)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, ids := range r.dupIDs {
		slices.Sort(ids)
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
		svc := byID[k.SvcId]
		if svc == nil {
			// Slots without a frontend: an interrupted removal or creation.
			svc = &appliedService{id: k.SvcId}
			byID[k.SvcId] = svc
			r.detached[k.SvcId] = svc
			r.svcIDs.reserve(k.SvcId)
		}
		if k.Slot < uint32(len(svc.slots)) {
			svc.slots[k.Slot] = backendID
			if backendID != 0 {
				r.slotEntries++
			}
		} else {
			r.hide(svc, k.Slot, backendID)
			r.slotEntries++
		}
		if backendID != 0 {
			r.refs[backendID]++
			// A slot naming a missing backend keeps the id from reuse
			// until it is rewritten.
			r.backendIDs.reserve(backendID)
		}
		return nil
	})
	if err != nil {
		return err
	}

	for id := range r.backendKeys {
		if r.refs[id] == 0 {
			r.unreferenced[id] = struct{}{}
		}
	}
	if err := r.restoreStats(byID); err != nil {
		return err
	}
	r.reload = false
	klog.V(2).InfoS("Read BPF load-balancing maps", "services", len(r.services),
		"backends", len(r.backendKeys), "detachedServiceIDs", len(r.detached), "withHiddenSlots", len(r.withHidden))
	return nil
}

// restoreStats matches the counter entries to the ids restored in byID:
// kept where they exist, so that counters survive a restart; created at
// zero for each frontend's id that has none (a datapath pinned by a
// version without counters); and entries of ids nothing holds are left for
// the garbage collection. An entry that cannot be created is created by
// the sync that next applies its port.
func (r *reconciler) restoreStats(byID map[uint32]*appliedService) error {
	err := r.maps.Stats.Iterate(func(id uint32, _ lbSvcStats) error {
		if svc := byID[id]; svc != nil {
			svc.stats = true
		} else {
			r.statsOrphans[id] = struct{}{}
		}
		return nil
	})
	if err != nil {
		return err
	}
	created := 0
	for _, svc := range r.services {
		if svc.stats {
			continue
		}
		if err := r.maps.Stats.Update(svc.id, lbSvcStats{}); err != nil {
			klog.ErrorS(err, "Creating the counters of a restored service id; retried at the next sync", "id", svc.id)
			continue
		}
		svc.stats = true
		created++
	}
	if created > 0 {
		klog.InfoS("Created the counters of restored service ports that had none", "servicePorts", created)
	}
	return nil
}

// sync applies a snapshot. Service ports that fail are left as they were in
// the kernel and reported in the returned *dataplane.SyncError; the others
// are applied.
func (r *reconciler) sync(snap *model.Snapshot) error {
	if r.reload {
		if err := r.restore(); err != nil {
			return &dataplane.SyncError{Err: fmt.Errorf("reading BPF maps: %w", err)}
		}
	}

	desired := claimFrontends(snap, true)

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

	var failed []*dataplane.ServiceError
	for _, fe := range remove {
		name := r.services[fe].name
		if err := r.removeService(fe); err != nil {
			failed = append(failed, serviceError(name, fe, fmt.Errorf("removing: %w", err)))
		}
	}
	frontends := make([]model.Frontend, 0, len(desired))
	for fe := range desired {
		frontends = append(frontends, fe)
	}
	slices.SortFunc(frontends, compareFrontends)
	var full []*dataplane.ServiceError
	for _, fe := range frontends {
		p := desired[fe]
		if err := r.applyService(p); err != nil {
			se := serviceError(p.Name, fe, err)
			if se.Reason == dataplane.ReasonMapFull {
				full = append(full, se)
			} else {
				failed = append(failed, se)
			}
		}
	}
	freed, gcErr := r.collectGarbage()
	if len(full) > 0 && freed {
		// Removals and shrinks free entries and ids only after their grace
		// period: what did not fit gets a second chance once they are gone.
		retried := full
		full = nil
		for _, se := range retried {
			if err := r.applyService(desired[se.Frontend]); err != nil {
				full = append(full, serviceError(se.Service, se.Frontend, err))
			}
		}
		_, err := r.collectGarbage()
		gcErr = errors.Join(gcErr, err)
	}
	failed = append(failed, full...)

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

	if len(failed) == 0 && gcErr == nil {
		return nil
	}
	slices.SortFunc(failed, func(a, b *dataplane.ServiceError) int { return compareFrontends(a.Frontend, b.Frontend) })
	if gcErr != nil {
		gcErr = fmt.Errorf("collecting garbage: %w", gcErr)
	}
	return &dataplane.SyncError{Services: failed, Err: gcErr}
}

// claimFrontends maps each frontend of snap to the service port that serves
// it: two ports claiming one frontend (a Service whose ClusterIP was reused
// before the old one's deletion arrived) are resolved the same way by
// everything that reads a snapshot, the first in name order keeping it.
func claimFrontends(snap *model.Snapshot, logDuplicates bool) map[model.Frontend]*model.ServicePort {
	claimed := make(map[model.Frontend]*model.ServicePort)
	for _, name := range sortedServiceNames(snap.Services) {
		ports := snap.Services[name]
		for i := range ports {
			p := &ports[i]
			if other, dup := claimed[p.ClusterIP]; dup {
				if logDuplicates {
					klog.InfoS("Frontend claimed twice, keeping the first", "frontend", p.ClusterIP,
						"servicePort", p.Name, "kept", other.Name)
				}
				continue
			}
			claimed[p.ClusterIP] = p
		}
	}
	return claimed
}

func serviceError(name model.ServicePortName, fe model.Frontend, err error) *dataplane.ServiceError {
	reason := dataplane.ReasonWriteFailed
	if errors.Is(err, ErrMapFull) {
		reason = dataplane.ReasonMapFull
	}
	return &dataplane.ServiceError{Service: name, Frontend: fe, Reason: reason, Err: err}
}
func (r *reconciler) applyService(p *model.ServicePort) error {
	fe := p.ClusterIP
	svc := r.services[fe]
	ids, missing := r.knownBackends(p.Backends, fe.Protocol)
	if err := r.admit(svc, len(ids), missing); err != nil {
		return err
	}
	if err := r.writeBackends(p.Backends, fe.Protocol, ids); err != nil {
		return err
	}
	if svc == nil {
		return r.createService(p, uniqueIDs(ids))
	}
	r.resetStatsIfNew(svc, p.Name)
	svc.name = p.Name
	return r.updateService(fe, svc, layoutSlots(svc.slots, ids))
}

// resetStatsIfNew zeroes the counters of svc when the frontend now belongs
// to another service port (a ClusterIP reused at once), so that the new
// port does not inherit the old one's counts, and creates them if svc has
// none. A name unknown since a restart is no change: counters survive
// restarts. Counters are not worth failing a port for: a write that fails
// is logged, and retried by the next sync if the entry is missing.
func (r *reconciler) resetStatsIfNew(svc *appliedService, name model.ServicePortName) {
	renamed := svc.name != (model.ServicePortName{}) && svc.name != name
	if svc.stats && !renamed {
		return
	}
	if err := r.maps.Stats.Update(svc.id, lbSvcStats{}); err != nil {
		klog.ErrorS(err, "Resetting the counters of a service port", "servicePort", name, "id", svc.id)
		return
	}
	svc.stats = true
}

// knownBackends returns the ids the kernel has for the given backends, 0
// for each it has not, and how many those are.
func (r *reconciler) knownBackends(backends []model.Backend, proto model.Protocol) (ids []uint32, missing int) {
	ids = make([]uint32, len(backends))
	for i, b := range backends {
		id, ok := r.backends[backendKey{Backend: b, Protocol: proto}]
		if !ok {
			missing++
		}
		ids[i] = id
	}
	return ids, missing
}

// admit refuses a port whose new entries cannot all fit in what the maps
// have free, before it writes any: entries written by a port that then
// fails stay until a grace period has passed, and would be taken from the
// ports after it, whose ClusterIPs happen to sort later, on every retry.
// svc is what the kernel holds for the port's frontend, nil if nothing; the
// port wants n backends, of which newBackends the kernel has not. The model
// merges duplicate backends; were one listed twice, the counts would only
// err on the safe side.
func (r *reconciler) admit(svc *appliedService, n, newBackends int) error {
	if free := r.backendIDs.free(); newBackends > free {
		return fmt.Errorf("%w: the port needs %d new backend entries, %d of %d are free; raise --%s",
			ErrMapFull, newBackends, free, r.maxBackends, FlagMaxBackends)
	}
	// Slots: every backend for a new port; for an existing one, the keys
	// its update creates (see updateService): slots past the count not
	// held hidden already, and live slots found missing.
	newSlots := 0
	if svc == nil {
		if r.svcIDs.free() == 0 {
			return fmt.Errorf("%w: all %d service ids are in use; raise --%s", ErrMapFull, r.maxServices, FlagMaxServices)
		}
		newSlots = n
	} else {
		n0 := len(svc.slots)
		for i := range min(n0, n) {
			if svc.slots[i] == 0 {
				newSlots++
			}
		}
		for i := n0; i < n; i++ {
			if _, ok := svc.hidden[uint32(i)]; !ok {
				newSlots++
			}
		}
	}
	// The slot map has --bpf-max-backends entries too (loader.go).
	if free := int(r.maxBackends) - r.slotEntries; newSlots > free {
		return fmt.Errorf("%w: the port needs %d new slot entries, %d of %d are free; raise --%s",
			ErrMapFull, newSlots, max(free, 0), r.maxBackends, FlagMaxBackends)
	}
	return nil
}

// writeBackends writes an entry for each backend whose id is 0 in ids, and
// puts its new id there. New entries are invisible until a slot points at
// them.
func (r *reconciler) writeBackends(backends []model.Backend, proto model.Protocol, ids []uint32) error {
	for i, b := range backends {
		if ids[i] != 0 {
			continue
		}
		key := backendKey{Backend: b, Protocol: proto}
		if id, ok := r.backends[key]; ok {
			// Listed twice, and written for the first.
			ids[i] = id
			continue
		}
		id, err := r.backendIDs.allocate()
		if err != nil {
			return fmt.Errorf("%w: no free backend id (%v); raise --%s", ErrMapFull, err, FlagMaxBackends)
		}
		if err := r.maps.Backends.Update(id, key.value()); err != nil {
			r.backendIDs.release(id)
			return err
		}
		r.backends[key] = id
		r.backendKeys[id] = key
		// Unreferenced until a slot takes it; collected if none does.
		r.unreferenced[id] = struct{}{}
		ids[i] = id
	}
	return nil
}

// createService writes a new service port: its slots under a fresh id, then
// the frontend's entry, the one write that makes it visible.
func (r *reconciler) createService(p *model.ServicePort, ids []uint32) error {
	id, err := r.svcIDs.allocate()
	if err != nil {
		return fmt.Errorf("%w: no free service id (%v); raise --%s", ErrMapFull, err, FlagMaxServices)
	}
	// Until the frontend's entry exists the id's slots are detached, and
	// collected if the entry cannot be written.
	svc := &appliedService{id: id, name: p.Name}
	r.detached[id] = svc
	// Counters at zero before anything can count on them; the write
	// replaces an entry an earlier holder of the id left.
	delete(r.statsOrphans, id)
	if err := r.maps.Stats.Update(id, lbSvcStats{}); err != nil {
		return err
	}
	svc.stats = true
	for i, b := range ids {
		if err := r.setSlot(svc, uint32(i), b); err != nil {
			return err
		}
	}
	if err := r.setCount(p.ClusterIP, svc, len(ids)); err != nil {
		return err
	}
	delete(r.detached, id)
	r.services[p.ClusterIP] = svc
	return nil
}

// slotWrite is an overwrite of a live slot, kept to undo it.
type slotWrite struct {
	slot uint32
	old  uint32
}

// updateService moves a service port from its slots to want, all or
// nothing as far as the kernel allows.
func (r *reconciler) updateService(fe model.Frontend, svc *appliedService, want []uint32) error {
	n0, n1 := len(svc.slots), len(want)
	live := min(n0, n1)
	// A live slot that is missing or names no backend is a hole already
	// (found so at restore): filling it only helps, and is never undone.
	for i := range live {
		if want[i] != svc.slots[i] && !r.isBackend(svc.slots[i]) {
			if err := r.setSlot(svc, uint32(i), want[i]); err != nil {
				return err
			}
		}
	}
	// Slots past the count are invisible: these writes, of new keys and
	// so the ones that fail when the map is full, go first.
	for i := n0; i < n1; i++ {
		if id, ok := svc.hidden[uint32(i)]; ok && id == want[i] {
			continue
		}
		if err := r.setSlot(svc, uint32(i), want[i]); err != nil {
			return err
		}
	}
	// Live slots, each write swapping one valid backend for another. A full
	// hash map still takes the overwrite of an existing key (hashtab.c's
	// alloc_htab_elem skips the max_entries check when it replaces an
	// element), but our maps allocate on update (BPF_F_NO_PREALLOC), which
	// can fail: then the overwrites made so far are undone.
	var done []slotWrite
	for i := range live {
		old := svc.slots[i]
		if old == want[i] {
			continue
		}
		if err := r.setSlot(svc, uint32(i), want[i]); err != nil {
			return r.undo(svc, done, err)
		}
		done = append(done, slotWrite{slot: uint32(i), old: old})
	}
	// The count last: it shows the new slots, or hides the surplus.
	if n1 != n0 {
		if err := r.setCount(fe, svc, n1); err != nil {
			return r.undo(svc, done, err)
		}
	}
	return nil
}

// undo puts back the live slots a failed update overwrote. A write that
// fails here too leaves its slot on the new backend, valid and recorded as
// such: the port then serves a mix of its old and new backends until a
// later sync completes it.
func (r *reconciler) undo(svc *appliedService, done []slotWrite, cause error) error {
	var errs []error
	for _, w := range slices.Backward(done) {
		if err := r.setSlot(svc, w.slot, w.old); err != nil {
			errs = append(errs, fmt.Errorf("restoring slot %d: %w", w.slot, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w; undoing the slots already written failed too, the port serves a mix of old and new backends: %w",
			cause, errors.Join(errs...))
	}
	return cause
}

// setSlot points a slot of svc at a backend id, and records it once the
// kernel has taken it: the copy stays the kernel's whatever fails.
func (r *reconciler) setSlot(svc *appliedService, slot, id uint32) error {
	if err := r.maps.Slots.Update(lbSlotKey{SvcId: svc.id, Slot: slot}, id); err != nil {
		return err
	}
	var old uint32
	existed := false
	if slot < uint32(len(svc.slots)) {
		old, svc.slots[slot] = svc.slots[slot], id
		existed = old != 0
	} else {
		old, existed = svc.hidden[slot]
		r.hide(svc, slot, id)
	}
	if !existed {
		r.slotEntries++
	}
	r.ref(id)
	r.unref(old)
	return nil
}

// setCount writes the frontend's entry of svc with count n: the write that
// shows the slots below n to programs, and hides those past it.
func (r *reconciler) setCount(fe model.Frontend, svc *appliedService, n int) error {
	if err := r.maps.Services.Update(frontendKey(fe), lbSvcValue{Id: svc.id, Count: uint32(n)}); err != nil {
		return err
	}
	r.recount(svc, n)
	return nil
}

// recount records that programs now read n slots of svc.
func (r *reconciler) recount(svc *appliedService, n int) {
	for i := n; i < len(svc.slots); i++ {
		if id := svc.slots[i]; id != 0 {
			r.hide(svc, uint32(i), id)
		}
	}
	if n < len(svc.slots) {
		svc.slots = svc.slots[:n:n]
	}
	for i := uint32(len(svc.slots)); i < uint32(n); i++ {
		id := svc.hidden[i] // written before the count, by the callers' order
		delete(svc.hidden, i)
		svc.slots = append(svc.slots, id)
	}
	if len(svc.hidden) == 0 {
		delete(r.withHidden, svc.id)
	}
}

func (r *reconciler) hide(svc *appliedService, slot, id uint32) {
	if svc.hidden == nil {
		svc.hidden = make(map[uint32]uint32)
	}
	svc.hidden[slot] = id
	r.withHidden[svc.id] = svc
}

func (r *reconciler) ref(id uint32) {
	if id != 0 {
		r.refs[id]++
	}
}

func (r *reconciler) unref(id uint32) {
	if id == 0 {
		return
	}
	if r.refs[id]--; r.refs[id] <= 0 {
		delete(r.refs, id)
		r.unreferenced[id] = struct{}{}
	}
}

func (r *reconciler) isBackend(id uint32) bool {
	_, ok := r.backendKeys[id]
	return ok
}

// removeService deletes a frontend's entry, the write that hides its slots
// from new program runs; they, and the id, go after the grace period.
func (r *reconciler) removeService(fe model.Frontend) error {
	svc := r.services[fe]
	if err := r.maps.Services.Delete(frontendKey(fe)); err != nil {
		return err
	}
	delete(r.services, fe)
	r.recount(svc, 0)
	r.detached[svc.id] = svc
	return nil
}

// needsGrace reports whether collecting garbage will delete anything from
// the kernel.
func (r *reconciler) needsGrace() bool {
	if len(r.withHidden) > 0 || len(r.statsOrphans) > 0 {
		return true
	}
	// A program that read a removed frontend's id may still add to the
	// id's counters: deleting them under it could make the add land in
	// whatever entry reuses the memory.
	for _, svc := range r.detached {
		if svc.stats && len(svc.hidden) == 0 {
			return true
		}
	}
	for id := range r.unreferenced {
		if r.refs[id] == 0 && r.isBackend(id) {
			return true
		}
	}
	return false
}

// collectGarbage deletes what no program can reach any more, after one grace
// period that began once all of it was hidden: hidden slots, then the
// backends no slot holds. Entries it fails to delete stay recorded, and are
// retried by the next sync. It reports whether it freed entries or ids.
func (r *reconciler) collectGarbage() (freed bool, err error) {
	if r.needsGrace() {
		if err := r.grace.wait(); err != nil {
			return false, fmt.Errorf("waiting for running BPF programs before deleting: %w", err)
		}
	}
	var errs []error
	for _, svcID := range slices.Sorted(maps.Keys(r.withHidden)) {
		svc := r.withHidden[svcID]
		for _, slot := range slices.Sorted(maps.Keys(svc.hidden)) {
			if err := r.maps.Slots.Delete(lbSlotKey{SvcId: svcID, Slot: slot}); err != nil {
				errs = append(errs, fmt.Errorf("deleting slot %d of service id %d: %w", slot, svcID, err))
				continue
			}
			id := svc.hidden[slot]
			delete(svc.hidden, slot)
			r.slotEntries--
			r.unref(id)
			freed = true
		}
		if len(svc.hidden) == 0 {
			delete(r.withHidden, svcID)
		}
	}
	for _, id := range slices.Sorted(maps.Keys(r.detached)) {
		svc := r.detached[id]
		if len(svc.hidden) > 0 {
			continue
		}
		if svc.stats {
			if err := r.maps.Stats.Delete(id); err != nil {
				errs = append(errs, fmt.Errorf("deleting the counters of service id %d: %w", id, err))
				continue
			}
			svc.stats = false
		}
		delete(r.detached, id)
		r.svcIDs.release(id)
		freed = true
	}
	for _, id := range slices.Sorted(maps.Keys(r.statsOrphans)) {
		if err := r.maps.Stats.Delete(id); err != nil {
			errs = append(errs, fmt.Errorf("deleting the counters of unused service id %d: %w", id, err))
			continue
		}
		delete(r.statsOrphans, id)
	}
	for _, id := range slices.Sorted(maps.Keys(r.unreferenced)) {
		if r.refs[id] > 0 {
			delete(r.unreferenced, id)
			continue
		}
		key, ok := r.backendKeys[id]
		if !ok {
			// A missing backend a restored slot named, held by none now.
			delete(r.unreferenced, id)
			r.backendIDs.release(id)
			continue
		}
		if err := r.maps.Backends.Delete(id); err != nil {
			errs = append(errs, fmt.Errorf("deleting unused backend %s: %w", key.Backend, err))
			continue
		}
		r.forgetBackend(id, key)
		delete(r.unreferenced, id)
		freed = true
	}
	return freed, errors.Join(errs...)
}

// forgetBackend records the deletion of a backend id.
func (r *reconciler) forgetBackend(id uint32, key backendKey) {
	delete(r.backendKeys, id)
	r.backendIDs.release(id)
	others := r.dupIDs[key]
	if r.backends[key] == id {
		delete(r.backends, key)
		if len(others) > 0 {
			// Another id still holds the backend: slots are pointed at it.
			r.backends[key], others = others[0], others[1:]
		}
	} else {
		others = slices.DeleteFunc(others, func(o uint32) bool { return o == id })
	}
	if len(others) == 0 {
		delete(r.dupIDs, key)
	} else {
		r.dupIDs[key] = others
	}
}

// counts reports what the maps hold, for metrics.
func (r *reconciler) counts() (services, backends int) {
	return len(r.services), len(r.backendKeys)
}

// entries reports how many entries each map the reconciler writes holds, as
// recorded in its copy, which is exactly what the kernel holds.
func (r *reconciler) entries() (services, slots, backends, stats int) {
	stats = len(r.statsOrphans)
	for _, svc := range r.services {
		if svc.stats {
			stats++
		}
	}
	for _, svc := range r.detached {
		if svc.stats {
			stats++
		}
	}
	return len(r.services), r.slotEntries, len(r.backendKeys), stats
}

// namedIDs maps the id of each service port held, whose name is known, to
// its name: all of them once a sync has applied the ports, none of those a
// restart found before that.
func (r *reconciler) namedIDs() map[uint32]model.ServicePortName {
	out := make(map[uint32]model.ServicePortName, len(r.services))
	for _, svc := range r.services {
		if svc.name != (model.ServicePortName{}) {
			out[svc.id] = svc.name
		}
	}
	return out
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
