// Package proxy wires the pieces of kube-bpf-proxy together: informer events
// feed the model's change tracker, the bounded-frequency runner decides when
// to sync, and each sync hands a snapshot to the datapath. Data flows one
// way; the only thing coming back is the sync's result.
//
// As kube-proxy, a dual-stack node runs one Proxier per IP family, each
// with its own tracker, runner, datapath, failed ports and trigger times,
// fed by one set of informers whose events go to both (kube-proxy's
// metaproxier). They share the metrics registry, /healthz and /metrics,
// the node watch and the health check node ports.
package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/healthcheck"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/healthz"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodeinfo"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/runner"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/watch"
)

// Config holds the settings of a running proxy, independent of the mode.
type Config struct {
	// MinSyncPeriod is the least time between two syncs on average:
	// changes arriving faster are batched.
	MinSyncPeriod time.Duration
	// SyncBurst is how many syncs may start back to back, each as soon as
	// the one before ends, before MinSyncPeriod holds them apart; below 1
	// counts as 1.
	SyncBurst int
	// SyncPeriod is the most time between two syncs. Each periodic sync is
	// a full one for a datapath of maps alone; with iptables rules
	// (dataplane.Monitored) it checks that the rules are still in place,
	// and syncs in full only once per FullSyncPeriod or when they are
	// gone. Health turns bad when a change waits twice this long.
	SyncPeriod time.Duration
	// FullSyncPeriod is the most time between two full syncs of a
	// dataplane.Monitored datapath; zero means kube-proxy's
	// DefaultFullSyncPeriod, an hour.
	FullSyncPeriod time.Duration
	// RetryPeriod is how soon a failed sync is retried (as a full sync),
	// the first delay before service ports that failed on their own are
	// retried, and the first backoff after a sync that found the xtables
	// lock held (each doubling at each retry that fails again, up to
	// SyncPeriod).
	RetryPeriod        time.Duration
	HealthzBindAddress string
	MetricsBindAddress string
	// Profiling serves Go's profiles at /debug/pprof/ on the metrics
	// address (kube-proxy's --profiling).
	Profiling bool
	// Recorder records Events on the Services whose ports the datapath
	// cannot program; nil records none.
	Recorder events.EventRecorder
	// NodeName names this node in those Events: every node's proxy
	// reports on the same Service.
	NodeName string
	// Registry receives the proxy's metrics, next to what the caller put
	// there (client-go's, the info series); nil means a fresh one with the
	// Go and process collectors.
	Registry *prometheus.Registry
	// Node tells every sync what the datapath needs to know of this node
	// (addresses, zone, Service ranges), and /healthz whether the node is
	// eligible for load balancer traffic; nil means nothing: no node port
	// is served on any address, no endpoint is local, and the node is
	// always eligible.
	Node *nodeinfo.Source
	// AfterFirstSync, if set, runs once in its own goroutine after the
	// first sync that programmed the datapath: of every family, on a
	// dual-stack node.
	AfterFirstSync func()
	// Families are the IP families served, one Proxier each (RunOpening);
	// nil means IPv4 alone. kube-proxy runs dual-stack whenever the node
	// can (cmd/kube-bpf-proxy decides).
	Families []model.IPFamily
}

// families is cfg.Families, IPv4 when empty.
func (cfg Config) families() []model.IPFamily {
	if len(cfg.Families) == 0 {
		return []model.IPFamily{model.IPv4}
	}
	return cfg.Families
}

// DefaultFullSyncPeriod is kube-proxy's FullSyncPeriod
// (pkg/proxy/util): the most time between two full syncs of iptables rules.
const DefaultFullSyncPeriod = time.Hour

// Option configures a Proxier.
type Option func(*Proxier)

// WithClock makes the Proxier read time and schedule retries through c
// instead of the real clock. Tests pass a fake clock.
func WithClock(c clock.WithDelayedExecution) Option {
	return func(p *Proxier) { p.clock = c }
}

// counter is implemented by datapaths that can say how much they hold.
type counter interface {
	Counts() (services, backends int)
}

// iptablesStats is implemented by the iptables datapath.
type iptablesStats interface {
	RuleCounts() map[string]int
	RulesWritten() map[string]int
	RestoreFailures() uint64
	LastConntrackCleanup() (ran bool, took time.Duration, deleted uint)
}

// eventSource is implemented by datapaths that count what they do.
type eventSource interface {
	Events() (map[string]uint64, error)
}

