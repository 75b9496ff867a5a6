package ebpf

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// fakeMap is an in-memory Map with a capacity; its writes and deletes go
// through fakeMaps, which logs them and injects failures.
type fakeMap[K comparable, V any] struct {
	name     string
	capacity int
	entries  map[K]V
	parent   *fakeMaps
	// describe renders an entry for the log; value is nil for deletes.
	describe func(K, *V) string
}

func (f *fakeMap[K, V]) Update(k K, v V) error {
	op := f.parent.begin("update", f.name, f.describe(k, &v), k)
	if err := f.parent.injected(op); err != nil {
		return err
	}
	if _, ok := f.entries[k]; !ok && len(f.entries) >= f.capacity {
		return fmt.Errorf("updating %s: %w", f.name, ErrMapFull)
	}
	f.entries[k] = v
	f.parent.done(op)
	return nil
}

// UpdateBatch writes as the kernel map's UpdateBatch: chunk by chunk,
// each entry in order, stopping at the first that fails (the kernel's
// batch call leaves the entries before it written); or, where the maps
// have no batch operations (noBatch, the kernel before 5.6), through the
// same fallback to one write at a time.
func (f *fakeMap[K, V]) UpdateBatch(keys []K, values []V) error {
	return inChunks(len(keys), cmp.Or(f.parent.batchChunk, writeBatch), func(lo, hi int) error {
		if f.parent.noBatch {
			return fmt.Errorf("batch update of %s: %w", f.name, ebpf.ErrNotSupported)
		}
		f.parent.batches++
		for i := lo; i < hi; i++ {
			if err := f.Update(keys[i], values[i]); err != nil {
				return err
			}
		}
		return nil
	}, func(i int) error { return f.Update(keys[i], values[i]) })
}

func (f *fakeMap[K, V]) Delete(k K) error {
	op := f.parent.begin("delete", f.name, f.describe(k, nil), k)
	if err := f.parent.injected(op); err != nil {
		return err
	}
	if _, ok := f.entries[k]; ok {
		delete(f.entries, k)
		f.parent.done(op)
	}
	return nil
}

func (f *fakeMap[K, V]) Iterate(fn func(K, V) error) error {
	for k, v := range maps.Clone(f.entries) {
		if err := fn(k, v); err != nil {
			return err
		}
	}
	return nil
}

// fakeOp is one write, delete or grace period the reconciler asked for.
type fakeOp struct {
	// n counts the operations asked for, failed ones included, from 1.
	n    int
	kind string // "update", "delete" or "grace period"
	// mapName and key say what an update or delete was for.
	mapName string
	key     any
	text    string
}

type fakeMaps struct {
	services   *fakeMap[model.Frontend, lbSvcValue]
	slots      *fakeMap[lbSlotKey, uint32]
	backends   *fakeMap[uint32, backendKey]
	stats      *fakeMap[uint32, lbSvcStats]
	matches    *fakeMap[lbMatchKey, uint32]
	clusterIPs *fakeMap[netip.Addr, uint32]
	// ranges is an array: every index exists, zero until written.
	ranges *fakeMap[uint32, svcRange]
	log    []string
	ops    int
	// fail, when set, is asked before each operation; a non-nil error is
	// returned instead of carrying it out.
	fail func(fakeOp) error
	// onOp runs after every operation that changed the maps, and after
	// every grace period.
	onOp []func(fakeOp)
	// batches counts the batch calls that wrote; noBatch makes them
	// fail with ebpf.ErrNotSupported; batchChunk, if set, is the most
	// entries one writes (writeBatch otherwise).
	batches    int
	noBatch    bool
	batchChunk int
}

