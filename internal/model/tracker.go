package model

import (
	"slices"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/klog/v2"
)

// Tracker turns a stream of Service and EndpointSlice events into snapshots
// of desired state. The watch handlers feed it; the sync loop drains it. It is
// safe for concurrent use.
//
// For each service it keeps the ports computed from the objects seen so far
// ("after") and, for a service changed since the last snapshot, the ports
// the last snapshot handed out ("before"). A change is pending while the two
// differ, so a change reverted before the next snapshot is no change at all.
//
// Every update recomputes only the one service it touches (two when an
// EndpointSlice moves between services), in time proportional to the size of
// that service; a partial snapshot costs time proportional to the number of
// changed services.
type Tracker struct {
	onSkipped ReportFunc
	// hostScopedReports: report Services naming host-scoped external
	// addresses (ReasonHostScopedExternalIP).
	hostScopedReports bool
	// soleFamily: WithSoleFamily.
	soleFamily bool
	// nodeName is this node's: endpoints on it are local. Fixed for the
	// Tracker's life, since slices are converted with it.
	nodeName string
	// family is the address family this Tracker serves (WithFamily).
	family IPFamily

	mu sync.Mutex
	// zone is this node's zone label, for topology hints (SetZone).
	zone string
	// services holds the proxyable Services, by name.
	services map[ServiceName]*serviceInfo
	// unservedServices holds the Services that exist but are not served
	// (headless, ExternalName, no ClusterIP of the Tracker's family): with
	// services, it tells
	// a slice's Service that is not known yet from one never served.
	unservedServices map[ServiceName]struct{}
	// slices holds the usable EndpointSlices, by namespace/name.
	slices map[sliceKey]*sliceInfo
	// byService indexes slices by the Service they belong to, each with
	// its name. A slice may be here before its Service exists.
	byService map[ServiceName][]namedSlice
	// ports holds every service's current ports ("after"); services with
	// no proxyable port are absent. The slices stored here are never
	// mutated, only replaced.
	ports map[ServiceName][]ServicePort
	// pending holds, for each service whose ports differ from the last
	// snapshot, its ports in that snapshot ("before"); nil if it was absent.
	pending map[ServiceName][]ServicePort
	// requeued holds services the next partial snapshot lists whether or
	// not their ports changed (Requeue).
	requeued map[ServiceName]struct{}
	// scratch is reused by computePorts to avoid allocating per update.
	scratch []candidate

	// What follows feeds kube-proxy's change metrics, with its semantics
	// (pkg/proxy/servicechangetracker.go, endpointschangetracker.go).

	// startTime is when the Tracker was created: trigger times before it
	// are changes made before the proxy ran, whose latency it cannot
	// measure.
	startTime time.Time
	// counts holds the totals and the pending endpoint changes.
	counts ChangeCounts
	// serviceChanged holds, for each Service whose own object changed
	// since the last snapshot, what the model kept of it then (nil if it
	// was absent or not served). Like kube-proxy's, a change reverted
	// before the next snapshot drops out.
	serviceChanged map[ServiceName]*serviceInfo
	// sliceVersions holds the resourceVersion of every EndpointSlice of
	// our address family that names its Service, to tell a change from a
	// resync or a repeated event.
	sliceVersions map[sliceKey]string
	// triggers holds, per Service, the last-change-trigger-time of each
	// EndpointSlice change since the last snapshot (only those after
	// startTime).
	triggers map[ServiceName][]time.Time
	// awaiting holds the trigger times of EndpointSlice changes whose
	// Service is not known yet: Services and EndpointSlices come from
	// separate informers, so a slice may arrive first. The change is
	// programmed by the sync that programs the Service's arrival, so the
	// times move to triggers then; none goes out with a snapshot before,
	// or an unrelated sync would observe them. At most
	// maxAwaitingTriggers per Service.
	awaiting map[ServiceName][]time.Time
}

// maxAwaitingTriggers bounds the trigger times kept for one Service that is
// not known yet. A slice normally precedes its Service by one informer's
// delay, with a change or two; slices of a Service that never comes (their
// own controller's, or left behind by a deleted Service) must not grow it
// without end.
const maxAwaitingTriggers = 64

