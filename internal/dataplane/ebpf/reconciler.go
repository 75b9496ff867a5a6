// This file holds the reconciler's copy of the load-balancing maps: the
// records of what the kernel holds (appliedGroup, appliedFrontend), the
// reconciler type with its ordering rules, and what reads the copy for
// metrics. The jobs of a sync are in reconciler_restore.go (the copy
// rebuilt from the pinned maps), reconciler_plan.go (a snapshot diffed
// against the copy), reconciler_apply.go (each port applied
// make-before-break, all or nothing), reconciler_writes.go (the map
// writes, each recorded once the kernel took it) and reconciler_gc.go
// (deletions after a grace period).

package ebpf

import (
	"slices"

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
	// family is the family of every address in the maps (IPv4 unless
	// set otherwise after newReconciler).
	family       model.IPFamily
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
	// backendKey, family-neutral (a netip.Addr each, which is why they are
	// larger than the kernel's values, and scanned by the collector).
	backends    map[backendKey]uint32
	dupIDs      map[backendKey][]uint32
	backendKeys map[uint32]backendKey
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
		family:       model.IPv4,
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
	r.backends = make(map[backendKey]uint32, backends)
	r.backendKeys = make(map[uint32]backendKey, backends)
	r.refs = make(map[uint32]int32, backends)
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

// detached reports whether no frontend names g.
func (g *appliedGroup) detached() bool { return len(g.frontends) == 0 }

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