// newFakeMaps sizes the maps as the loader does for a reconciler made
// with these capacities (the frontend map holds four per service port).
func newFakeMaps(maxServices, maxBackends int) *fakeMaps {
	f := &fakeMaps{}
	f.services = &fakeMap[model.Frontend, lbSvcValue]{name: "services", capacity: 4 * maxServices, entries: make(map[model.Frontend]lbSvcValue), parent: f}
	f.services.describe = func(k model.Frontend, v *lbSvcValue) string {
		if v == nil {
			return k.String()
		}
		return fmt.Sprintf("%s %s", k, svcValueText(*v))
	}
	f.slots = &fakeMap[lbSlotKey, uint32]{name: "slots", capacity: maxBackends, entries: make(map[lbSlotKey]uint32), parent: f}
	f.slots.describe = func(k lbSlotKey, v *uint32) string {
		if v == nil {
			return fmt.Sprintf("svc=%d slot=%d", k.SvcId, k.Slot)
		}
		return fmt.Sprintf("svc=%d slot=%d backend=%d", k.SvcId, k.Slot, *v)
	}
	f.backends = &fakeMap[uint32, backendKey]{name: "backends", capacity: maxBackends, entries: make(map[uint32]backendKey), parent: f}
	f.backends.describe = func(id uint32, v *backendKey) string {
		if v == nil {
			return fmt.Sprint(id)
		}
		k := *v
		return fmt.Sprintf("%d %s/%s", id, k.Backend, k.Protocol)
	}
	// The kernel's counters map has --bpf-service-ports-max entries.
	f.stats = &fakeMap[uint32, lbSvcStats]{name: "stats", capacity: maxServices, entries: make(map[uint32]lbSvcStats), parent: f}
	f.stats.describe = func(id uint32, v *lbSvcStats) string {
		if v == nil {
			return fmt.Sprintf("svc=%d", id)
		}
		return fmt.Sprintf("svc=%d %s", id, statsText(*v))
	}
	f.matches = &fakeMap[lbMatchKey, uint32]{name: "matches", capacity: maxBackends, entries: make(map[lbMatchKey]uint32), parent: f}
	f.matches.describe = func(k lbMatchKey, v *uint32) string {
		if v == nil {
			return fmt.Sprintf("svc=%d backend=%d", k.SvcId, k.BackendId)
		}
		return fmt.Sprintf("svc=%d backend=%d timeout=%d", k.SvcId, k.BackendId, *v)
	}
	f.clusterIPs = &fakeMap[netip.Addr, uint32]{name: "cluster_ips", capacity: maxServices, entries: make(map[netip.Addr]uint32), parent: f}
	f.clusterIPs.describe = func(ip netip.Addr, _ *uint32) string { return ip.String() }
	f.ranges = &fakeMap[uint32, svcRange]{name: "ranges", capacity: maxRanges, entries: make(map[uint32]svcRange), parent: f}
	f.ranges.describe = func(i uint32, v *svcRange) string {
		if v == nil {
			return fmt.Sprint(i)
		}
		return fmt.Sprintf("%d %s", i, rangeText(*v))
	}
	for i := range uint32(maxRanges) {
		f.ranges.entries[i] = svcRange{}
	}
	return f
}

// svcValueText renders a frontend's entry: its id, count and flags.
func svcValueText(v lbSvcValue) string {
	text := fmt.Sprintf("id=%d count=%d", idOf(v), countOf(v))
	for _, fl := range []struct {
		bit  uint32
		name string
	}{
		{svcFlagAffinity, "affinity"}, {svcFlagNoLocalEndpoint, "no-local-endpoint"}, {svcFlagNodePort, "nodeport"},
		{svcFlagExternal, "external"}, {svcFlagNodeNetNSOnly, "node-netns-only"},
	} {
		if flagsOf(v)&fl.bit != 0 {
			text += " " + fl.name
		}
	}
	return text
}

func rangeText(v svcRange) string {
	kind := map[uint8]string{rangeEnd: "end", rangeServiceCIDR: "service-cidr", rangeClusterIPs: "cluster-ips"}[v.Kind]
	p := v.Prefix
	if !p.IsValid() {
		p = netip.PrefixFrom(netip.IPv4Unspecified(), 0) // an unused entry, all zero in the kernel
	}
	return fmt.Sprintf("%s %s", p, kind)
}