// ChangeCounts counts the Service and EndpointSlice changes the Tracker has
// seen, as kube-proxy's kubeproxy_sync_proxy_rules_*_changes_* metrics do.
type ChangeCounts struct {
	// ServiceChanges counts every Service event (add, update, delete),
	// changed or not.
	ServiceChanges uint64
	// EndpointChanges counts every event of an EndpointSlice of the
	// Tracker's family (address type IPv4 or IPv6) that names its Service,
	// changed or not.
	EndpointChanges uint64
	// PendingServices is the number of Services whose own object changed
	// what the proxy serves from it (ports and node ports, ClusterIP,
	// traffic policies, session affinity, external and load balancer IPs,
	// source ranges, health check node port) since the last snapshot; a
	// change reverted meanwhile does not count.
	PendingServices int
	// PendingEndpointChanges is the number of EndpointSlice events since
	// the last snapshot that changed a slice (new, updated or deleted): one
	// per event, so a slice updated twice counts twice.
	PendingEndpointChanges int
}

type sliceKey struct {
	namespace, name string
}

// TrackerOption configures a Tracker.
type TrackerOption func(*Tracker)

// WithOnSkipped sets a function told about every malformed or unsupported
// piece of an API object the Tracker skips, each time the object is
// converted (that is, on every upsert). It is called without the Tracker's
// lock held, possibly from several goroutines at once. resource is ResourceService or ResourceEndpointSlice, reason
// one of the Reason* constants.
func WithOnSkipped(f func(resource, reason string)) TrackerOption {
	return func(t *Tracker) { t.onSkipped = f }
}

// WithHostScopedReports makes the Tracker log and report, through
// WithOnSkipped's function, each conversion of a Service whose external IPs
// or load balancer IPs name a host-scoped address
// (ReasonHostScopedExternalIP): for a datapath that serves at socket level,
// which leaves such addresses out. The model keeps them either way.
func WithHostScopedReports() TrackerOption {
	return func(t *Tracker) { t.hostScopedReports = true }
}

// WithNodeName names the node the proxy runs on: endpoints whose nodeName
// is this one are local, for the Local traffic policies and node hints.
// Without it no endpoint is local.
func WithNodeName(name string) TrackerOption {
	return func(t *Tracker) { t.nodeName = name }
}

// WithFamily makes the Tracker serve one address family, as each of
// kube-proxy's per-family proxiers does; the default is IPv4. It serves the
// Services with a ClusterIP of that family, on that ClusterIP, with their
// external IPs, load balancer IPs and source ranges of that family, and
// the EndpointSlices of that address type; a dual-stack proxy runs one
// Tracker per family and feeds both every event.
func WithFamily(f IPFamily) TrackerOption {
	return func(t *Tracker) { t.family = f }
}

// WithSoleFamily says that the proxy runs no Tracker of the other family
// (a single-stack node): this one then reports every port problem of the
// Services it serves, which a dual-stack proxy leaves to the Tracker of
// each Service's first family, so that it counts each once.
func WithSoleFamily() TrackerOption {
	return func(t *Tracker) { t.soleFamily = true }
}

// Family is the address family the Tracker serves.
func (t *Tracker) Family() IPFamily { return t.family }

// SetZone records this node's topology.kubernetes.io/zone label ("" for
// none), for zone hints, and recomputes every service when it changed. It
// returns whether the desired state changed.
func (t *Tracker) SetZone(zone string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if zone == t.zone {
		return false
	}
	t.zone = zone
	changed := false
	for name := range t.services {
		if t.recompute(name) {
			changed = true
		}
	}
	return changed
}

// WithStartTime sets when the proxy started, for the trigger times the
// snapshots carry: an EndpointSlice change triggered before it is not
// measured. The default is the time NewTracker is called.
func WithStartTime(start time.Time) TrackerOption {
	return func(t *Tracker) { t.startTime = start }
}

