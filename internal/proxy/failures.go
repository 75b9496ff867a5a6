package proxy

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Event reasons and action on a Service whose port the datapath could not
// program, and on its recovery.
const (
	eventReasonNotProgrammed = "ServicePortNotProgrammed"
	eventReasonProgrammed    = "ServicePortProgrammed"
	eventAction              = "Programming"
)

// reasonOther labels a failure whose reason is not one of the datapath's
// constants, so that a label value never comes from anywhere else.
const reasonOther = "other"

// portFailureReasons are the label values of the service port failure
// metrics: the datapath's reasons, and reasonOther.
var portFailureReasons = append(slices.Clone(dataplane.Reasons), reasonOther)

func reasonLabel(reason string) string {
	if slices.Contains(portFailureReasons, reason) {
		return reason
	}
	return reasonOther
}

// maxEventsPerSync bounds the Warning Events one sync sends: a map that
// fills up may fail thousands of ports at once, on every node, and client-go
// drops Events past a queue of 1000 anyway. The others are announced by
// the following syncs (the retries), this many at a time; their log line
// and metrics are immediate.
const maxEventsPerSync = 25

// maxNoteLen keeps an Event's note under the API's 1 kB limit.
const maxNoteLen = 900

// portFailure is a service port the datapath could not program.
type portFailure struct {
	frontend model.Frontend
	reason   string // label value
	// message is the error as last reported; a Warning Event is sent again
	// when it changes.
	message string
	err     error
	// announced is set once a Warning Event carries message.
	announced bool
}

// failedPorts returns the service ports listed by a SyncError in err, if any.
func failedPorts(err error) []*dataplane.ServiceError {
	var se *dataplane.SyncError
	if errors.As(err, &se) {
		return se.Services
	}
	return nil
}

// failedServices lists the services with a port waiting for a retry.
func (p *Proxier) failedServices() []model.ServiceName {
	seen := make(map[model.ServiceName]struct{}, len(p.failures))
	for name := range p.failures {
		seen[name.ServiceName] = struct{}{}
	}
	return slices.Collect(maps.Keys(seen))
}

// recordPortResults brings the failed ports up to date after a sync of snap
// that reported errs. applied says whether everything else was applied:
// only then is a port of snap that is not in errs known to be programmed.
func (p *Proxier) recordPortResults(snap *model.Snapshot, errs []*dataplane.ServiceError, applied bool) {
	failedNow := make(map[model.ServicePortName]bool, len(errs))
	for _, e := range errs {
		failedNow[e.Service] = true
	}
	if applied {
		for name, f := range p.failures {
			if failedNow[name] {
				continue
			}
			ports, listed := snap.Services[name.ServiceName]
			if !listed && !snap.Full {
				continue // not attempted by this partial sync
			}
			delete(p.failures, name)
			if !slices.ContainsFunc(ports, func(sp model.ServicePort) bool { return sp.Name == name }) {
				klog.V(2).InfoS("Service port that failed to program is gone", "servicePort", name)
				continue
			}
			klog.InfoS("Service port programmed after failing", "servicePort", name, "frontend", f.frontend)
			if f.announced {
				p.events.Eventf(p.serviceRef(name.ServiceName), nil, v1.EventTypeNormal, eventReasonProgrammed, eventAction,
					"kube-bpf-proxy on node %s programmed %s after failing", p.cfg.NodeName, describePort(name, f.frontend))
			}
		}
	}
	for _, e := range errs {
		reason := reasonLabel(e.Reason)
		p.metrics.RecordServicePortFailure(reason)
		msg := e.Error()
		f := p.failures[e.Service]
		if f != nil && f.message == msg {
			klog.V(4).InfoS("Service port still not programmed", "servicePort", e.Service, "frontend", e.Frontend, "reason", e.Reason, "err", e.Err)
			continue
		}
		// First failure, or a different one: the flag to raise, if any,
		// is in the error.
		klog.ErrorS(e.Err, "Service port not programmed; it keeps its previous state and is retried",
			"servicePort", e.Service, "frontend", e.Frontend, "reason", e.Reason)
		p.failures[e.Service] = &portFailure{frontend: e.Frontend, reason: reason, message: msg, err: e.Err}
	}
	p.announceFailures()

	byReason := make(map[string]int, len(portFailureReasons))
	for _, r := range portFailureReasons {
		byReason[r] = 0
	}
	for _, f := range p.failures {
		byReason[f.reason]++
	}
	p.metrics.SetServicePortsNotProgrammed(byReason)
}