func statsText(v lbSvcStats) string {
	return fmt.Sprintf("connections=%d datagrams=%d refused=%d reverse=%d", v.Connections, v.Datagrams, v.Refused, v.Reverse)
}

func (f *fakeMaps) begin(kind, mapName, desc string, key any) fakeOp {
	f.ops++
	text := kind
	if mapName != "" {
		text = fmt.Sprintf("%s %s %s", kind, mapName, desc)
	}
	return fakeOp{n: f.ops, kind: kind, mapName: mapName, key: key, text: text}
}

func (f *fakeMaps) injected(op fakeOp) error {
	if f.fail == nil {
		return nil
	}
	return f.fail(op)
}

func (f *fakeMaps) done(op fakeOp) {
	f.log = append(f.log, op.text)
	for _, hook := range f.onOp {
		hook(op)
	}
}

// failNth fails the nth operation asked for.
func failNth(n int) func(fakeOp) error {
	return func(op fakeOp) error {
		if op.n == n {
			return fmt.Errorf("injected failure of operation %d (%s)", op.n, op.text)
		}
		return nil
	}
}

// failFrom fails the nth operation and every one after it.
func failFrom(n int) func(fakeOp) error {
	return func(op fakeOp) error {
		if op.n >= n {
			return fmt.Errorf("injected failure of operation %d (%s)", op.n, op.text)
		}
		return nil
	}
}

// grace is a gracePeriod that logs itself among the map operations, and
// can be failed like them.
func (f *fakeMaps) grace() gracePeriod { return fakeGrace{f} }

type fakeGrace struct{ f *fakeMaps }

func (g fakeGrace) wait() error {
	op := g.f.begin("grace period", "", "", nil)
	if err := g.f.injected(op); err != nil {
		return err
	}
	g.f.done(op)
	return nil
}

func (f *fakeMaps) maps() Maps {
	return Maps{Services: f.services, Slots: f.slots, Backends: f.backends, Stats: f.stats,
		Matches: f.matches, ClusterIPs: f.clusterIPs, Ranges: f.ranges}
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
	return dumpMaps(fakeContents{f.services.entries, f.slots.entries, f.backends.entries, f.stats.entries,
		f.matches.entries, f.clusterIPs.entries, f.ranges.entries})
}

// fakeContents are the entries of each map.
type fakeContents struct {
	services   map[model.Frontend]lbSvcValue
	slots      map[lbSlotKey]uint32
	backends   map[uint32]backendKey
	stats      map[uint32]lbSvcStats
	matches    map[lbMatchKey]uint32
	clusterIPs map[netip.Addr]uint32
	ranges     map[uint32]svcRange
}