// NewTracker returns an empty Tracker.
func NewTracker(opts ...TrackerOption) *Tracker {
	t := &Tracker{
		services:         make(map[ServiceName]*serviceInfo),
		unservedServices: make(map[ServiceName]struct{}),
		slices:           make(map[sliceKey]*sliceInfo),
		byService:        make(map[ServiceName][]namedSlice),
		ports:            make(map[ServiceName][]ServicePort),
		pending:          make(map[ServiceName][]ServicePort),
		requeued:         make(map[ServiceName]struct{}),
		startTime:        time.Now(),
		serviceChanged:   make(map[ServiceName]*serviceInfo),
		sliceVersions:    make(map[sliceKey]string),
		triggers:         make(map[ServiceName][]time.Time),
		awaiting:         make(map[ServiceName][]time.Time),
		family:           IPv4,
	}
	for _, o := range opts {
		o(t)
	}
	if t.onSkipped == nil {
		t.onSkipped = func(string, string) {}
	}
	return t
}

// UpsertService records an added or updated Service. It returns whether the
// desired state may have changed, that is whether a sync is worth running.
func (t *Tracker) UpsertService(svc *v1.Service) bool {
	if svc == nil {
		return false
	}
	// Convert before locking: it depends only on the object, and reports go
	// out without the lock held.
	info := convertService(svc, t.family, t.soleFamily, t.onSkipped)
	if info != nil && t.hostScopedReports {
		reportHostScoped(svc, &info.external, t.onSkipped)
	}
	name := ServiceName{Namespace: svc.Namespace, Name: svc.Name}

	t.mu.Lock()
	old := t.services[name]
	if info == nil {
		delete(t.services, name)
		t.unservedServices[name] = struct{}{}
	} else {
		t.services[name] = info
		delete(t.unservedServices, name)
	}
	t.serviceEvent(name, old, info)
	changed := t.recompute(name)
	if times, ok := t.awaiting[name]; ok {
		// The Service has arrived: if this programs it, the slice changes
		// that came first are programmed with it; if not (it is not
		// served, or has nothing to serve), no sync ever programs them.
		delete(t.awaiting, name)
		if changed {
			t.triggers[name] = append(t.triggers[name], times...)
		}
	}
	t.mu.Unlock()
	return changed
}

// DeleteService records a deleted Service. The watch handler unwraps
// tombstones (cache.DeletedFinalStateUnknown) before calling it.
func (t *Tracker) DeleteService(svc *v1.Service) bool {
	if svc == nil {
		return false
	}
	name := ServiceName{Namespace: svc.Namespace, Name: svc.Name}

	t.mu.Lock()
	old := t.services[name]
	delete(t.services, name)
	delete(t.unservedServices, name)
	// A delete whose add this Tracker never saw: the slice changes that
	// waited for that Service will never be programmed.
	delete(t.awaiting, name)
	t.serviceEvent(name, old, nil)
	changed := t.recompute(name)
	t.mu.Unlock()
	return changed
}

// UpsertEndpointSlice records an added or updated EndpointSlice, including
// one whose service-name label changed.
func (t *Tracker) UpsertEndpointSlice(s *discoveryv1.EndpointSlice) bool {
	if s == nil {
		return false
	}
	info := convertSlice(s, t.nodeName, t.family, t.onSkipped)
	key := sliceKey{namespace: s.Namespace, name: s.Name}

	t.mu.Lock()
	defer t.mu.Unlock()
	trigger, hasTrigger := t.sliceEvent(key, s)
	changed := false
	old, hadOld := t.slices[key]
	if hadOld && (info == nil || old.service != info.service) {
		// The slice left its Service (label changed or removed, or it is no
		// longer usable): that Service loses its endpoints.
		t.unindex(key, old.service)
		changed = t.recompute(old.service)
	}
	if info == nil {
		return changed
	}
	t.slices[key] = info
	idx := t.byService[info.service]
	if i := slices.IndexFunc(idx, func(n namedSlice) bool { return n.name == key.name }); i >= 0 {
		idx[i].info = info
	} else {
		t.byService[info.service] = append(idx, namedSlice{name: key.name, info: info})
	}
	if t.recompute(info.service) {
		// Only a change that alters what is served is measured: one that
		// does not (a hostname, a zone) triggers no sync, and the next
		// periodic one would report its wait as programming latency.
		if hasTrigger {
			t.triggers[info.service] = append(t.triggers[info.service], trigger)
		}
		changed = true
	} else if hasTrigger && t.serviceUnknown(info.service) && !(hadOld && equalSliceInfo(old, info)) {
		// Nothing is served before the Service arrives, so recompute
		// cannot tell; by the same rule, a change is kept only if what
		// the model keeps of the slice changed (a new slice, or new
		// ports or endpoints), since only such a change is programmed
		// when the Service arrives.
		if times := t.awaiting[info.service]; len(times) < maxAwaitingTriggers {
			t.awaiting[info.service] = append(times, trigger)
		}
	}
	return changed
}