// announceFailures sends a Warning Event for each failed port whose current
// failure has not been announced yet, up to maxEventsPerSync.
func (p *Proxier) announceFailures() {
	var pending []model.ServicePortName
	for name, f := range p.failures {
		if !f.announced {
			pending = append(pending, name)
		}
	}
	if len(pending) == 0 {
		return
	}
	// In a stable order, so that a backlog drains oldest name first
	// rather than at random.
	slices.SortFunc(pending, func(a, b model.ServicePortName) int { return strings.Compare(a.String(), b.String()) })
	for i, name := range pending {
		if i == maxEventsPerSync {
			klog.V(2).InfoS("Event budget of this sync spent; the next syncs announce the other failed service ports", "pending", len(pending)-i)
			break
		}
		f := p.failures[name]
		f.announced = true
		msg := fmt.Sprint(f.err)
		if len(msg) > maxNoteLen {
			msg = msg[:maxNoteLen] + "..."
		}
		p.events.Eventf(p.serviceRef(name.ServiceName), nil, v1.EventTypeWarning, eventReasonNotProgrammed, eventAction,
			"kube-bpf-proxy on node %s could not program %s: %s; it keeps its previous state (absent if new) and is retried",
			p.cfg.NodeName, describePort(name, f.frontend), msg)
	}
}

// describePort names a service port for an Event on its Service.
func describePort(name model.ServicePortName, fe model.Frontend) string {
	if name.Port == "" {
		return "port " + fe.String()
	}
	return fmt.Sprintf("port %q (%s)", name.Port, fe)
}

// serviceRef points an Event at a Service.
func (p *Proxier) serviceRef(name model.ServiceName) *v1.ObjectReference {
	return &v1.ObjectReference{
		Kind:       "Service",
		APIVersion: "v1",
		Namespace:  name.Namespace,
		Name:       name.Name,
		UID:        p.uid(name),
	}
}

// retryState schedules the retry of failed service ports: after
// RetryPeriod, doubling at each retry that still leaves failures, up to
// SyncPeriod. Touched only from sync and, once the runner has returned,
// from Run.
type retryState struct {
	// at is when the retry is due; zero when none is scheduled.
	at    time.Time
	delay time.Duration
	timer clock.Timer
}

// due reports whether a retry is due at now.
func (r *retryState) due(now time.Time) bool {
	return !r.at.IsZero() && !now.Before(r.at)
}

func (r *retryState) stop() {
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
}

// scheduleRetry plans the next retry after a sync that ended at now.
// attempted says whether that sync retried the failed ports (a due retry or
// a full sync): only then does the delay double. A sync that failed a port
// for the first time schedules the first retry; other syncs leave the plan
// alone.
func (p *Proxier) scheduleRetry(now time.Time, attempted bool) {
	r := &p.retry
	if len(p.failures) == 0 {
		r.stop()
		*r = retryState{}
		return
	}
	switch {
	case r.delay == 0:
		r.delay = p.firstRetryDelay()
	case attempted:
		r.delay = min(2*r.delay, max(p.cfg.SyncPeriod, p.firstRetryDelay()))
	default:
		return
	}
	r.at = now.Add(r.delay)
	r.stop()
	// The periodic full sync retries too; this brings the first retries
	// forward without resyncing everything.
	r.timer = p.clock.AfterFunc(r.delay, p.runner.Trigger)
}

// firstRetryDelay is RetryPeriod, but never zero, which would retry in a
// tight loop.
func (p *Proxier) firstRetryDelay() time.Duration {
	if p.cfg.RetryPeriod > 0 {
		return p.cfg.RetryPeriod
	}
	return max(p.cfg.MinSyncPeriod, time.Second)
}

// noEvents is the recorder used when Config.Recorder is nil.
type noEvents struct{}

func (noEvents) Eventf(runtime.Object, runtime.Object, string, string, string, string, ...interface{}) {
}