// find returns the first datapath of dp's wrapping chain (dp, then what
// each Unwrap returns) that implements T.
func find[T any](dp dataplane.Dataplane) (T, bool) {
	for {
		if t, ok := dp.(T); ok {
			return t, true
		}
		u, ok := dp.(interface{ Unwrap() dataplane.Dataplane })
		if !ok {
			var zero T
			return zero, false
		}
		dp = u.Unwrap()
	}
}

// findMonitor is find for dataplane.Monitored, nil when none implements it.
func findMonitor(dp dataplane.Dataplane) dataplane.Monitored {
	m, _ := find[dataplane.Monitored](dp)
	return m
}

// innermost unwraps datapaths wrapped by others (dataplane.Handover), whose
// optional methods the wrapper does not carry.
func innermost(dp dataplane.Dataplane) dataplane.Dataplane {
	for {
		u, ok := dp.(interface{ Unwrap() dataplane.Dataplane })
		if !ok {
			return dp
		}
		dp = u.Unwrap()
	}
}

// Proxier turns informer events into datapath syncs. It implements
// watch.Handler.
type Proxier struct {
	// family is the IP family this Proxier serves.
	family  model.IPFamily
	tracker *model.Tracker
	dp      dataplane.Dataplane
	// inner is dp unwrapped, for the optional counters it may implement.
	inner dataplane.Dataplane
	// monitor is the first datapath of dp's wrapping chain that can check
	// its rules are in place (dataplane.Monitored), nil if none can;
	// appliesNodeChanges whether that chain takes node changes in partial
	// syncs (dataplane.NodeChangeApplier). Both are fixed with dp.
	monitor            dataplane.Monitored
	appliesNodeChanges bool
	health             *healthz.ProxyHealth
	metrics            *metrics.Metrics
	runner             *runner.Runner
	cfg                Config
	clock              clock.WithDelayedExecution
	events             events.EventRecorder

	synced    atomic.Bool
	syncedCh  chan struct{}
	firstSync sync.Once
	// afterFirstSync runs in its own goroutine after the first sync that
	// programmed the datapath (Config.AfterFirstSync, or on a dual-stack
	// node a countdown of the families' first syncs).
	afterFirstSync func()

	// uids holds each Service's UID, for Events to point at the object
	// (kubectl describe matches them by UID).
	uidsMu sync.Mutex
	uids   map[model.ServiceName]types.UID

	// foreign holds the ClusterIP of each Service another proxy serves
	// (watch.ForeignServiceHandler), told to the datapath with the node.
	foreignMu sync.Mutex
	foreign   map[model.ServiceName]netip.Addr

	// Touched only from sync, which the runner never runs concurrently,
	// and from Run once the runner has returned.
	needFull bool
	lastFull time.Time
	// lastCheck is when the datapath's state was last known to be in
	// place: its last full sync or its last Intact check.
	lastCheck time.Time
	// busy is the backoff after syncs that found the xtables lock held.
	busy backoff
	// local follows every Service's Local traffic policies.
	local localPolicies
	// healthChecks serves the health check node ports of
	// externalTrafficPolicy Local; nil serves none (tests).
	healthChecks *healthcheck.Server
	// node is what the last applied sync was told of the node; a change
	// makes the next sync a full one, unless the datapath applies node
	// changes in partial syncs (dataplane.NodeChangeApplier).
	node model.NodeInfo
	// failures holds the service ports the datapath could not program.
	failures map[model.ServicePortName]*portFailure
	retry    retryState
	// triggers holds the trigger times of changes handed to syncs that
	// did not program them (a failed sync, a port that failed), observed
	// once a sync does.
	triggers map[model.ServiceName][]time.Time
	// restoreFailures is the datapath's iptables-restore failure count
	// already added to the metric.
	restoreFailures uint64
}

// maxRetainedTriggers bounds the trigger times kept across failing syncs:
// a datapath failing for hours under churn would otherwise grow them
// without limit. Past it the newest are dropped, so the latencies that
// are kept are the longest ones.
const maxRetainedTriggers = 1 << 16

var _ watch.Handler = (*Proxier)(nil)

// NewProxier builds a proxier syncing into dp, serving the first of
// cfg's families (IPv4 by default).
func NewProxier(dp dataplane.Dataplane, m *metrics.Metrics, health *healthz.ProxyHealth, cfg Config, opts ...Option) *Proxier {
	_, keepsHostScoped := innermost(dp).(iptablesStats)
	p := newProxier(cfg.families()[0], m, health, cfg, !keepsHostScoped, opts...)
	p.attach(dp)
	return p
}

