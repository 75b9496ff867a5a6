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

// appliedFrontend is what the kernel holds for one frontend: the service id
// its entry names, and the count and flags in the entry's count word.
type appliedFrontend struct {
	fe    model.Frontend
	group *appliedGroup
	count int
	flags uint32
}

// appliedGroup is what the kernel holds under one service id: the
// frontends whose entries name it (the ClusterIP and the external
// frontends of a service port that share one backend list, see
// groupsOf), every slot entry of the id, and its match entries.
type appliedGroup struct {
	id uint32
	// name is the service port last applied under this id, for errors and
	// counters; it is unknown for what a restart found.
	name model.ServicePortName
	// frontends are those whose entries name the id, in no order: a
	// ClusterIP and a few node addresses' or external IPs' at most.
	frontends []*appliedFrontend
	// slots[i] is the backend id slot i holds; len(slots) is the highest
	// count in the frontends' entries, so every slot a program may pick.
	// 0 marks a slot missing from the kernel (found so at restore), which
	// the next sync fills.
	slots []uint32
	// hidden are slot entries no new program run can reach: at or past
	// every frontend's count, or every slot once the id has no frontend
	// (slot number -> backend id). They are deleted one grace period after
	// they were hidden.
	hidden map[uint32]uint32
	// matches are the id's entries in the match map (backend id ->
	// affinity timeout in seconds): one per backend of its live slots
	// while its frontends have session affinity.
	matches map[uint32]uint32
	// stats records that the id's entry in the counters map exists. It is
	// created, at zero, before the first frontend's entry, and deleted
	// when the id is released, so that an id handed out again counts from
	// zero.
	stats bool
}

// liveCount is the number of slots programs may pick from: the highest
// count of the frontends. They all have the same but for a moment within
// a sync, or after one that failed half-way.
func (g *appliedGroup) liveCount() int {
	n := 0
	for _, f := range g.frontends {
		n = max(n, f.count)
	}
	return n
}

// affinity reports whether a frontend of the group has session affinity.
func (g *appliedGroup) affinity() bool {
	for _, f := range g.frontends {
		if f.flags&svcFlagAffinity != 0 {
			return true
		}
	}
	return false
}

