// This file owns the reconciler's apply: each service port brought to what
// the snapshot wants, all or nothing and in make-before-break order
// (admitted before anything is written, invisible writes first, visible
// ones last and undone if one fails), and a removed port's frontends
// deleted.

package ebpf

import (
	"errors"
	"fmt"
	"slices"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// applyPort brings a service port's service ids, and the frontends it
// claims, to what p wants, all or nothing (see reconciler); drop are
// frontends the port served and no longer claims, deleted with it.
func (r *reconciler) applyPort(p *model.ServicePort, fes []socketFrontend, drop []model.Frontend) error {
	plans := groupsOf(p, fes)
	proto := p.ClusterIP.Protocol
	// Each plan keeps the id one of its frontends has, the ClusterIP's
	// first, unless the port's other plan took it: a port that splits in
	// two (internalTrafficPolicy Local) keeps its id for the ClusterIP,
	// one that merges keeps the ClusterIP's id for all. An id another port
	// holds is never taken (mayReuse): the frontend moves to a new one.
	groups := make([]*appliedGroup, len(plans))
	for i, plan := range plans {
		for _, f := range plan.frontends {
			if cur := r.frontends[f.Frontend]; cur != nil && !r.assigned[cur.group.id] && !slices.Contains(groups, cur.group) &&
				r.mayReuse(cur.group, p, fes) {
				groups[i] = cur.group
				break
			}
		}
	}
	ids := make([][]uint32, len(plans))
	for i, plan := range plans {
		ids[i], _ = r.knownBackends(plan.backends, proto)
	}
	if err := r.admit(plans, groups, ids, proto); err != nil {
		return err
	}
	// Whatever happens below, the copy records which slots programs see
	// and which match entries are to go, for every id the port touched.
	touched := make(map[*appliedGroup]bool)
	defer func() {
		for _, g := range groups {
			if g != nil {
				touched[g] = true
			}
		}
		for g := range touched {
			r.recount(g)
			r.checkMatches(g)
		}
	}()

	// Invisible writes, each kept whatever fails after it: backends, new
	// ids with their counters, slots past the count, match entries of
	// backends not yet live.
	for i, plan := range plans {
		if err := r.writeBackends(plan.backends, proto, ids[i]); err != nil {
			return err
		}
	}
	wants := make([][]uint32, len(plans))
	for i := range plans {
		g := groups[i]
		if g == nil {
			var err error
			if g, err = r.newGroup(p.Name); err != nil {
				return err
			}
			groups[i] = g
		} else {
			r.resetStatsIfNew(g, p.Name)
			g.name = p.Name
		}
		r.assigned[g.id] = true
		wants[i] = layoutSlots(g.slots, ids[i])
	}
	for i, plan := range plans {
		g := groups[i]
		if err := r.prepareSlots(g, wants[i]); err != nil {
			return err
		}
		if plan.flags&svcFlagAffinity == 0 {
			continue
		}
		for _, b := range wants[i] {
			if _, ok := g.matches[b]; !ok {
				if err := r.setMatch(g, b, plan.timeout); err != nil {
					return err
				}
			}
		}
	}

	// Visible writes, undone if one fails.
	var log undoLog
	err := r.showPort(plans, groups, wants, &log, touched)
	if err == nil {
		err = r.dropFrontends(drop, &log, touched)
	}
	if err != nil {
		err = r.undo(log, err)
	}
	return err
}

// dropFrontends deletes the entries of frontends a port no longer has,
// logging each for undo; their groups are added to touched.
func (r *reconciler) dropFrontends(drop []model.Frontend, log *undoLog, touched map[*appliedGroup]bool) error {
	for _, fe := range drop {
		cur := r.frontends[fe]
		if cur == nil {
			continue
		}
		prev := *cur
		touched[cur.group] = true
		if err := r.deleteFrontend(fe); err != nil {
			return err
		}
		*log = append(*log, portUndo{"restoring frontend " + fe.String(),
			func() error { return r.setFrontend(fe, prev.group, prev.count, prev.flags) }})
	}
	return nil
}

// removePort deletes the frontends of a service port that is gone, all or
// nothing: the writes that hide its ids' slots, which go with the ids
// after the grace period.
func (r *reconciler) removePort(fes []model.Frontend) error {
	touched := make(map[*appliedGroup]bool)
	var log undoLog
	err := r.dropFrontends(fes, &log, touched)
	if err != nil {
		err = r.undo(log, err)
	}
	for g := range touched {
		r.recount(g)
		r.checkMatches(g)
	}
	return err
}

// undoLog holds how to put back each visible write of a port, in order.
type undoLog []portUndo

type portUndo struct {
	what string
	fn   func() error
}

// showPort makes the new state of a port visible: live slots overwritten,
// match timeouts changed, then each frontend's entry written. Every write
// is logged for undo; the groups whose frontends changed are added to
// touched.
func (r *reconciler) showPort(plans []groupPlan, groups []*appliedGroup, wants [][]uint32, log *undoLog, touched map[*appliedGroup]bool) error {
	// Live slots, each write swapping one valid backend for another. A
	// full hash map still takes the overwrite of an existing key
	// (hashtab.c's alloc_htab_elem skips the max_entries check when it
	// replaces an element), but our maps allocate on update
	// (BPF_F_NO_PREALLOC), which can fail: then the writes made so far
	// are undone.
	for i, g := range groups {
		for slot := range min(len(g.slots), len(wants[i])) {
			old := g.slots[slot]
			if old == wants[i][slot] {
				continue
			}
			if err := r.setSlot(g, uint32(slot), wants[i][slot]); err != nil {
				return err
			}
			*log = append(*log, portUndo{fmt.Sprintf("restoring slot %d of service id %d", slot, g.id),
				func() error { return r.setSlot(g, uint32(slot), old) }})
		}
	}
	for i, plan := range plans {
		g := groups[i]
		if plan.flags&svcFlagAffinity == 0 {
			continue
		}
		for _, b := range wants[i] {
			old := g.matches[b]
			if old == plan.timeout {
				continue
			}
			if err := r.setMatch(g, b, plan.timeout); err != nil {
				return err
			}
			*log = append(*log, portUndo{fmt.Sprintf("restoring the affinity timeout of service id %d", g.id),
				func() error { return r.setMatch(g, b, old) }})
		}
	}
	// The frontends last: each shows its id's new slots, or hides the
	// surplus, at once.
	for i, plan := range plans {
		g, n := groups[i], len(wants[i])
		for _, f := range plan.frontends {
			flags := plan.flags | f.kind
			cur := r.frontends[f.Frontend]
			if cur != nil && cur.group == g && cur.count == n && cur.flags == flags {
				continue
			}
			var prev appliedFrontend
			if cur != nil {
				prev = *cur
				touched[cur.group] = true
			}
			if err := r.setFrontend(f.Frontend, g, n, flags); err != nil {
				return err
			}
			fe := f.Frontend
			if cur == nil {
				*log = append(*log, portUndo{"deleting the new frontend " + fe.String(),
					func() error { return r.deleteFrontend(fe) }})
			} else {
				*log = append(*log, portUndo{"restoring frontend " + fe.String(),
					func() error { return r.setFrontend(fe, prev.group, prev.count, prev.flags) }})
			}
		}
	}
	return nil
}

// undo puts back what a failed port wrote visibly, newest first. A write
// that fails here too leaves its entry as written, valid and recorded as
// such: the port then serves a mix of its old and new state until a later
// sync completes it.
func (r *reconciler) undo(log undoLog, cause error) error {
	var errs []error
	for _, step := range slices.Backward(log) {
		if err := step.fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", step.what, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w; undoing the entries already written failed too, the port serves a mix of its old and new state: %w",
			cause, errors.Join(errs...))
	}
	return cause
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
// groups[i] is what the kernel holds for plans[i], nil if nothing, and
// ids[i] the backend ids the kernel has for its backends (0 if none). The
// model merges duplicate backends; were one listed twice, the counts would
// only err on the safe side.
func (r *reconciler) admit(plans []groupPlan, groups []*appliedGroup, ids [][]uint32, proto model.Protocol) error {
	newBackends := make(map[model.Backend]bool)
	newGroups, newSlots, newFrontends, newMatches := 0, 0, 0, 0
	for i, plan := range plans {
		g := groups[i]
		for j, id := range ids[i] {
			if id == 0 {
				newBackends[plan.backends[j]] = true
			}
			if plan.flags&svcFlagAffinity == 0 {
				continue
			}
			if _, ok := g.matchOf(id); !ok {
				newMatches++
			}
		}
		for _, f := range plan.frontends {
			if r.frontends[f.Frontend] == nil {
				newFrontends++
			}
		}
		n := len(ids[i])
		// Slots: every backend for a new id; for an existing one, the keys
		// its update creates: slots past the count not held hidden
		// already, and live slots found missing.
		if g == nil {
			newGroups++
			newSlots += n
			continue
		}
		n0 := len(g.slots)
		for s := range min(n0, n) {
			if g.slots[s] == 0 {
				newSlots++
			}
		}
		for s := n0; s < n; s++ {
			if _, ok := g.hidden[uint32(s)]; !ok {
				newSlots++
			}
		}
	}
	if free := r.backendIDs.free(); len(newBackends) > free {
		return fmt.Errorf("%w: the port needs %d new backend entries, %d of %d are free; raise --%s",
			ErrMapFull, len(newBackends), free, r.maxBackends, FlagMaxBackends)
	}
	if free := r.svcIDs.free(); newGroups > free {
		return fmt.Errorf("%w: all %d service ids are in use; raise --%s", ErrMapFull, r.maxServices, FlagMaxServices)
	}
	// The slot and match maps have --bpf-backend-slots-max entries too
	// (loader.go).
	if free := int(r.maxBackends) - r.slotEntries; newSlots > free {
		return fmt.Errorf("%w: the port needs %d new slot entries, %d of %d are free; raise --%s",
			ErrMapFull, newSlots, max(free, 0), r.maxBackends, FlagMaxBackends)
	}
	if free := int(r.maxBackends) - r.matchEntries; newMatches > free {
		return fmt.Errorf("%w: the port needs %d new session affinity entries, %d of %d are free; raise --%s",
			ErrMapFull, newMatches, max(free, 0), r.maxBackends, FlagMaxBackends)
	}
	if free := int(r.maxFrontends) - len(r.frontends); newFrontends > free {
		return fmt.Errorf("%w: the port needs %d new frontend entries, %d of %d are free; raise --%s",
			ErrMapFull, newFrontends, max(free, 0), r.maxFrontends, FlagMaxFrontends)
	}
	return nil
}