// newProxier builds a proxier whose datapath comes later (attach): its
// tracker takes the informers' events meanwhile. socketLevel says whether
// that datapath serves at socket level, which leaves host-scoped external
// addresses out.
func newProxier(family model.IPFamily, m *metrics.Metrics, health *healthz.ProxyHealth, cfg Config, socketLevel bool, opts ...Option) *Proxier {
	p := &Proxier{
		family:         family,
		afterFirstSync: cfg.AfterFirstSync,
		health:         health,
		metrics:        m,
		cfg:            cfg,
		clock:          clock.RealClock{},
		events:         cfg.Recorder,
		syncedCh:       make(chan struct{}),
		uids:           make(map[model.ServiceName]types.UID),
		foreign:        make(map[model.ServiceName]netip.Addr),
		needFull:       true,
		failures:       make(map[model.ServicePortName]*portFailure),
		triggers:       make(map[model.ServiceName][]time.Time),
		local:          make(localPolicies),
	}
	for _, o := range opts {
		o(p)
	}
	if p.events == nil {
		p.events = noEvents{}
	}
	m.InitServicePortReasons(portFailureReasons)
	trackerOpts := []model.TrackerOption{
		model.WithOnSkipped(m.RecordSkipped),
		// Changes triggered before the proxy started are not its latency.
		model.WithStartTime(p.clock.Now()),
		model.WithNodeName(cfg.NodeName),
		model.WithFamily(family),
	}
	if len(cfg.families()) == 1 {
		trackerOpts = append(trackerOpts, model.WithSoleFamily())
	}
	if socketLevel {
		// The socket-level datapath leaves host-scoped external addresses
		// out; the iptables rules keep them, as kube-proxy's.
		trackerOpts = append(trackerOpts, model.WithHostScopedReports())
	}
	p.tracker = model.NewTracker(trackerOpts...)
	m.SetChangeSource(p.tracker.ChangeCounts)
	p.runner = runner.New("sync "+family.String(), p.sync, cfg.MinSyncPeriod, cfg.SyncPeriod, cfg.RetryPeriod, runner.WithClock(p.clock), runner.WithBurst(cfg.SyncBurst))
	return p
}

// attach gives p its datapath, before its first sync.
func (p *Proxier) attach(dp dataplane.Dataplane) {
	p.dp = dp
	p.inner = innermost(dp)
	p.monitor = findMonitor(dp)
	if a, ok := find[dataplane.NodeChangeApplier](dp); ok {
		p.appliesNodeChanges = a.AppliesNodeChanges()
	}
	if _, ok := p.inner.(iptablesStats); ok {
		p.metrics.InitIptables()
	}
}

func (p *Proxier) OnServiceUpsert(svc *v1.Service) {
	p.setUID(svc, svc.UID)
	p.changed(p.tracker.UpsertService(svc))
}

func (p *Proxier) OnServiceDelete(svc *v1.Service) {
	p.setUID(svc, "")
	p.changed(p.tracker.DeleteService(svc))
}

// OnForeignServiceUpsert records the ClusterIP of a Service another proxy
// serves (service.kubernetes.io/service-proxy-name), which the model leaves
// out as kube-proxy does: the datapath is to leave it alone too, not
// refuse it as an unallocated address of the Service range.
func (p *Proxier) OnForeignServiceUpsert(svc *v1.Service) {
	if svc == nil {
		return
	}
	name := model.ServiceName{Namespace: svc.Namespace, Name: svc.Name}
	p.setForeign(name, clusterIPOf(svc, p.family))
}

// clusterIPOf is svc's ClusterIP of family f (its spec.clusterIPs, or
// spec.clusterIP for an object without them), invalid if it has none.
func clusterIPOf(svc *v1.Service, f model.IPFamily) netip.Addr {
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	for _, s := range ips {
		ip, err := netip.ParseAddr(s)
		if err == nil && f.Has(ip) && !ip.IsUnspecified() {
			return ip
		}
	}
	return netip.Addr{}
}

// OnForeignServiceDelete forgets a Service another proxy served.
func (p *Proxier) OnForeignServiceDelete(svc *v1.Service) {
	if svc == nil {
		return
	}
	p.setForeign(model.ServiceName{Namespace: svc.Namespace, Name: svc.Name}, netip.Addr{})
}

// setForeign records name's foreign ClusterIP, or forgets it if ip is
// invalid, and asks for a sync, which sees the node info changed (see
// nodeChanged), if that changed the set.
func (p *Proxier) setForeign(name model.ServiceName, ip netip.Addr) {
	p.foreignMu.Lock()
	old, had := p.foreign[name]
	if ip.IsValid() {
		p.foreign[name] = ip
	} else {
		delete(p.foreign, name)
	}
	p.foreignMu.Unlock()
	p.changed(had != ip.IsValid() || old != ip)
}