// serviceUnknown reports whether the Tracker has seen no Service of that
// name, served or not. Callers hold t.mu.
func (t *Tracker) serviceUnknown(name ServiceName) bool {
	if _, ok := t.services[name]; ok {
		return false
	}
	_, unserved := t.unservedServices[name]
	return !unserved
}

func equalSliceInfo(a, b *sliceInfo) bool {
	return a.service == b.service && slices.Equal(a.ports, b.ports) && slices.Equal(a.endpoints, b.endpoints) && slices.Equal(a.ip6, b.ip6)
}

// DeleteEndpointSlice records a deleted EndpointSlice. The watch handler
// unwraps tombstones before calling it. Only the namespace and name are used.
func (t *Tracker) DeleteEndpointSlice(s *discoveryv1.EndpointSlice) bool {
	if s == nil {
		return false
	}
	key := sliceKey{namespace: s.Namespace, name: s.Name}

	t.mu.Lock()
	defer t.mu.Unlock()
	t.sliceDeleted(key, s)
	old, ok := t.slices[key]
	if !ok {
		return false
	}
	t.unindex(key, old.service)
	return t.recompute(old.service)
}

// serviceEvent counts a Service event that took the model's view of it from
// old to cur (either may be nil). Callers hold t.mu.
func (t *Tracker) serviceEvent(name ServiceName, old, cur *serviceInfo) {
	t.counts.ServiceChanges++
	before, isPending := t.serviceChanged[name]
	if !isPending {
		before = old
	}
	switch {
	case equalServiceInfo(before, cur):
		delete(t.serviceChanged, name)
	case !isPending:
		t.serviceChanged[name] = before
	}
}

func equalServiceInfo(a, b *serviceInfo) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.internalLocal == b.internalLocal && a.affinity == b.affinity &&
		a.external.Equal(b.external) && slices.Equal(a.ports, b.ports)
}

// countedSlice reports whether kube-proxy's tracker of the Tracker's family
// would count an event of s: a slice of that family's address type that
// names its Service (kube-proxy ignores the others outright, so each
// family's counts hold its own slices only).
func (t *Tracker) countedSlice(s *discoveryv1.EndpointSlice) (ServiceName, bool) {
	svc, ok := serviceOfSlice(s)
	return svc, ok && s.AddressType == t.family.AddressType()
}

// sliceEvent counts an added or updated EndpointSlice, and returns its
// trigger time if this event changed the slice and the change was
// triggered after the Tracker started. Callers hold t.mu.
func (t *Tracker) sliceEvent(key sliceKey, s *discoveryv1.EndpointSlice) (time.Time, bool) {
	if _, ok := t.countedSlice(s); !ok {
		// Not ours (any more): a later delete is no change.
		delete(t.sliceVersions, key)
		return time.Time{}, false
	}
	t.counts.EndpointChanges++
	prev, known := t.sliceVersions[key]
	t.sliceVersions[key] = s.ResourceVersion
	// An informer resync or a repeated event carries the same
	// resourceVersion: no change, as kube-proxy compares the objects. A
	// slice without one (a test's) always counts.
	if known && prev == s.ResourceVersion && prev != "" {
		return time.Time{}, false
	}
	t.counts.PendingEndpointChanges++
	if at, ok := triggerTime(s); ok && at.After(t.startTime) {
		return at, true
	}
	return time.Time{}, false
}

