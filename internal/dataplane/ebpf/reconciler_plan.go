// This file owns the reconciler's plan: a snapshot diffed against the copy
// of the maps (the ports to apply, the frontends to remove, who holds a
// frontend two Services name, where each backend goes in the slots), and
// the sync that applies that diff and then collects the garbage.

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

// portToApply is a service port of a snapshot and the frontends it claims.
type portToApply struct {
	port      *model.ServicePort
	frontends []socketFrontend
	// drop are the frontends the port held and no longer claims.
	drop []model.Frontend
}

// sync applies a snapshot. Service ports that fail are left as they were in
// the kernel and reported in the returned *dataplane.SyncError; the others
// are applied.
//
// A cold node's first sync writes in batches (coldfill.go); where a batch
// fails (a map full, say), the same sync reads back what landed and
// writes the rest entry by entry, so that only the ports that do not fit
// fail, as in any other sync.
func (r *reconciler) sync(snap *model.Snapshot) error {
	err := r.syncWith(snap, true)
	if errors.Is(err, errColdFill) {
		klog.ErrorS(err, "Writing the first full sync in batches failed; writing it entry by entry")
		err = r.syncWith(snap, false)
	}
	return err
}

// syncWith is sync, writing in batches into empty maps if batch is set.
func (r *reconciler) syncWith(snap *model.Snapshot, batch bool) error {
	if r.reload {
		if err := r.restore(); err != nil {
			return &dataplane.SyncError{Err: fmt.Errorf("reading BPF maps: %w", err)}
		}
	}
	if !snap.Full && r.nodeKnown && !snap.Node.Equal(r.node) {
		// The external frontends of every Service depend on the node's
		// addresses, and a partial snapshot has only some Services: the
		// model sends a full one when the node changes.
		return &dataplane.SyncError{Err: errors.New("the node's addresses changed in a partial snapshot: a full sync is needed")}
	}

	var cold *coldFill
	if batch && snap.Full && len(r.frontends) == 0 && len(r.groups) == 0 && len(r.backendKeys) == 0 {
		// Empty maps: the writes of every port are queued and applied in
		// batches (coldfill.go).
		cold = r.deferWrites()
		r.presize(snap)
	}

	claims, conflicts := claimFrontends(snap, r.holderOf)
	r.reportConflicts(snap, conflicts)
	var ports []portToApply
	byClusterIP := make(map[model.Frontend]portToApply)
	owned := make(map[model.ServiceName][]model.Frontend)
	for _, name := range sortedServiceNames(snap.Services) {
		for i := range snap.Services[name] {
			p := &snap.Services[name][i]
			fes := claimedFrontends(p, &snap.Node, claims)
			for _, f := range fes {
				owned[name] = append(owned[name], f.Frontend)
			}
			if len(fes) > 0 {
				ports = append(ports, portToApply{port: p, frontends: fes})
			}
		}
	}
	// By ClusterIP, so that what fits when maps fill up does not depend
	// on names; the sort is stable, a ClusterIP claimed twice keeps name
	// order.
	slices.SortStableFunc(ports, func(a, b portToApply) int { return compareFrontends(a.port.ClusterIP, b.port.ClusterIP) })
	var remove []model.Frontend
	if snap.Full {
		for fe := range r.frontends {
			if _, ok := claims[fe]; !ok {
				remove = append(remove, fe)
			}
		}
	} else {
		for name := range snap.Services {
			for _, fe := range r.owners[name] {
				f := r.frontends[fe]
				if _, ok := claims[fe]; ok || f == nil {
					continue
				}
				// Not if another Service took it over meanwhile.
				if owner := f.group.name; owner == (model.ServicePortName{}) || owner.ServiceName == name {
					remove = append(remove, fe)
				}
			}
		}
	}
	// A frontend goes with the port that held it: in that port's update
	// if it is still there, else with the rest of the port's frontends
	// (by id when the port is unknown, after a restart).
	slices.SortFunc(remove, compareFrontends)
	index := make(map[model.ServicePortName]int)
	for i, p := range ports {
		index[p.port.Name] = i
	}
	type gone struct {
		name model.ServicePortName
		id   uint32
	}
	var goneOrder []gone
	goneFrontends := make(map[gone][]model.Frontend)
	for _, fe := range remove {
		g := r.frontends[fe].group
		if i, ok := index[g.name]; ok && g.name != (model.ServicePortName{}) {
			ports[i].drop = append(ports[i].drop, fe)
			continue
		}
		key := gone{name: g.name}
		if g.name == (model.ServicePortName{}) {
			key.id = g.id
		}
		if _, seen := goneFrontends[key]; !seen {
			goneOrder = append(goneOrder, key)
		}
		goneFrontends[key] = append(goneFrontends[key], fe)
	}
	for _, p := range ports {
		if _, dup := byClusterIP[p.port.ClusterIP]; !dup {
			byClusterIP[p.port.ClusterIP] = p
		}
	}

	var failed []*dataplane.ServiceError
	for _, key := range goneOrder {
		fes := goneFrontends[key]
		if err := r.removePort(fes); err != nil {
			failed = append(failed, serviceError(key.name, fes[0], fmt.Errorf("removing: %w", err)))
		}
	}
	// A new map: clearing one sized by the last full sync costs as much.
	r.assigned = make(map[uint32]bool)
	var full []*dataplane.ServiceError
	for _, p := range ports {
		if err := r.applyPort(p.port, p.frontends, p.drop); err != nil {
			se := serviceError(p.port.Name, p.port.ClusterIP, err)
			if se.Reason == dataplane.ReasonMapFull {
				full = append(full, se)
			} else {
				failed = append(failed, se)
			}
		}
	}
	if cold != nil {
		if err := cold.finish(r); err != nil {
			return &dataplane.SyncError{Err: err}
		}
	}
	freed, gcErr := r.collectGarbage()
	if len(full) > 0 && freed {
		// Removals and shrinks free entries and ids only after their grace
		// period: what did not fit gets a second chance once they are gone.
		retried := full
		full = nil
		for _, se := range retried {
			p := byClusterIP[se.Frontend]
			if err := r.applyPort(p.port, p.frontends, p.drop); err != nil {
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
	for name := range snap.Services {
		if fes := owned[name]; len(fes) > 0 {
			r.owners[name] = fes
		} else {
			delete(r.owners, name)
		}
	}
	r.node, r.nodeKnown = snap.Node, true
	var coldRejects *coldFill
	if cold != nil {
		coldRejects = r.deferRejects()
	}
	rejectErr := r.syncRejects(&snap.Node)
	if coldRejects != nil {
		rejectErr = errors.Join(rejectErr, coldRejects.finish(r))
	}

	if len(failed) == 0 && gcErr == nil && rejectErr == nil {
		return nil
	}
	slices.SortFunc(failed, func(a, b *dataplane.ServiceError) int { return compareFrontends(a.Frontend, b.Frontend) })
	var errs []error
	if gcErr != nil {
		errs = append(errs, fmt.Errorf("collecting garbage: %w", gcErr))
	}
	if rejectErr != nil {
		errs = append(errs, fmt.Errorf("writing the ClusterIPs and Service ranges: %w", rejectErr))
	}
	return &dataplane.SyncError{Services: failed, Err: errors.Join(errs...)}
}

// holderOf is the service port whose id a frontend's entry names now: the
// zero name if none, or if the port is unknown (after a restart).
func (r *reconciler) holderOf(fe model.Frontend) model.ServicePortName {
	if f := r.frontends[fe]; f != nil {
		return f.group.name
	}
	return model.ServicePortName{}
}

// eventFrontendConflict counts the service ports left without a frontend
// they name because another serves it, once per conflict.
const eventFrontendConflict = "frontend_conflict_skipped"

// reportConflicts logs and counts each service port left without a
// frontend another holds, once: not again while the conflict lasts, which
// every full sync would repeat.
func (r *reconciler) reportConflicts(snap *model.Snapshot, conflicts []frontendConflict) {
	next := make(map[frontendConflict]bool, len(conflicts))
	if !snap.Full {
		// A partial snapshot says nothing of its other Services' conflicts.
		for c := range r.reported {
			if _, in := snap.Services[c.skipped.ServiceName]; !in {
				next[c] = true
			}
		}
	}
	for _, c := range conflicts {
		if !r.reported[c] {
			klog.InfoS("Frontend named by two services, the one serving it keeps it", "frontend", c.fe,
				"servicePort", c.skipped, "kept", c.kept)
			if r.events != nil {
				r.events.add(eventFrontendConflict, 1)
			}
		}
		next[c] = true
	}
	r.reported = next
	if snap.Full {
		clear(r.waiting)
	}
	for name := range snap.Services {
		delete(r.waiting, name)
	}
	for c := range next {
		name := c.skipped.ServiceName
		if ports, in := snap.Services[name]; in {
			r.waiting[name] = ports
		}
	}
}

// withWaiters returns snap with, if it is partial, the Services waiting for
// a frontend (r.waiting) that a Service of snap held and no longer names
// (or that was deleted), as of their last snapshot: the frontend goes to
// the next Service naming it in this sync, as a full sync would give it,
// without waiting for that Service's next change or the periodic full
// sync. snap itself is not changed.
func (r *reconciler) withWaiters(snap *model.Snapshot) *model.Snapshot {
	if snap.Full || len(r.waiting) == 0 {
		return snap
	}
	var add []model.ServiceName
	for name, ports := range r.waiting {
		if _, in := snap.Services[name]; in {
			continue
		}
		if r.freedIn(snap, ports) {
			add = append(add, name)
		}
	}
	if len(add) == 0 {
		return snap
	}
	out := *snap
	out.Services = maps.Clone(snap.Services)
	for _, name := range add {
		out.Services[name] = r.waiting[name]
	}
	return &out
}

// freedIn reports whether one of the external frontends of ports is held
// by a Service of partial snap that no longer names it.
func (r *reconciler) freedIn(snap *model.Snapshot, ports []model.ServicePort) bool {
	for i := range ports {
		for _, f := range socketFrontends(&ports[i], &snap.Node)[1:] {
			holder := r.holderOf(f.Frontend)
			hports, in := snap.Services[holder.ServiceName]
			if holder == (model.ServicePortName{}) || !in {
				continue
			}
			names := false
			for j := range hports {
				if hports[j].Name == holder && slices.ContainsFunc(socketFrontends(&hports[j], &snap.Node),
					func(o socketFrontend) bool { return o.Frontend == f.Frontend }) {
					names = true
				}
			}
			if !names {
				return true
			}
		}
	}
	return false
}

// mayReuse reports whether port p may take over group g, which the entry of
// one of the frontends it claims names: g's own port may, and any port that
// claims every frontend g has (a ClusterIP reused at once; what a restart
// found, whose port is unknown). Taking a group that serves another port's
// frontends too would serve that port's other frontends (its ClusterIP,
// say) with p's backends until that port is applied, and forever if its
// apply fails.
func (r *reconciler) mayReuse(g *appliedGroup, p *model.ServicePort, fes []socketFrontend) bool {
	if g.name == p.Name {
		return true
	}
	for _, f := range g.frontends {
		if !slices.ContainsFunc(fes, func(o socketFrontend) bool { return o.Frontend == f.fe }) {
			return false
		}
	}
	return true
}

func serviceError(name model.ServicePortName, fe model.Frontend, err error) *dataplane.ServiceError {
	reason := dataplane.ReasonWriteFailed
	if errors.Is(err, ErrMapFull) {
		reason = dataplane.ReasonMapFull
	}
	return &dataplane.ServiceError{Service: name, Frontend: fe, Reason: reason, Err: err}
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