func dumpMaps(c fakeContents) string {
	var lines []string
	for k, v := range c.services {
		lines = append(lines, fmt.Sprintf("service %s %s", k, svcValueText(v)))
	}
	addr := func(id uint32) string {
		if b, ok := c.backends[id]; ok {
			return b.Backend.String()
		}
		return "<missing backend>"
	}
	for k, id := range c.slots {
		lines = append(lines, fmt.Sprintf("slot    svc=%d slot=%d backend=%d %s", k.SvcId, k.Slot, id, addr(id)))
	}
	for id, k := range c.backends {
		lines = append(lines, fmt.Sprintf("backend %d %s/%s", id, k.Backend, k.Protocol))
	}
	for id, v := range c.stats {
		lines = append(lines, fmt.Sprintf("stats   svc=%d %s", id, statsText(v)))
	}
	for k, timeout := range c.matches {
		lines = append(lines, fmt.Sprintf("match   svc=%d backend=%d %s timeout=%d", k.SvcId, k.BackendId, addr(k.BackendId), timeout))
	}
	for ip, kind := range c.clusterIPs {
		line := fmt.Sprintf("clusterip %s", ip)
		if kind == clusterIPForeign {
			line += " foreign"
		}
		lines = append(lines, line)
	}
	for i, v := range c.ranges {
		if v != (svcRange{}) {
			lines = append(lines, fmt.Sprintf("range   %d %s", i, rangeText(v)))
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

// checkNoHoles asserts invariant 3 of DESIGN.md on the fake maps' current
// contents: every slot a program can pick exists and names an existing
// backend of the right protocol.
func checkNoHoles(f *fakeMaps) error {
	for k, v := range f.services.entries {
		for slot := range uint32(countOf(v)) {
			id, ok := f.slots.entries[lbSlotKey{SvcId: idOf(v), Slot: slot}]
			if !ok {
				return fmt.Errorf("service %s: slot %d of %d missing", k, slot, countOf(v))
			}
			b, ok := f.backends.entries[id]
			if !ok {
				return fmt.Errorf("service %s: slot %d names missing backend %d", k, slot, id)
			}
			if b.Protocol != k.Protocol {
				return fmt.Errorf("service %s: slot %d names backend of protocol %s", k, slot, b.Protocol)
			}
		}
		if flagsOf(v)&svcFlagAffinity == 0 {
			continue
		}
		// An affinity entry may name any backend a match entry of the id
		// names.
		for m := range f.matches.entries {
			if m.SvcId != idOf(v) {
				continue
			}
			b, ok := f.backends.entries[m.BackendId]
			if !ok {
				return fmt.Errorf("service %s: match entry names missing backend %d", k, m.BackendId)
			}
			if b.Protocol != k.Protocol {
				return fmt.Errorf("service %s: match entry names backend of protocol %s", k, b.Protocol)
			}
		}
	}
	return nil
}

// watchHoles makes every map operation check for holes, so a test fails on
// the exact operation that would let a connect find one.
func watchHoles(t *testing.T, f *fakeMaps) {
	t.Helper()
	var failed bool
	f.onOp = append(f.onOp, func(op fakeOp) {
		if err := checkNoHoles(f); err != nil && !failed {
			failed = true
			t.Errorf("hole after %q: %v", op.text, err)
		}
	})
}

// watchReaders models programs racing the reconciler. A program run reads a
// service entry, then one of its slots, or with affinity one of its match
// entries, then the backend it names, each at any moment after the one
// before, and adds to the service id's counters; it may still be running
// until a grace period has passed since it began. So whatever a program
// could reach at any moment since the last grace period may still be
// looked up: deleting it fails the test, on the operation that did. (A
// match entry itself may go at any time: a program that misses it picks a
// slot instead.)
func watchReaders(t *testing.T, f *fakeMaps) {
	t.Helper()
	slots := make(map[lbSlotKey]bool)
	backends := make(map[uint32]bool)
	ids := make(map[uint32]bool)
	observe := func() {
		for _, v := range f.services.entries {
			ids[idOf(v)] = true
			for slot := range uint32(countOf(v)) {
				slots[lbSlotKey{SvcId: idOf(v), Slot: slot}] = true
			}
			if flagsOf(v)&svcFlagAffinity != 0 {
				for m := range f.matches.entries {
					if m.SvcId == idOf(v) {
						backends[m.BackendId] = true
					}
				}
			}
		}
		for k := range slots {
			if id, ok := f.slots.entries[k]; ok {
				backends[id] = true
			}
		}
	}
	// Programs that began before the watch may have read anything there:
	// a restarted proxy cannot know when its predecessor hid what it finds.
	for k, id := range f.slots.entries {
		slots[k] = true
		backends[id] = true
	}
	for m := range f.matches.entries {
		backends[m.BackendId] = true
	}
	for id := range f.stats.entries {
		ids[id] = true
	}
	observe()
	var failed bool
	f.onOp = append(f.onOp, func(op fakeOp) {
		switch {
		case op.kind == "grace period":
			clear(slots)
			clear(backends)
			clear(ids)
		case op.kind == "delete" && op.mapName == "slots" && slots[op.key.(lbSlotKey)],
			op.kind == "delete" && op.mapName == "backends" && backends[op.key.(uint32)],
			op.kind == "delete" && op.mapName == "stats" && ids[op.key.(uint32)]:
			if !failed {
				failed = true
				t.Errorf("%q deletes what a program begun since the last grace period may still look up", op.text)
			}
		}
		observe()
	})
}

// checkCopy fails the test unless the reconciler's copy is exactly what the
// fake maps hold, with each backend id's references and the ids in use
// counted to match.
func checkCopy(t *testing.T, r *reconciler, f *fakeMaps) {
	t.Helper()
	c := fakeContents{
		services:   make(map[model.Frontend]lbSvcValue),
		slots:      make(map[lbSlotKey]uint32),
		backends:   make(map[uint32]backendKey),
		stats:      make(map[uint32]lbSvcStats),
		matches:    make(map[lbMatchKey]uint32),
		clusterIPs: make(map[netip.Addr]uint32),
		ranges:     make(map[uint32]svcRange),
	}
	refs := make(map[uint32]int32)
	svcIDs := make(map[uint32]struct{})
	// The copy records which counter entries exist, not their values,
	// which programs change: the fake's values are taken as they are.
	for id := range r.statsOrphans {
		c.stats[id] = f.stats.entries[id]
		if r.svcIDs.isUsed(id) {
			t.Errorf("service id %d is in use and its counters are to be deleted as an orphan", id)
		}
	}
	for fe, fr := range r.frontends {
		c.services[fe] = svcValue(fr.group.id, fr.count, fr.flags)
		if g := r.groups[fr.group.id]; g != fr.group || fr.fe != fe || !slices.Contains(g.frontends, fr) {
			t.Errorf("frontend %s names service id %d, which does not list it", fe, fr.group.id)
		}
	}
	if len(r.detached) > len(r.groups) {
		t.Errorf("%d detached service ids, %d in all", len(r.detached), len(r.groups))
	}
	for id, g := range r.groups {
		if id != g.id {
			t.Errorf("service id %d is recorded under %d", g.id, id)
		}
		for _, fr := range g.frontends {
			if r.frontends[fr.fe] != fr {
				t.Errorf("service id %d lists frontend %s, which names another", id, fr.fe)
			}
		}
		if (r.detached[id] == g) != g.detached() {
			t.Errorf("service id %d is detached: %v, indexed as such: %v", id, g.detached(), r.detached[id] == g)
		}
		if len(g.slots) != g.liveCount() {
			t.Errorf("service id %d has %d live slots, its frontends' highest count is %d", id, len(g.slots), g.liveCount())
		}
		svcIDs[id] = struct{}{}
		if g.stats {
			c.stats[id] = f.stats.entries[id]
		}
		for i, b := range g.slots {
			if b != 0 {
				c.slots[lbSlotKey{SvcId: id, Slot: uint32(i)}] = b
				refs[b]++
			}
		}
		for slot, b := range g.hidden {
			c.slots[lbSlotKey{SvcId: id, Slot: slot}] = b
			refs[b]++
		}
		for b, timeout := range g.matches {
			c.matches[matchKey(id, b)] = timeout
			refs[b]++
		}
		if len(g.hidden) > 0 && r.withHidden[id] != g {
			t.Errorf("service id %d has hidden slots but is not indexed as such", id)
		}
		if len(g.staleMatches()) > 0 && r.staleMatches[id] != g {
			t.Errorf("service id %d has match entries to delete but is not indexed as such", id)
		}
	}
	backendIDs := make(map[uint32]struct{})
	for id, key := range r.backendKeys {
		c.backends[id] = key
		backendIDs[id] = struct{}{}
	}
	for id := range refs {
		backendIDs[id] = struct{}{}
	}
	for ip, kind := range r.vips.set {
		c.clusterIPs[ip] = kind
	}
	vipRefs := make(map[netip.Addr]int)
	for fe, fr := range r.frontends {
		if fr.flags&kindFlags == 0 {
			vipRefs[fe.IP]++
		}
	}
	if !maps.Equal(vipRefs, r.vips.vipRefs) {
		t.Errorf("ClusterIP frontends counted %v, the frontends are %v", r.vips.vipRefs, vipRefs)
	}
	// The set holds what the frontends need, but for the addresses a
	// failed write left to the next sync.
	for ip := range vipRefs {
		if _, ok := r.vips.set[ip]; !ok {
			if _, dirty := r.vips.dirty[ip]; !dirty {
				t.Errorf("ClusterIP %s is served, missing from the set, and not to be written", ip)
			}
		}
	}
	for ip, kind := range r.vips.set {
		_, foreign := r.vips.foreign[ip]
		if _, ok := vipRefs[ip]; !ok && !(foreign && kind == clusterIPForeign) {
			if _, dirty := r.vips.dirty[ip]; !dirty {
				t.Errorf("%s is in the ClusterIP set, no ClusterIP, and not to be deleted", ip)
			}
		}
	}
	for i, v := range r.vips.ranges {
		c.ranges[uint32(i)] = v
	}
	if got, want := dumpMaps(c), f.dump(); got != want {
		t.Errorf("the reconciler's copy differs from the maps\n--- copy\n%s--- maps\n%s", got, want)
	}
	if n := r.entries().stats; n != len(c.stats) {
		t.Errorf("counter entries counted %d, the copy holds %d", n, len(c.stats))
	}
	if r.slotEntries != len(c.slots) {
		t.Errorf("slot entries counted %d, the copy holds %d", r.slotEntries, len(c.slots))
	}
	if r.matchEntries != len(c.matches) {
		t.Errorf("match entries counted %d, the copy holds %d", r.matchEntries, len(c.matches))
	}
	if !maps.Equal(refs, r.refs) {
		t.Errorf("reference counts %v, the slots and match entries hold %v", r.refs, refs)
	}
	if used := r.svcIDs.inUse(); !maps.Equal(svcIDs, used) {
		t.Errorf("service ids in use %v, want %v", slices.Sorted(maps.Keys(used)), slices.Sorted(maps.Keys(svcIDs)))
	}
	if used := r.backendIDs.inUse(); !maps.Equal(backendIDs, used) {
		t.Errorf("backend ids in use %v, want %v", slices.Sorted(maps.Keys(used)), slices.Sorted(maps.Keys(backendIDs)))
	}
	for key, id := range r.backends {
		if r.backendKeys[id] != key {
			t.Errorf("backend %s is pointed at id %d, which holds %s", key.Backend, id, r.backendKeys[id].Backend)
		}
	}
}

// liveSet lists the backends programs pick from for fe, sorted; ok is
// false when fe is not a service.
func liveSet(f *fakeMaps, fe model.Frontend) (backends []string, ok bool) {
	v, ok := f.services.entries[fe]
	if !ok {
		return nil, false
	}
	for slot := range uint32(countOf(v)) {
		id := f.slots.entries[lbSlotKey{SvcId: idOf(v), Slot: slot}]
		b, found := f.backends.entries[id]
		if !found {
			backends = append(backends, fmt.Sprintf("<hole at slot %d>", slot))
			continue
		}
		backends = append(backends, b.Backend.String())
	}
	slices.Sort(backends)
	return backends, true
}

// served renders what the maps serve, without ids: each frontend and the
// backends in its live slots, then how many entries each map holds, which
// is more than that when garbage is left.
func served(f *fakeMaps) string {
	var lines []string
	for fe := range f.services.entries {
		set, _ := liveSet(f, fe)
		lines = append(lines, fmt.Sprintf("%s -> %s", fe, strings.Join(set, " ")))
	}
	sort.Strings(lines)
	lines = append(lines, fmt.Sprintf("entries: %d services, %d slots, %d backends",
		len(f.services.entries), len(f.slots.entries), len(f.backends.entries)))
	return strings.Join(lines, "\n") + "\n"
}