// sliceDeleted counts a deleted EndpointSlice. Callers hold t.mu.
func (t *Tracker) sliceDeleted(key sliceKey, s *discoveryv1.EndpointSlice) {
	if _, known := t.sliceVersions[key]; !known {
		if _, ok := t.countedSlice(s); ok {
			t.counts.EndpointChanges++
		}
		return
	}
	delete(t.sliceVersions, key)
	t.counts.EndpointChanges++
	t.counts.PendingEndpointChanges++
	// The annotation of a deleted slice dates from its last update, not
	// from the deletion: kube-proxy drops the Service's pending trigger
	// times rather than report a latency it cannot know.
	if svc, ok := serviceOfSlice(s); ok {
		delete(t.triggers, svc)
		delete(t.awaiting, svc)
	}
}

// triggerTime reads the endpoints.kubernetes.io/last-change-trigger-time
// annotation the EndpointSlice controller sets: when the change (a Pod or
// Service update) that led to this version of the slice happened.
func triggerTime(s *discoveryv1.EndpointSlice) (time.Time, bool) {
	v, ok := s.Annotations[v1.EndpointsLastChangeTriggerTime]
	if !ok {
		return time.Time{}, false
	}
	at, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		klog.V(2).InfoS("Ignoring malformed trigger time annotation", "endpointSlice", klog.KObj(s),
			"annotation", v1.EndpointsLastChangeTriggerTime, "value", v, "err", err)
		return time.Time{}, false
	}
	return at, true
}

// ChangeCounts returns the change counters; see ChangeCounts.
func (t *Tracker) ChangeCounts() ChangeCounts {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.counts
	c.PendingServices = len(t.serviceChanged)
	return c
}

// namedSlice is a stored slice in its Service's index. A Service has one
// or a few slices: a short list costs a tenth of a map per Service.
type namedSlice struct {
	name string
	info *sliceInfo
}

// unindex forgets a stored slice. Callers hold t.mu.
func (t *Tracker) unindex(key sliceKey, svc ServiceName) {
	delete(t.slices, key)
	idx := t.byService[svc]
	if i := slices.IndexFunc(idx, func(n namedSlice) bool { return n.name == key.name }); i >= 0 {
		idx = slices.Delete(idx, i, i+1)
		if len(idx) == 0 {
			delete(t.byService, svc)
		} else {
			t.byService[svc] = idx
		}
	}
}

// recompute refreshes one service's ports and its pending state, and
// reports whether its ports changed. Callers hold t.mu.
func (t *Tracker) recompute(name ServiceName) bool {
	idx := t.byService[name]
	ports := computePorts(t.services[name], func(f func(*sliceInfo)) {
		for _, s := range idx {
			f(s.info)
		}
	}, Topology{NodeName: t.nodeName, Zone: t.zone}, &t.scratch)

	old := t.ports[name]
	if equalPorts(old, ports) {
		return false
	}
	before, isPending := t.pending[name]
	if !isPending {
		before = old
	}
	if len(ports) == 0 {
		delete(t.ports, name)
	} else {
		t.ports[name] = ports
	}
	switch {
	case equalPorts(before, ports):
		delete(t.pending, name) // back to what the last snapshot said
	case !isPending:
		t.pending[name] = before
	}
	return true
}

// Requeue makes the next partial snapshot list the named services with
// their current ports (nil for one that is gone), whether or not they change
// meanwhile: the datapath failed to apply them and retries. A full snapshot
// lists everything anyway; either kind clears the request.
func (t *Tracker) Requeue(names ...ServiceName) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, n := range names {
		t.requeued[n] = struct{}{}
	}
}

