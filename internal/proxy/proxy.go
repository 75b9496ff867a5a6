// Package proxy wires the pieces of kube-bpf-proxy together: informer events
// feed the model's change tracker, the bounded-frequency runner decides when
// to sync, and each sync hands a snapshot to the datapath. Data flows one
// way; the only thing coming back is the sync's result.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/healthz"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/runner"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/watch"
)

// Config holds the settings of a running proxy, independent of the mode.
type Config struct {
	// MinSyncPeriod is the least time between two syncs: changes arriving
	// faster are batched.
	MinSyncPeriod time.Duration
	// SyncPeriod is the most time between two syncs; each periodic sync is a
	// full one. Health turns bad when a change waits twice this long.
	SyncPeriod time.Duration
	// RetryPeriod is how soon a failed sync is retried (as a full sync).
	RetryPeriod        time.Duration
	HealthzBindAddress string
	MetricsBindAddress string
}

// counter is implemented by datapaths that can say how much they hold.
type counter interface {
	Counts() (services, backends int)
}

// ruleCounter is implemented by the iptables datapath.
type ruleCounter interface {
	RuleCounts() map[string]int
}

// eventSource is implemented by datapaths that count what they do.
type eventSource interface {
	Events() (map[string]uint64, error)
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
	tracker *model.Tracker
	dp      dataplane.Dataplane
	// inner is dp unwrapped, for the optional counters it may implement.
	inner   dataplane.Dataplane
	health  *healthz.ProxyHealth
	metrics *metrics.Metrics
	runner  *runner.Runner
	cfg     Config

	synced   atomic.Bool
	syncedCh chan struct{}

	// Touched only from sync, which the runner never runs concurrently.
	needFull bool
	lastFull time.Time
}

var _ watch.Handler = (*Proxier)(nil)

// NewProxier builds a proxier syncing into dp.
func NewProxier(dp dataplane.Dataplane, m *metrics.Metrics, health *healthz.ProxyHealth, cfg Config) *Proxier {
	p := &Proxier{
		dp:       dp,
		inner:    innermost(dp),
		health:   health,
		metrics:  m,
		cfg:      cfg,
		syncedCh: make(chan struct{}),
		needFull: true,
	}
	p.tracker = model.NewTracker(model.WithOnSkipped(m.RecordSkipped))
	p.runner = runner.New("sync", p.sync, cfg.MinSyncPeriod, cfg.SyncPeriod, cfg.RetryPeriod)
	return p
}

func (p *Proxier) OnServiceUpsert(svc *v1.Service) { p.changed(p.tracker.UpsertService(svc)) }
func (p *Proxier) OnServiceDelete(svc *v1.Service) { p.changed(p.tracker.DeleteService(svc)) }
func (p *Proxier) OnEndpointSliceUpsert(s *discoveryv1.EndpointSlice) {
	p.changed(p.tracker.UpsertEndpointSlice(s))
}
func (p *Proxier) OnEndpointSliceDelete(s *discoveryv1.EndpointSlice) {
	p.changed(p.tracker.DeleteEndpointSlice(s))
}

// OnSynced lets syncs begin: before both caches are complete, a sync could
// remove Services whose objects simply had not arrived yet.
func (p *Proxier) OnSynced() {
	klog.InfoS("Services and EndpointSlices synced, programming the datapath")
	p.synced.Store(true)
	close(p.syncedCh)
}

func (p *Proxier) changed(changed bool) {
	if !changed || !p.synced.Load() {
		return
	}
	p.health.QueuedUpdate()
	p.metrics.RecordQueued(time.Now())
	p.runner.Trigger()
}

// sync hands the datapath a snapshot: full the first time, after a failure,
// and once per SyncPeriod; otherwise only what changed.
func (p *Proxier) sync(ctx context.Context) error {
	start := time.Now()
	full := p.needFull || start.Sub(p.lastFull) >= p.cfg.SyncPeriod
	kind := metrics.SyncKindPartial
	if full {
		kind = metrics.SyncKindFull
	}
	snap := p.tracker.Snapshot(full)
	err := p.dp.Sync(ctx, snap)
	end := time.Now()
	p.metrics.RecordSync(kind, end.Sub(start), end, err)
	if c, ok := p.inner.(counter); ok {
		p.metrics.SetProgrammed(c.Counts())
	}
	if r, ok := p.inner.(ruleCounter); ok && err == nil {
		p.metrics.SetIptablesRules(r.RuleCounts())
	}
	if err != nil {
		// What changed is no longer in the tracker: only a full sync
		// brings it back.
		p.needFull = true
		return fmt.Errorf("%s sync: %w", kind, err)
	}
	p.needFull = false
	if full {
		p.lastFull = start
	}
	p.health.Updated()
	klog.V(2).InfoS("Synced datapath", "kind", kind, "services", len(snap.Services), "elapsed", end.Sub(start))
	return nil
}

// Run runs the proxy until ctx ends: the health and metrics servers, the
// informers, and, once they have synced, the sync runner. It returns early
// with an error if a server cannot listen or the informers cannot start.
func Run(ctx context.Context, client kubernetes.Interface, dp dataplane.Dataplane, cfg Config) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	reg := metrics.NewRegistry()
	m := metrics.New(reg)
	if src, ok := innermost(dp).(eventSource); ok {
		reg.MustRegister(metrics.NewDatapathEventsCollector(src.Events))
	}
	health := healthz.NewProxyHealth(2*cfg.SyncPeriod, nil)
	// Queued from the start: a proxy that never completes its first sync
	// turns unhealthy.
	health.QueuedUpdate()
	p := NewProxier(dp, m, health, cfg)

	errs := make(chan error, 4)
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
	spawn("healthz server", func() error { return healthz.ListenAndServe(ctx, cfg.HealthzBindAddress, health) })
	spawn("metrics server", func() error { return metrics.ListenAndServe(ctx, cfg.MetricsBindAddress, reg) })
	spawn("watch", func() error { return watch.Run(ctx, client, p, 0) })
	spawn("sync runner", func() error {
		select {
		case <-p.syncedCh:
			p.runner.Run(ctx)
		case <-ctx.Done():
		}
		return nil
	})

	var firstErr error
	for range running {
		if err := <-errs; err != nil && firstErr == nil {
			firstErr = err
			cancel() // one part failing stops the others
		}
	}
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