// staleMatches returns the backend ids whose match entries are to go: all
// when the group has no affinity, else those that left its live slots.
func (g *appliedGroup) staleMatches() []uint32 {
	if len(g.matches) == 0 {
		return nil
	}
	var live map[uint32]bool
	if g.affinity() {
		live = make(map[uint32]bool, len(g.slots))
		for _, id := range g.slots {
			live[id] = true
		}
	}
	var out []uint32
	for id := range g.matches {
		if !live[id] {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// reconciler owns the contents of the load-balancing maps. It keeps a copy
// of them, exactly as the kernel holds them whatever write fails, diffs each
// snapshot against it and writes only the difference, in an order that never
// lets a program find a hole:
//
//  1. backends are written before any slot or match entry points at them;
//  2. a service id's slots are written before a frontend's count grows to
//     cover them;
//  3. each service port changes all or nothing, over all of its service
//     ids and frontends: writes that can fail for capacity (new keys) come
//     first, while still invisible; overwrites of live entries, and new
//     frontend entries, come last and are undone if one fails;
//  4. nothing a program could have read is deleted until an RCU grace period
//     has passed since the write that hid it (a lower count, a deleted
//     frontend, an overwritten slot, a deleted match entry): a connect that
//     read the old count or the old backend id a moment before still finds
//     what it read. One sync hides everything first, waits once, then
//     deletes.
//
// Retained backends keep their slot, so one endpoint change costs a couple of
// map writes whatever the size of the service; a change of the count costs
// one write per frontend of the id.
type reconciler struct {
	maps         Maps
	grace        gracePeriod
	maxServices  uint32
	maxBackends  uint32
	maxFrontends uint32

	// frontends are the entries of the kernel's service map.
	frontends map[model.Frontend]*appliedFrontend
	// groups holds every service id in use: those frontends name, and
	// detached ones with slot or match entries but no frontend (a removed
	// port whose slots await their grace period, a creation that failed
	// before a frontend was written, or what a restart found so).
	groups map[uint32]*appliedGroup
	// detached indexes the groups no frontend names: what the garbage
	// collection looks at, without walking every id.
	detached map[uint32]*appliedGroup
	// withHidden indexes the groups that have hidden slots.
	withHidden map[uint32]*appliedGroup
	// staleMatches indexes the groups with match entries to delete.
	staleMatches map[uint32]*appliedGroup

	// backends maps each backend to the id slots are pointed at. A restart
	// may find more ids holding one backend (debris of another process, two
	// proxies overlapping in an upgrade for one): dupIDs keeps the others,
	// which stay as long as a slot holds them. All three hold backends as
	// the backend map's values (backendKey.value, which keeps all of a
	// backendKey): a quarter of a backendKey's size and nothing for the
	// collector to scan, at 100k backends for 10k Services x 10 endpoints.
	backends    map[lbBackendValue]uint32
	dupIDs      map[lbBackendValue][]uint32
	backendKeys map[uint32]lbBackendValue
	// refs counts, per backend id, the slot entries in the kernel, live or
	// hidden, and the match entries that hold it. An id is deleted only at
	// zero.
	refs map[uint32]int32
	// unreferenced holds backend ids whose count reached zero, or that were
	// written or found without one: candidates for deletion.
	unreferenced map[uint32]struct{}
	// slotEntries and matchEntries count the slot and match entries
	// recorded above: what the maps hold, for admitting a port before it
	// writes anything.
	slotEntries  int
	matchEntries int

	svcIDs     *idAllocator
	backendIDs *idAllocator

	// statsOrphans are counter entries found at restore for ids nothing
	// else holds (a proxy killed between releasing an id and deleting
	// them), deleted with the next garbage.
	statsOrphans map[uint32]struct{}

	// owners records the frontends each Service had at the last sync, so
	// that a partial snapshot can remove frontends its services dropped.
	owners map[model.ServiceName][]model.Frontend
	// assigned are the groups given to a port by the sync under way: a
	// group serves one port.
	assigned map[uint32]bool

	// reported are the frontend conflicts logged and counted already.
	reported map[frontendConflict]bool
	// waiting holds, as of their last snapshot, the ports of the Services
	// left without a frontend another serves: a partial snapshot where
	// the holder drops it gives it to them (withWaiters).
	waiting map[model.ServiceName][]model.ServicePort
	// events counts the conflicts; nil in tests that do not look.
	events *eventCounts

	// vips is what the ClusterIP set and the Service ranges hold and
	// need (rejects.go).
	vips clusterIPState

	// node is the node as of the last sync, if nodeKnown: what the
	// external frontends were computed from.
	node      model.NodeInfo
	nodeKnown bool

	// reload asks the next sync to read the maps first: on start, and after
	// reading them failed half-way.
	reload bool
}

// maxRanges is the size of the Service range array in bpf/lb.c.
const maxRanges = 16

func newReconciler(maps Maps, grace gracePeriod, maxServices, maxBackends uint32) *reconciler {
	return &reconciler{
		maps:         maps,
		grace:        grace,
		maxServices:  maxServices,
		maxBackends:  maxBackends,
		maxFrontends: 4 * maxServices,
		owners:       make(map[model.ServiceName][]model.Frontend),
		reported:     make(map[frontendConflict]bool),
		waiting:      make(map[model.ServiceName][]model.ServicePort),
		reload:       true,
	}
}

// presize makes the empty copy's largest maps as large as snap needs at
// most, at once: grown one doubling at a time, they cost a cold node's
// first sync a rehash of everything at each step (a tenth of its CPU at
// 20k Services). Backends shared by ports are counted once per port: an
// upper bound.
func (r *reconciler) presize(snap *model.Snapshot) {
	if len(r.frontends)+len(r.groups)+len(r.backends)+len(r.backendKeys)+len(r.refs) > 0 {
		return
	}
	ports, backends := 0, 0
	for _, ps := range snap.Services {
		ports += len(ps)
		for i := range ps {
			backends += len(ps[i].Backends)
		}
	}
	backends = min(backends, int(r.maxBackends))
	r.frontends = make(map[model.Frontend]*appliedFrontend, ports)
	r.groups = make(map[uint32]*appliedGroup, ports)
	r.backends = make(map[lbBackendValue]uint32, backends)
	r.backendKeys = make(map[uint32]lbBackendValue, backends)
	r.refs = make(map[uint32]int32, backends)
}

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
	r.backends = make(map[lbBackendValue]uint32)
	r.dupIDs = make(map[lbBackendValue][]uint32)
	r.backendKeys = make(map[uint32]lbBackendValue)
	r.refs = make(map[uint32]int32)
	r.unreferenced = make(map[uint32]struct{})
	r.slotEntries, r.matchEntries = 0, 0
	r.statsOrphans = make(map[uint32]struct{})
	r.svcIDs = newIDAllocator(r.maxServices)
	r.backendIDs = newIDAllocator(r.maxBackends)
	r.assigned = make(map[uint32]bool)
	r.nodeKnown = false

	err := r.maps.Backends.Iterate(func(id uint32, v lbBackendValue) error {
		key := backendKeyFromValue(v).value() // Pad cleared
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

	err = r.maps.Services.Iterate(func(k lbSvcKey, v lbSvcValue) error {
		g := r.group(idOf(v))
		r.attach(&appliedFrontend{fe: frontendFromKey(k), group: g, count: countOf(v), flags: flagsOf(v)})
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

// knownBackends returns the ids the kernel has for the given backends, 0
// for each it has not, and how many those are.
func (r *reconciler) knownBackends(backends []model.Backend, proto model.Protocol) (ids []uint32, missing int) {
	ids = make([]uint32, len(backends))
	for i, b := range backends {
		id, ok := r.backends[backendKey{Backend: b, Protocol: proto}.value()]
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
	// The slot and match maps have --bpf-max-backends entries too
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

// matchOf returns the match entry of backend id in g; none when g or id is
// nil or 0.
func (g *appliedGroup) matchOf(id uint32) (uint32, bool) {
	if g == nil || id == 0 {
		return 0, false
	}
	t, ok := g.matches[id]
	return t, ok
}

// writeBackends writes an entry for each backend whose id is 0 in ids, and
// puts its new id there. New entries are invisible until a slot points at
// them.
func (r *reconciler) writeBackends(backends []model.Backend, proto model.Protocol, ids []uint32) error {
	for i, b := range backends {
		if ids[i] != 0 {
			continue
		}
		key := backendKey{Backend: b, Protocol: proto}.value()
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

// setFrontend writes the entry of fe: service id g, count n, flags. The
// slots below n must exist: a write of a higher count shows them, of a
// lower one hides those past it, which recount records.
func (r *reconciler) setFrontend(fe model.Frontend, g *appliedGroup, n int, flags uint32) error {
	if err := r.maps.Services.Update(frontendKey(fe), svcValue(g.id, n, flags)); err != nil {
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
	if err := r.maps.Services.Delete(frontendKey(fe)); err != nil {
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

// detached reports whether no frontend names g.
func (g *appliedGroup) detached() bool { return len(g.frontends) == 0 }

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
			errs = append(errs, fmt.Errorf("deleting unused backend %s: %w", backendKeyFromValue(key).Backend, err))
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
func (r *reconciler) forgetBackend(id uint32, key lbBackendValue) {
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

// counts reports the service ports (ClusterIP frontends) and backends the
// maps hold, for metrics.
func (r *reconciler) counts() (services, backends int) {
	for _, f := range r.frontends {
		if f.flags&kindFlags == 0 {
			services++
		}
	}
	return services, len(r.backendKeys)
}

// mapEntries is how many entries each map the reconciler writes holds.
type mapEntries struct {
	frontends, slots, backends, stats, matches, clusterIPs int
}

// entries reports how many entries each map the reconciler writes holds, as
// recorded in its copy, which is exactly what the kernel holds.
func (r *reconciler) entries() mapEntries {
	e := mapEntries{
		frontends:  len(r.frontends),
		slots:      r.slotEntries,
		backends:   len(r.backendKeys),
		stats:      len(r.statsOrphans),
		matches:    r.matchEntries,
		clusterIPs: len(r.vips.set),
	}
	for _, g := range r.groups {
		if g.stats {
			e.stats++
		}
	}
	return e
}

// namedIDs maps the id of each service id held whose port is known to the
// port's name: all of them once a sync has applied the ports, none of
// those a restart found before that. A port has two ids under
// internalTrafficPolicy Local with external frontends.
func (r *reconciler) namedIDs() map[uint32]model.ServicePortName {
	out := make(map[uint32]model.ServicePortName, len(r.groups))
	for id, g := range r.groups {
		if !g.detached() && g.name != (model.ServicePortName{}) {
			out[id] = g.name
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
