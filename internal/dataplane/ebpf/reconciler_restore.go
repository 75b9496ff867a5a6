// This file owns the reconciler's restore: its copy, and the service and
// backend ids in use, rebuilt from the maps a restarted proxy finds
// pinned.

package ebpf

import (
	"slices"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// group returns the group of service id id, recorded as in use if new.
func (r *reconciler) group(id uint32) *appliedGroup {
	g := r.groups[id]
	if g == nil {
		g = &appliedGroup{id: id}
		r.groups[id] = g
		r.detached[id] = g
		r.svcIDs.reserve(id)
	}
	return g
}

// restore rebuilds the reconciler's copy from the maps, as a restarted proxy
// finds them pinned, including the leftovers of a sync that died half-way:
// every entry is recorded as what it is, and whatever no program can reach
// is hidden already, to be deleted after the next grace period.
func (r *reconciler) restore() error {
	r.frontends = make(map[model.Frontend]*appliedFrontend)
	r.groups = make(map[uint32]*appliedGroup)
	r.detached = make(map[uint32]*appliedGroup)
	r.vips = newClusterIPState()
	r.withHidden = make(map[uint32]*appliedGroup)
	r.staleMatches = make(map[uint32]*appliedGroup)
	r.backends = make(map[backendKey]uint32)
	r.dupIDs = make(map[backendKey][]uint32)
	r.backendKeys = make(map[uint32]backendKey)
	r.refs = make(map[uint32]int32)
	r.unreferenced = make(map[uint32]struct{})
	r.slotEntries, r.matchEntries = 0, 0
	r.statsOrphans = make(map[uint32]struct{})
	r.svcIDs = newIDAllocator(r.maxServices)
	r.backendIDs = newIDAllocator(r.maxBackends)
	r.assigned = make(map[uint32]bool)
	r.nodeKnown = false

	err := r.maps.Backends.Iterate(func(id uint32, key backendKey) error {
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

	err = r.maps.Services.Iterate(func(fe model.Frontend, v lbSvcValue) error {
		g := r.group(idOf(v))
		r.attach(&appliedFrontend{fe: fe, group: g, count: countOf(v), flags: flagsOf(v)})
		return nil
	})
	if err != nil {
		return err
	}
	for _, g := range r.groups {
		g.slots = make([]uint32, g.liveCount())
	}

	err = r.maps.Slots.Iterate(func(k lbSlotKey, backendID uint32) error {
		// Slots without a frontend: an interrupted removal or creation.
		g := r.group(k.SvcId)
		if k.Slot < uint32(len(g.slots)) {
			g.slots[k.Slot] = backendID
			if backendID != 0 {
				r.slotEntries++
			}
		} else {
			r.hide(g, k.Slot, backendID)
			r.slotEntries++
		}
		r.holdRestored(backendID)
		return nil
	})
	if err != nil {
		return err
	}

	err = r.maps.Matches.Iterate(func(k lbMatchKey, timeout uint32) error {
		g := r.group(k.SvcId)
		if g.matches == nil {
			g.matches = make(map[uint32]uint32)
		}
		g.matches[k.BackendId] = timeout
		r.matchEntries++
		r.holdRestored(k.BackendId)
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
	for _, g := range r.groups {
		r.checkMatches(g)
	}
	if err := r.restoreStats(); err != nil {
		return err
	}
	if err := r.restoreRejects(); err != nil {
		return err
	}
	r.reload = false
	klog.V(2).InfoS("Read BPF load-balancing maps", "frontends", len(r.frontends), "serviceIDs", len(r.groups),
		"backends", len(r.backendKeys), "withHiddenSlots", len(r.withHidden), "matchEntries", r.matchEntries)
	return nil
}

// holdRestored records a slot or match entry found naming backend id.
func (r *reconciler) holdRestored(id uint32) {
	if id == 0 {
		return
	}
	r.refs[id]++
	// An entry naming a missing backend keeps the id from reuse until it
	// is rewritten.
	r.backendIDs.reserve(id)
}

// restoreStats matches the counter entries to the ids restored: kept where
// they exist, so that counters survive a restart; created at zero for each
// id frontends name that has none (a datapath pinned by a version without
// counters); and entries of ids nothing holds are left for the garbage
// collection. An entry that cannot be created is created by the sync that
// next applies its port.
func (r *reconciler) restoreStats() error {
	err := r.maps.Stats.Iterate(func(id uint32, _ lbSvcStats) error {
		if g := r.groups[id]; g != nil {
			g.stats = true
		} else {
			r.statsOrphans[id] = struct{}{}
		}
		return nil
	})
	if err != nil {
		return err
	}
	created := 0
	for _, g := range r.groups {
		if g.stats || len(g.frontends) == 0 {
			continue
		}
		if err := r.maps.Stats.Update(g.id, lbSvcStats{}); err != nil {
			r.statsFailed(err, g.name, g.id)
			continue
		}
		g.stats = true
		created++
	}
	if created > 0 {
		klog.InfoS("Created the counters of restored service ports that had none", "serviceIDs", created)
	}
	return nil
}
