// This file owns the reconciler's garbage collection: what no program can
// reach any more (hidden slots, stale match entries, detached service ids
// and their counters, unreferenced backends) deleted once an RCU grace
// period has passed since it was hidden.

package ebpf

import (
	"errors"
	"fmt"
	"maps"
	"slices"
)

// checkMatches indexes g if it has match entries to delete.
func (r *reconciler) checkMatches(g *appliedGroup) {
	if len(g.staleMatches()) > 0 {
		r.staleMatches[g.id] = g
	} else {
		delete(r.staleMatches, g.id)
	}
}

// dropStaleMatches deletes the match entries of g that are to go.
func (r *reconciler) dropStaleMatches(g *appliedGroup) error {
	for _, id := range g.staleMatches() {
		if err := r.maps.Matches.Delete(matchKey(g.id, id)); err != nil {
			return fmt.Errorf("deleting the affinity entry of backend %d of service id %d: %w", id, g.id, err)
		}
		delete(g.matches, id)
		r.matchEntries--
		r.unref(id)
	}
	if len(g.matches) == 0 {
		g.matches = nil // as hidden: an emptied map keeps its buckets
	}
	return nil
}

// needsGrace reports whether collecting garbage will delete anything from
// the kernel that a program may have read.
func (r *reconciler) needsGrace() bool {
	if len(r.withHidden) > 0 || len(r.statsOrphans) > 0 {
		return true
	}
	// A program that read a removed frontend's id may still add to the
	// id's counters: deleting them under it could make the add land in
	// whatever entry reuses the memory.
	for _, g := range r.detached {
		if g.stats && len(g.hidden) == 0 && len(g.matches) == 0 {
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

// collectGarbage deletes what no program can reach any more. Match entries
// to go are deleted first: a program may have read one a moment ago, and
// the wait that follows covers it. Then, after one grace period that began
// once all of it was hidden: hidden slots, the ids no frontend names, then
// the backends nothing holds. Entries it fails to delete stay recorded, and
// are retried by the next sync. It reports whether it freed entries or ids.
func (r *reconciler) collectGarbage() (freed bool, err error) {
	var errs []error
	for _, id := range slices.Sorted(maps.Keys(r.staleMatches)) {
		if err := r.dropStaleMatches(r.staleMatches[id]); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(r.staleMatches, id)
		freed = true
	}
	if r.needsGrace() {
		if err := r.grace.wait(); err != nil {
			return freed, errors.Join(append(errs, fmt.Errorf("waiting for running BPF programs before deleting: %w", err))...)
		}
	}
	for _, svcID := range slices.Sorted(maps.Keys(r.withHidden)) {
		g := r.withHidden[svcID]
		for _, slot := range slices.Sorted(maps.Keys(g.hidden)) {
			if err := r.maps.Slots.Delete(lbSlotKey{SvcId: svcID, Slot: slot}); err != nil {
				errs = append(errs, fmt.Errorf("deleting slot %d of service id %d: %w", slot, svcID, err))
				continue
			}
			id := g.hidden[slot]
			delete(g.hidden, slot)
			r.slotEntries--
			r.unref(id)
			freed = true
		}
		if len(g.hidden) == 0 {
			g.hidden = nil
			delete(r.withHidden, svcID)
		}
	}
	for _, id := range slices.Sorted(maps.Keys(r.detached)) {
		g := r.detached[id]
		if len(g.hidden) > 0 || len(g.matches) > 0 {
			continue
		}
		if g.stats {
			if err := r.maps.Stats.Delete(id); err != nil {
				errs = append(errs, fmt.Errorf("deleting the counters of service id %d: %w", id, err))
				continue
			}
			g.stats = false
		}
		delete(r.groups, id)
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
			// A missing backend a restored entry named, held by none now.
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
	r.unreferenced = emptied(r.unreferenced)
	r.detached = emptied(r.detached)
	r.withHidden = emptied(r.withHidden)
	r.staleMatches = emptied(r.staleMatches)
	r.statsOrphans = emptied(r.statsOrphans)
	return freed, errors.Join(errs...)
}

// emptied returns m, or a new map if m is empty: the indexes above are
// walked by every sync, and walking a map costs what it once held (a
// full sync puts every id and backend in some), not what it holds.
func emptied[K comparable, V any](m map[K]V) map[K]V {
	if len(m) == 0 {
		return make(map[K]V)
	}
	return m
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