// foreignClusterIPs are the foreign Services' ClusterIPs, sorted, unique.
func (p *Proxier) foreignClusterIPs() []netip.Addr {
	p.foreignMu.Lock()
	defer p.foreignMu.Unlock()
	if len(p.foreign) == 0 {
		return nil
	}
	out := make([]netip.Addr, 0, len(p.foreign))
	for _, ip := range p.foreign {
		out = append(out, ip)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// setUID records a Service's UID, or forgets it if uid is empty.
func (p *Proxier) setUID(svc *v1.Service, uid types.UID) {
	if svc == nil {
		return
	}
	name := model.ServiceName{Namespace: svc.Namespace, Name: svc.Name}
	p.uidsMu.Lock()
	defer p.uidsMu.Unlock()
	if uid == "" {
		delete(p.uids, name)
	} else {
		p.uids[name] = uid
	}
}

func (p *Proxier) uid(name model.ServiceName) types.UID {
	p.uidsMu.Lock()
	defer p.uidsMu.Unlock()
	return p.uids[name]
}

func (p *Proxier) OnEndpointSliceUpsert(s *discoveryv1.EndpointSlice) {
	p.changed(p.tracker.UpsertEndpointSlice(s))
}
func (p *Proxier) OnEndpointSliceDelete(s *discoveryv1.EndpointSlice) {
	p.changed(p.tracker.DeleteEndpointSlice(s))
}

// nodeChanged follows a change of the node's zone, primary address or the
// Service ranges: the zone changes which endpoints topology hints select
// (the tracker hands the Services it changes to the next sync), the rest
// is read by the next sync, which it makes a full one unless the datapath
// applies node changes in partial syncs (dataplane.NodeChangeApplier).
func (p *Proxier) nodeChanged() {
	p.tracker.SetZone(p.cfg.Node.Zone())
	p.changed(true)
}

// OnSynced lets syncs begin: before both caches are complete, a sync could
// remove Services whose objects simply had not arrived yet.
func (p *Proxier) OnSynced() {
	klog.InfoS("Services and EndpointSlices synced, programming the datapath", "ipFamily", p.family)
	p.synced.Store(true)
	close(p.syncedCh)
}

func (p *Proxier) changed(changed bool) {
	if !changed || !p.synced.Load() {
		return
	}
	p.health.QueuedUpdate(p.family)
	p.metrics.RecordQueued(p.clock.Now())
	p.runner.Trigger()
}

// sync hands the datapath a snapshot: full the first time, after a failure
// that lost track of the datapath's state, and periodically; otherwise only
// what changed, plus the services whose ports failed on their own once
// their retry is due. Periodically means each SyncPeriod for a datapath of
// maps alone, and once per FullSyncPeriod for iptables rules
// (dataplane.Monitored), as kube-proxy: each SyncPeriod in between only
// checks that the rules are in place (its canary chains), and a sync that
// finds them gone is full. In kube-proxy's large cluster mode (more than
// 1000 endpoints) there is no periodic full sync of iptables rules at all.
//
// A sync that applied everything but such ports is progress: health says
// the datapath is kept up to date, and the failed ports are reported and
// retried with a backoff without resyncing everything. A sync that changed
// nothing because another program held the xtables lock
// (dataplane.ErrBusy) keeps what was applied: its changes are handed again
// to the next sync, after a backoff, and a partial sync stays partial. Any
// other error fails the sync as a whole, and the next one is full.
func (p *Proxier) sync(ctx context.Context) error {
	start := p.clock.Now()
	if p.busy.waiting(start) {
		// Backing off from a held lock: the changes wait in the tracker
		// for the retry the backoff's timer triggers.
		klog.V(2).InfoS("Sync deferred: backing off after the xtables lock was held", "retryAt", p.busy.at)
		return nil
	}
	var node model.NodeInfo
	if p.cfg.Node != nil {
		node = p.cfg.Node.InfoFor(p.family)
	}
	node.ForeignClusterIPs = p.foreignClusterIPs()
	monitored := p.monitor != nil
	fullPeriod := p.cfg.SyncPeriod
	if monitored {
		fullPeriod = cmp.Or(p.cfg.FullSyncPeriod, DefaultFullSyncPeriod)
	}
	// As kube-proxy, no periodic full sync of iptables rules in a large
	// cluster: there the canary alone brings one.
	periodic := !monitored || !p.monitor.LargeCluster()
	full := p.needFull || (periodic && start.Sub(p.lastFull) >= fullPeriod)
	if !node.Equal(p.node) && !p.appliesNodeChanges {
		full = true
	}
	if !full && monitored && start.Sub(p.lastCheck) >= p.cfg.SyncPeriod {
		ok, err := p.intact(ctx, p.monitor, start)
		if dataplane.OnlyBusy(err) {
			// The check waited for the xtables lock in vain; a restore
			// would wait as long again. Nothing was taken from the
			// tracker: its changes wait for the retry, which checks
			// again.
			end := p.clock.Now()
			p.metrics.RecordSync(metrics.SyncKindPartial, end.Sub(start), end, err)
			p.backOff(end, err, "kind", "check")
			return nil
		}
		full = !ok
	}
	kind := metrics.SyncKindPartial
	if full {
		kind = metrics.SyncKindFull
	}
	retrying := p.retry.due(start)
	if retrying && !full {
		p.tracker.Requeue(p.failedServices()...)
	}
	snap := p.tracker.Snapshot(full)
	snap.Node = node
	err := p.dp.Sync(ctx, snap)
	end := p.clock.Now()

	portErrs, onlyPorts := dataplane.OnlyServicesFailed(err)
	applied := err == nil || onlyPorts
	var syncErr error
	if !applied {
		syncErr = err
		// A sync failing as a whole may still name ports that failed.
		portErrs = failedPorts(err)
	}
	p.metrics.RecordSync(kind, end.Sub(start), end, syncErr)
	if c, ok := p.inner.(counter); ok {
		p.metrics.SetProgrammed(c.Counts())
	}
	if r, ok := p.inner.(iptablesStats); ok {
		n := r.RestoreFailures()
		p.metrics.AddIptablesRestoreFailures(n - p.restoreFailures)
		p.restoreFailures = n
		if applied {
			p.metrics.SetIptablesRules(r.RuleCounts(), r.RulesWritten())
		}
		if ran, took, deleted := r.LastConntrackCleanup(); ran {
			p.metrics.RecordConntrackCleanup(took, deleted)
		}
	}
	p.recordProgramming(end, snap, portErrs, applied)
	p.recordPortResults(snap, portErrs, applied)
	if !applied && dataplane.OnlyBusy(err) {
		// Nothing changed in the kernel: what was applied is still
		// exactly what the datapath knows. The same changes go again,
		// later; a full sync stays due. The ports whose retry was due
		// were not tried: their backoff stays as it was, and the
		// retry still due.
		if full {
			// Whatever made it full (a flush the canary saw, say) still
			// holds.
			p.needFull = true
		} else {
			p.tracker.Requeue(slices.Collect(maps.Keys(snap.Services))...)
		}
		p.backOff(end, err, "kind", kind, "services", len(snap.Services))
		return nil
	}
	p.scheduleRetry(end, retrying || full)
	p.busy.reset()
	if !applied {
		// What changed is no longer in the tracker: only a full sync
		// brings it back.
		p.needFull = true
		p.health.SyncFailed(p.family)
		return fmt.Errorf("%s sync: %w", kind, err)
	}
	p.needFull = false
	p.node = node
	p.local.apply(snap)
	p.metrics.SetNoLocalEndpoints(p.local.totals())
	if p.healthChecks != nil {
		// As kube-proxy, after a sync that applied: a load balancer is
		// told a node serves once its datapath does.
		ports, local := p.local.healthChecks()
		p.healthChecks.SetAddressesFor(p.family, node.AllLocalAddresses, node.NodePortAddresses)
		if err := p.healthChecks.SyncServicesFor(p.family, ports); err != nil {
			klog.ErrorS(err, "Some health check node ports are not served; retrying after each sync", "ipFamily", p.family)
		}
		p.healthChecks.SyncEndpointsFor(p.family, local)
	}
	if full {
		p.lastFull = start
		p.lastCheck = start
	}
	p.health.Updated(p.family)
	if p.afterFirstSync != nil {
		p.firstSync.Do(func() { go p.afterFirstSync() })
	}
	klog.V(2).InfoS("Synced datapath", "ipFamily", p.family, "kind", kind, "services", len(snap.Services),
		"failedServicePorts", len(portErrs), "elapsed", end.Sub(start))
	return nil
}

// backOff ends a sync that found the xtables lock held (in its restore or
// in the canary check before it) and so changed nothing: it counts the
// time-out, once, and has the runner try again after a backoff.
func (p *Proxier) backOff(end time.Time, err error, logValues ...any) {
	p.metrics.RecordLockTimeout()
	delay := p.busy.next(p.firstRetryDelay(), max(p.cfg.SyncPeriod, p.firstRetryDelay()))
	p.busy.at = end.Add(delay)
	p.busy.stop()
	p.busy.timer = p.clock.AfterFunc(delay, p.runner.Trigger)
	p.health.SyncFailed(p.family)
	klog.ErrorS(err, "Another program held the xtables lock past the wait; nothing was changed, the changes are retried later. "+
		"If this repeats, find what holds /run/xtables.lock for long (another proxy, a CNI plugin, a firewall manager) "+
		"or raise --iptables-lock-wait", append(logValues, "ipFamily", p.family, "retryAfter", delay)...)
}

// intact checks that the datapath's state is still in place, and counts
// the result. A check that cannot tell counts as intact: the rules were
// there at the last check, and the next period checks again. A check that
// found the xtables lock held (dataplane.ErrBusy) returns its error, for
// the sync to back off; the retry checks again.
func (p *Proxier) intact(ctx context.Context, m dataplane.Monitored, now time.Time) (bool, error) {
	ok, err := m.Intact(ctx)
	switch {
	case dataplane.OnlyBusy(err):
		p.metrics.RecordCheck(metrics.CheckError)
		return false, err
	case err != nil:
		p.lastCheck = now
		p.metrics.RecordCheck(metrics.CheckError)
		klog.ErrorS(err, "Cannot check that the iptables rules are in place; checking again next period")
		return true, nil
	case !ok:
		p.lastCheck = now
		p.metrics.RecordCheck(metrics.CheckFlushed)
		klog.InfoS("The iptables canary chains are gone (someone flushed the tables): syncing in full")
		return false, nil
	}
	p.lastCheck = now
	p.metrics.RecordCheck(metrics.CheckIntact)
	return true, nil
}

// backoff spaces out the retries of syncs that found the xtables lock
// held: RetryPeriod, doubling at each one that finds it held again, up
// to SyncPeriod. Touched only from sync and, once the runner has
// returned, from Run.
type backoff struct {
	// at is when the next attempt is due; zero when not backing off.
	at    time.Time
	delay time.Duration
	timer clock.Timer
}

// waiting reports whether now is before the next attempt is due.
func (b *backoff) waiting(now time.Time) bool { return !b.at.IsZero() && now.Before(b.at) }

// next is the delay before the next attempt after one more found the
// lock held.
func (b *backoff) next(first, most time.Duration) time.Duration {
	if b.delay == 0 {
		b.delay = first
	} else {
		b.delay = min(2*b.delay, most)
	}
	return b.delay
}

func (b *backoff) stop() {
	if b.timer != nil {
		b.timer.Stop()
		b.timer = nil
	}
}

func (b *backoff) reset() {
	b.stop()
	*b = backoff{}
}

// recordProgramming observes kube-proxy's network programming latency for
// the changes this sync programmed, and keeps the times of those it did not
// for a later sync. kube-proxy itself drops them when a sync fails, so its
// histogram never shows the time a failing datapath added; here a change
// counts once it is programmed, as the metric's definition says.
func (p *Proxier) recordProgramming(now time.Time, snap *model.Snapshot, portErrs []*dataplane.ServiceError, applied bool) {
	kept := 0
	for _, times := range p.triggers {
		kept += len(times)
	}
	for name, times := range snap.TriggerTimes {
		if n := min(len(times), maxRetainedTriggers-kept); n > 0 {
			p.triggers[name] = append(p.triggers[name], times[:n]...)
			kept += n
		}
	}
	if !applied || len(p.triggers) == 0 {
		return
	}
	// A Service with a port that failed on its own is not programmed yet:
	// its times wait for the retry that programs it.
	failed := make(map[model.ServiceName]bool, len(portErrs))
	for _, e := range portErrs {
		failed[e.Service.ServiceName] = true
	}
	done := make(map[model.ServiceName][]time.Time, len(p.triggers))
	for name, times := range p.triggers {
		if !failed[name] {
			done[name] = times
			delete(p.triggers, name)
		}
	}
	p.metrics.ObserveNetworkProgramming(now, done)
}

// Run runs the proxy until ctx ends: the health and metrics servers, the
// informers, and, once they have synced, the sync runner. It returns early
// with an error if a server cannot listen or the informers cannot start.
// dp serves the one family of cfg (IPv4 by default).
func Run(ctx context.Context, client kubernetes.Interface, dp dataplane.Dataplane, cfg Config) error {
	if len(cfg.Families) > 1 {
		return fmt.Errorf("one datapath for %d families: use RunOpening", len(cfg.Families))
	}
	_, keepsHostScoped := innermost(dp).(iptablesStats)
	return RunOpening(ctx, client, func(context.Context, model.IPFamily) (dataplane.Dataplane, error) { return dp, nil }, !keepsHostScoped, cfg)
}

// datapathCollectors registers on reg the collectors the datapaths feed at
// scrape time: their event counters (both modes), kube-proxy's nfacct
// counters (iptables mode), and the per Service port counters and map
// fill (ebpf mode). docs/metrics.md lists what they export
// (TestMetricsTables). None has an ip_family label (kube-proxy's nfacct
// counters have none either), so each is registered once. The iptables
// datapaths of the two families count their own events, which the one
// collector sums; every other kind is read from the first family's
// datapath that feeds it: the nfacct objects are shared by the families'
// rules, and the eBPF datapath's IPv6 view shares the programs, and so
// the counters, of the IPv4 one.
type datapathCollectors struct {
	mu               sync.Mutex
	events           []func() (map[string]uint64, error)
	nfacct, counters bool
}

func (c *datapathCollectors) register(reg prometheus.Registerer, dp dataplane.Dataplane) {
	if src, ok := innermost(dp).(eventSource); ok {
		// Every family's datapath is of the one mode: the iptables
		// ones count their own events, the eBPF ones share theirs.
		_, perFamily := innermost(dp).(iptablesStats)
		c.mu.Lock()
		first := len(c.events) == 0
		if first || perFamily {
			c.events = append(c.events, src.Events)
		}
		c.mu.Unlock()
		if first {
			reg.MustRegister(metrics.NewDatapathEventsCollector(c.readEvents))
		}
	}
	// kube-proxy's nfacct counters (iptables mode).
	if src, ok := innermost(dp).(interface {
		NFAcctPackets() (uint64, uint64, bool)
	}); ok && !c.nfacct {
		c.nfacct = true
		reg.MustRegister(metrics.NewNFAcctCollector(src.NFAcctPackets))
	}
	// The eBPF datapath's per Service port counters and map fill.
	if src, ok := innermost(dp).(metrics.DatapathCounters); ok && !c.counters {
		c.counters = true
		reg.MustRegister(metrics.NewDatapathCountersCollector(src))
	}
}

// readEvents sums the event counters of the sources registered.
func (c *datapathCollectors) readEvents() (map[string]uint64, error) {
	c.mu.Lock()
	sources := slices.Clone(c.events)
	c.mu.Unlock()
	if len(sources) == 1 {
		return sources[0]()
	}
	sum := map[string]uint64{}
	for _, read := range sources {
		events, err := read()
		if err != nil {
			return nil, err
		}
		for k, v := range events {
			sum[k] += v
		}
	}
	return sum, nil
}

// fanOut hands every informer event to each family's Proxier, as
// kube-proxy's metaproxier does: each tracker takes what is of its
// family.
type fanOut []*Proxier

var (
	_ watch.Handler               = fanOut(nil)
	_ watch.ForeignServiceHandler = fanOut(nil)
)

func (f fanOut) OnServiceUpsert(svc *v1.Service) {
	for _, p := range f {
		p.OnServiceUpsert(svc)
	}
}

func (f fanOut) OnServiceDelete(svc *v1.Service) {
	for _, p := range f {
		p.OnServiceDelete(svc)
	}
}

func (f fanOut) OnEndpointSliceUpsert(s *discoveryv1.EndpointSlice) {
	for _, p := range f {
		p.OnEndpointSliceUpsert(s)
	}
}

func (f fanOut) OnEndpointSliceDelete(s *discoveryv1.EndpointSlice) {
	for _, p := range f {
		p.OnEndpointSliceDelete(s)
	}
}

func (f fanOut) OnForeignServiceUpsert(svc *v1.Service) {
	for _, p := range f {
		p.OnForeignServiceUpsert(svc)
	}
}

func (f fanOut) OnForeignServiceDelete(svc *v1.Service) {
	for _, p := range f {
		p.OnForeignServiceDelete(svc)
	}
}

func (f fanOut) OnSynced() {
	for _, p := range f {
		p.OnSynced()
	}
}

// nodeChanged follows a change of the node (nodeinfo.Source.Run): each
// family's Proxier reads its own part of it.
func (f fanOut) nodeChanged() {
	for _, p := range f {
		p.nodeChanged()
	}
}

// countdown returns a function that runs fn in its own goroutine once it
// has been called n times.
func countdown(n int, fn func()) func() {
	var left atomic.Int32
	left.Store(int32(n))
	return func() {
		if left.Add(-1) == 0 {
			go fn()
		}
	}
}

// RunOpening is Run with one datapath per family of cfg.Families, which
// open starts (in the order of cfg.Families, one after the other) while
// the informers list the Services and EndpointSlices: a cold start pays
// the longer of the two rather than their sum. Nothing is synced before
// all are done. socketLevel says whether those datapaths serve at socket
// level (the ebpf mode). An error from open ends the proxy with it; Run
// returns only after open has.
//
// Each family gets a Proxier of its own, fed by the one set of informers
// (fanOut). They share the registry (each recording under its ip_family),
// /healthz (unhealthy when either family's change waits too long), the
// node watch (each reading its family's part of the node), the health
// check node ports (each family answering for its own endpoints) and the
// Event recorder: a service port that fails in both families gets an
// Event from each, whose note names the frontend, and so the family, that
// failed.
func RunOpening(ctx context.Context, client kubernetes.Interface, open func(context.Context, model.IPFamily) (dataplane.Dataplane, error), socketLevel bool, cfg Config) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	families := cfg.families()
	reg := cfg.Registry
	if reg == nil {
		reg = metrics.NewRegistry()
	}
	m := metrics.NewForFamily(reg, families[0])
	health := healthz.NewProxyHealth(2*cfg.SyncPeriod, nil)
	if len(families) > 1 && cfg.AfterFirstSync != nil {
		cfg.AfterFirstSync = countdown(len(families), cfg.AfterFirstSync)
	}
	proxiers := make(fanOut, 0, len(families))
	for _, f := range families {
		// Queued from the start: a proxy that never completes its
		// first sync turns unhealthy.
		health.QueuedUpdate(f)
		proxiers = append(proxiers, newProxier(f, m.ForFamily(f), health, cfg, socketLevel))
	}
	uid := func(name model.ServiceName) types.UID {
		// Every Proxier sees every Service; the first knows them all.
		return proxiers[0].uid(name)
	}
	checks := healthcheck.New(healthcheck.Config{
		NodeName:   cfg.NodeName,
		Recorder:   cfg.Recorder,
		ServiceUID: uid,
		Healthy: func() bool {
			// As kube-proxy: the proxy's health, all families.
			ok, _, _ := health.Healthy()
			return ok
		},
	})
	defer checks.Close()
	for _, p := range proxiers {
		p.healthChecks = checks
	}

	errs := make(chan error, 4+len(proxiers))
	running := 0
	spawn := func(name string, fn func() error) {
		running++
		go func() {
			err := fn()
			if err != nil && ctx.Err() == nil {
				err = fmt.Errorf("%s: %w", name, err)
			} else {
				err = nil
			}
			errs <- err
		}()
	}
	opened := make(chan struct{})
	openErr := make(chan error, 1)
	go func() {
		var collectors datapathCollectors
		for _, p := range proxiers {
			dp, err := open(ctx, p.family)
			if err != nil {
				if len(proxiers) > 1 {
					err = fmt.Errorf("opening the %v datapath: %w", p.family, err)
				}
				openErr <- err
				cancel()
				return
			}
			p.attach(dp)
			collectors.register(reg, dp)
		}
		close(opened)
	}()
	healthOpts := []healthz.HandlerOption{healthz.WithCounts(m.HealthCounts())}
	if cfg.Node != nil {
		// As kube-proxy: 503 while the Node is being deleted or tainted
		// for deletion, and until it has been seen.
		healthOpts = append(healthOpts, healthz.WithNodeEligible(cfg.Node.NodeEligible))
	}
	spawn("healthz server", func() error {
		return healthz.ListenAndServe(ctx, cfg.HealthzBindAddress, health, healthOpts...)
	})
	spawn("metrics server", func() error { return metrics.ListenAndServe(ctx, cfg.MetricsBindAddress, reg, cfg.Profiling) })
	var handler watch.Handler = proxiers
	if len(proxiers) == 1 {
		handler = proxiers[0]
	}
	spawn("watch", func() error { return watch.Run(ctx, client, handler, 0) })
	if cfg.Node != nil {
		spawn("node watch", func() error { return cfg.Node.Run(ctx, client, proxiers.nodeChanged) })
	}
	for _, p := range proxiers {
		name := "sync runner"
		if len(proxiers) > 1 {
			name = p.family.String() + " sync runner"
		}
		spawn(name, func() error {
			// Both the datapaths and the complete caches: before the
			// lists are complete, a sync would remove what simply had
			// not arrived.
			select {
			case <-opened:
			case <-ctx.Done():
				return nil
			}
			select {
			case <-p.syncedCh:
				p.health.SyncLoopStarted(p.family)
				p.runner.Run(ctx)
				p.retry.stop()
				p.busy.stop()
			case <-ctx.Done():
			}
			return nil
		})
	}

	var firstErr error
	for range running {
		if err := <-errs; err != nil && firstErr == nil {
			firstErr = err
			cancel() // one part failing stops the others
		}
	}
	// The datapaths' start, which nothing else waits for, ends too: its
	// error comes first, since the others' follow from it.
	select {
	case err := <-openErr:
		return err
	case <-opened:
	}
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
