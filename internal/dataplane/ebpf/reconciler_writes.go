// This file owns the reconciler's map writes: one helper per kind of entry
// (service ids and their counters, backends, slots, match entries,
// frontends), each recording in the copy what the kernel took, and the
// bookkeeping that follows a write (which slots are live or hidden, and the
// references that keep a backend id).

package ebpf

import (
	"fmt"
	"slices"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// newGroup allocates a service id for port name and creates its counters
// at zero, before anything can count on them (if that fails, the port is
// served without them until a later sync creates them). Until a frontend
// names it, the id is detached: collected if the port fails.
func (r *reconciler) newGroup(name model.ServicePortName) (*appliedGroup, error) {
	id, err := r.svcIDs.allocate()
	if err != nil {
		return nil, fmt.Errorf("%w: no free service id (%v); raise --%s", ErrMapFull, err, FlagMaxServices)
	}
	g := &appliedGroup{id: id, name: name}
	r.groups[id] = g
	r.detached[id] = g
	// The write replaces an entry an earlier holder of the id left.
	delete(r.statsOrphans, id)
	if err := r.maps.Stats.Update(id, lbSvcStats{}); err != nil {
		// Counters are not worth failing a port for: the programs count
		// nothing for an id without them, and the sync that next applies
		// the port creates them (resetStatsIfNew).
		r.statsFailed(err, name, id)
		return g, nil
	}
	g.stats = true
	return g, nil
}

// eventStatsFailed counts the counters entries that could not be written,
// each retried by the next sync of its port.
const eventStatsFailed = "service_stats_write_failed"

// statsFailed logs and counts a counters entry that could not be written.
func (r *reconciler) statsFailed(err error, name model.ServicePortName, id uint32) {
	klog.ErrorS(err, "Writing the counters of a service port; the port is served, its counters are retried at its next sync",
		"servicePort", name, "id", id)
	if r.events != nil {
		r.events.add(eventStatsFailed, 1)
	}
}

// resetStatsIfNew zeroes the counters of g when it now serves another
// service port (a ClusterIP reused at once), so that the new port does not
// inherit the old one's counts, and creates them if g has none. A name
// unknown since a restart is no change: counters survive restarts.
// Counters are not worth failing a port for: a write that fails is logged,
// and retried by the next sync if the entry is missing.
func (r *reconciler) resetStatsIfNew(g *appliedGroup, name model.ServicePortName) {
	renamed := g.name != (model.ServicePortName{}) && g.name != name
	if g.stats && !renamed {
		return
	}
	if err := r.maps.Stats.Update(g.id, lbSvcStats{}); err != nil {
		r.statsFailed(err, name, g.id)
		return
	}
	g.stats = true
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
			// Listed twice, or written for another list of the port.
			ids[i] = id
			continue
		}
		id, err := r.backendIDs.allocate()
		if err != nil {
			return fmt.Errorf("%w: no free backend id (%v); raise --%s", ErrMapFull, err, FlagMaxBackends)
		}
		if err := r.maps.Backends.Update(id, key); err != nil {
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

// prepareSlots writes what g's frontends cannot show yet: slots past the
// live count, where want needs them (new keys, the writes that fail when
// the map is full), and live slots that are missing or name no backend
// (found so at restore), which are holes already: filling them only helps,
// and is never undone.
func (r *reconciler) prepareSlots(g *appliedGroup, want []uint32) error {
	n0 := len(g.slots)
	for i := range min(n0, len(want)) {
		if want[i] != g.slots[i] && !r.isBackend(g.slots[i]) {
			if err := r.setSlot(g, uint32(i), want[i]); err != nil {
				return err
			}
		}
	}
	for i := n0; i < len(want); i++ {
		if id, ok := g.hidden[uint32(i)]; ok && id == want[i] {
			continue
		}
		if err := r.setSlot(g, uint32(i), want[i]); err != nil {
			return err
		}
	}
	return nil
}

// setSlot points a slot of g at a backend id, and records it once the
// kernel has taken it: the copy stays the kernel's whatever fails. A slot
// past the live count is recorded hidden; recount shows it.
func (r *reconciler) setSlot(g *appliedGroup, slot, id uint32) error {
	if err := r.maps.Slots.Update(lbSlotKey{SvcId: g.id, Slot: slot}, id); err != nil {
		return err
	}
	var old uint32
	existed := false
	if slot < uint32(len(g.slots)) {
		old, g.slots[slot] = g.slots[slot], id
		existed = old != 0
	} else {
		old, existed = g.hidden[slot]
		r.hide(g, slot, id)
	}
	if !existed {
		r.slotEntries++
	}
	r.ref(id)
	r.unref(old)
	return nil
}

// setMatch writes g's match entry for backend id with an affinity timeout.
func (r *reconciler) setMatch(g *appliedGroup, id, timeout uint32) error {
	if err := r.maps.Matches.Update(matchKey(g.id, id), timeout); err != nil {
		return err
	}
	if g.matches == nil {
		g.matches = make(map[uint32]uint32)
	}
	if _, existed := g.matches[id]; !existed {
		r.matchEntries++
		r.ref(id)
	}
	g.matches[id] = timeout
	return nil
}

// setFrontend writes the entry of fe: service id g, count n, flags. The
// slots below n must exist: a write of a higher count shows them, of a
// lower one hides those past it, which recount records.
func (r *reconciler) setFrontend(fe model.Frontend, g *appliedGroup, n int, flags uint32) error {
	if err := r.maps.Services.Update(fe, svcValue(g.id, n, flags)); err != nil {
		return err
	}
	r.forget(fe)
	r.attach(&appliedFrontend{fe: fe, group: g, count: n, flags: flags})
	return nil
}

// attach records f as its frontend's entry.
func (r *reconciler) attach(f *appliedFrontend) {
	r.frontends[f.fe] = f
	f.group.frontends = append(f.group.frontends, f)
	delete(r.detached, f.group.id)
	if f.flags&kindFlags == 0 {
		r.vipRef(f.fe.IP, 1)
	}
}

// forget records that fe has no entry (any more).
func (r *reconciler) forget(fe model.Frontend) {
	cur := r.frontends[fe]
	if cur == nil {
		return
	}
	delete(r.frontends, fe)
	g := cur.group
	g.frontends = slices.DeleteFunc(g.frontends, func(f *appliedFrontend) bool { return f == cur })
	if cur.group.detached() {
		r.detached[cur.group.id] = cur.group
	}
	if cur.flags&kindFlags == 0 {
		r.vipRef(fe.IP, -1)
	}
}

// deleteFrontend deletes the entry of fe, the write that hides it from new
// program runs. The caller recounts its group.
func (r *reconciler) deleteFrontend(fe model.Frontend) error {
	if err := r.maps.Services.Delete(fe); err != nil {
		return err
	}
	r.forget(fe)
	return nil
}

// recount records what programs can read of g's slots now: below the
// highest count of its frontends.
func (r *reconciler) recount(g *appliedGroup) {
	n := g.liveCount()
	for i := n; i < len(g.slots); i++ {
		if id := g.slots[i]; id != 0 {
			r.hide(g, uint32(i), id)
		}
	}
	if n < len(g.slots) {
		g.slots = g.slots[:n:n]
	}
	for i := uint32(len(g.slots)); i < uint32(n); i++ {
		id := g.hidden[i] // written before the count, by the callers' order
		delete(g.hidden, i)
		g.slots = append(g.slots, id)
	}
	if len(g.hidden) == 0 {
		// An emptied map keeps its buckets: drop it, or every service
		// id keeps one for the slots its first sync wrote.
		g.hidden = nil
		delete(r.withHidden, g.id)
	}
}

func (r *reconciler) hide(g *appliedGroup, slot, id uint32) {
	if g.hidden == nil {
		g.hidden = make(map[uint32]uint32)
	}
	g.hidden[slot] = id
	r.withHidden[g.id] = g
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