// Snapshot returns the desired state and clears the pending changes. A full
// snapshot lists every service with at least one proxyable port; a partial
// one lists the services whose ports changed since the previous snapshot,
// full or not, and those requeued, with nil for a service that is gone or
// has nothing left to serve. The snapshot shares no memory with the Tracker: the caller may read
// and even modify it without locking.
func (t *Tracker) Snapshot(full bool) *Snapshot {
	t.mu.Lock()
	defer t.mu.Unlock()

	snap := &Snapshot{Full: full}
	if full {
		snap.Services = make(map[ServiceName][]ServicePort, len(t.ports))
		c := &copier{}
		for _, ports := range t.ports {
			c.reserve(ports)
		}
		for name, ports := range t.ports {
			snap.Services[name] = c.copy(ports)
		}
	} else {
		snap.Services = make(map[ServiceName][]ServicePort, len(t.pending)+len(t.requeued))
		c := &copier{}
		for name := range t.pending {
			c.reserve(t.ports[name])
		}
		for name := range t.requeued {
			if _, ok := t.pending[name]; !ok {
				c.reserve(t.ports[name])
			}
		}
		for name := range t.pending {
			snap.Services[name] = c.copy(t.ports[name]) // nil when gone
		}
		for name := range t.requeued {
			if _, ok := snap.Services[name]; !ok {
				snap.Services[name] = c.copy(t.ports[name])
			}
		}
	}
	// A fresh map rather than clear(): a Go map never shrinks, and
	// iterating or clearing one that once held every service (after the
	// initial load) costs time proportional to that peak, not to the few
	// services a partial snapshot lists.
	t.pending = make(map[ServiceName][]ServicePort)
	if len(t.requeued) > 0 {
		t.requeued = make(map[ServiceName]struct{})
	}
	// Like kube-proxy, the pending changes are handed to this sync whether
	// or not it succeeds; the trigger times go with the snapshot, and its
	// caller decides when they are programmed.
	if len(t.triggers) > 0 {
		snap.TriggerTimes = t.triggers
		t.triggers = make(map[ServiceName][]time.Time)
	}
	if len(t.serviceChanged) > 0 {
		t.serviceChanged = make(map[ServiceName]*serviceInfo)
	}
	t.counts.PendingEndpointChanges = 0
	return snap
}

// copier deep-copies port lists into two arenas, so that a snapshot of 50k
// services costs a handful of allocations rather than 100k.
type copier struct {
	np, nb   int
	ports    []ServicePort
	backends []Backend
}

// aliases lists a port's backend lists other than Backends, which alias
// it when equal.
func aliases(p *ServicePort) [3]*[]Backend {
	return [3]*[]Backend{&p.Serving, &p.Cluster, &p.Local}
}

// reserve counts ports for the arenas; call it for every list before the
// first copy.
func (c *copier) reserve(ports []ServicePort) {
	c.np += len(ports)
	for i := range ports {
		c.nb += len(ports[i].Backends)
		for _, l := range aliases(&ports[i]) {
			if !sameSlice(*l, ports[i].Backends) {
				c.nb += len(*l)
			}
		}
	}
}

func (c *copier) copy(ports []ServicePort) []ServicePort {
	if len(ports) == 0 {
		return nil
	}
	if c.ports == nil {
		c.ports = make([]ServicePort, 0, c.np)
		c.backends = make([]Backend, 0, c.nb)
	}
	start := len(c.ports)
	for _, p := range ports {
		orig := p.Backends
		p.Backends = c.piece(orig)
		for _, l := range aliases(&p) {
			if sameSlice(*l, orig) {
				*l = p.Backends
			} else {
				*l = c.piece(*l)
			}
		}
		if p.External.Accessible() {
			p.External.ExternalIPs = slices.Clone(p.External.ExternalIPs)
			p.External.LoadBalancerIPs = slices.Clone(p.External.LoadBalancerIPs)
			p.External.SourceRanges = slices.Clone(p.External.SourceRanges)
		}
		c.ports = append(c.ports, p)
	}
	return c.ports[start:len(c.ports):len(c.ports)]
}

// piece copies bs into the backend arena; nil stays nil.
func (c *copier) piece(bs []Backend) []Backend {
	n := len(bs)
	if n == 0 {
		return nil
	}
	b := len(c.backends)
	c.backends = append(c.backends, bs...)
	// Cap each piece so an append by the reader reallocates instead of
	// overwriting its neighbour.
	return c.backends[b : b+n : b+n]
}

// sameSlice reports whether a and b are the same slice (same array, same
// length), as the lists aliasing Backends are.
func sameSlice(a, b []Backend) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}
