package model

import (
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

func withVersion(rv string) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.ResourceVersion = rv }
}

func withTrigger(at string) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) {
		s.Annotations = map[string]string{v1.EndpointsLastChangeTriggerTime: at}
	}
}

func checkCounts(t *testing.T, tr *Tracker, want ChangeCounts) {
	t.Helper()
	if got := tr.ChangeCounts(); got != want {
		t.Errorf("ChangeCounts() = %+v, want %+v", got, want)
	}
}

// The change counters follow kube-proxy's: every event counts in the total,
// pending counts Services whose served spec differs from the last snapshot
// and EndpointSlice events that changed a slice, and a snapshot resets both
// pending counts.
func TestChangeCounts(t *testing.T) {
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	sp := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))
	tr := NewTracker()
	checkCounts(t, tr, ChangeCounts{})

	// Services: a new one is pending; a metadata-only update counts in the
	// total only; a change reverted before the snapshot drops out.
	tr.UpsertService(newSvc("a", "10.0.0.1", httpPort))
	tr.UpsertService(newSvc("a", "10.0.0.1", httpPort, func(s *v1.Service) { s.Labels = map[string]string{"x": "y"} }))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 2, PendingServices: 1})
	tr.Snapshot(false)
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 2})
	tr.UpsertService(newSvc("a", "10.0.0.9", httpPort))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 3, PendingServices: 1})
	tr.UpsertService(newSvc("a", "10.0.0.1", httpPort))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 4})
	// A Service the proxy does not serve counts in the total, as in
	// kube-proxy, which counts every Service event.
	tr.UpsertService(newSvc("h", v1.ClusterIPNone, httpPort))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 5})
	tr.DeleteService(newSvc("a", "10.0.0.1", httpPort))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 6, PendingServices: 1})
	tr.Snapshot(true)
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 6})

	// EndpointSlices: one pending change per event that changed a slice,
	// none for a resync (same resourceVersion).
	tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(readyEP("10.1.0.1")), withVersion("1")))
	tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(readyEP("10.1.0.1")), withVersion("1")))
	tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(readyEP("10.1.0.2")), withVersion("2")))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 6, EndpointChanges: 3, PendingEndpointChanges: 2})
	tr.Snapshot(false)
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 6, EndpointChanges: 3})
	tr.DeleteEndpointSlice(newSlice("a-1", "a", withVersion("2")))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 6, EndpointChanges: 4, PendingEndpointChanges: 1})
	// Deleting it again (a repeated event) is no change; slices kube-proxy
	// ignores (IPv6, or no service-name label) count nowhere.
	tr.DeleteEndpointSlice(newSlice("a-1", "a", withVersion("2")))
	tr.UpsertEndpointSlice(newSlice("a-6", "a", withAddressType(discoveryv1.AddressTypeIPv6)))
	tr.UpsertEndpointSlice(newSlice("orphan", ""))
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 6, EndpointChanges: 5, PendingEndpointChanges: 1})
	tr.Snapshot(true)
	checkCounts(t, tr, ChangeCounts{ServiceChanges: 6, EndpointChanges: 5})
}

// Snapshots carry the trigger times of the EndpointSlice changes they are
// the first to include, only those after the Tracker started and that
// change what is served, and a deleted slice drops its Service's times
// (its annotation dates from an earlier update).
func TestTriggerTimes(t *testing.T) {
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	at := func(d time.Duration) string { return start.Add(d).Format(time.RFC3339Nano) }
	tr := NewTracker(WithStartTime(start))
	tr.UpsertService(newSvc("a", "10.0.0.1", withPorts(svcPort("http", v1.ProtocolTCP, 80))))
	tr.UpsertService(newSvc("b", "10.0.0.2", withPorts(svcPort("http", v1.ProtocolTCP, 80))))
	sp := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))

	tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(readyEP("10.1.0.1")), withVersion("1"), withTrigger(at(-time.Second))))
	tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(readyEP("10.1.0.2")), withVersion("2"), withTrigger(at(time.Second))))
	// A resync of the same version, a malformed annotation: nothing.
	tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(readyEP("10.1.0.2")), withVersion("2"), withTrigger(at(time.Second))))
	tr.UpsertEndpointSlice(newSlice("a-2", "a", sp, withEndpoints(readyEP("10.1.0.3")), withVersion("3"), withTrigger("yesterday")))
	tr.UpsertEndpointSlice(newSlice("b-1", "b", sp, withEndpoints(readyEP("10.2.0.1")), withVersion("4"), withTrigger(at(2*time.Second))))
	tr.UpsertEndpointSlice(newSlice("b-1", "b", sp, withEndpoints(readyEP("10.2.0.2")), withVersion("5"), withTrigger(at(3*time.Second))))

	snap := tr.Snapshot(false)
	want := map[ServiceName][]time.Time{
		svcName("a"): {start.Add(time.Second)},
		svcName("b"): {start.Add(2 * time.Second), start.Add(3 * time.Second)},
	}
	if !reflect.DeepEqual(snap.TriggerTimes, want) {
		t.Errorf("first snapshot's TriggerTimes = %v, want %v", snap.TriggerTimes, want)
	}
	if got := tr.Snapshot(false).TriggerTimes; got != nil {
		t.Errorf("second snapshot's TriggerTimes = %v, want none: the first took them", got)
	}

	// An update that changes nothing served (a new version, the same
	// endpoints) triggers no sync: its wait is not programming latency.
	tr.UpsertEndpointSlice(newSlice("b-1", "b", sp, withEndpoints(readyEP("10.2.0.2")), withVersion("5a"), withTrigger(at(6*time.Second))))
	tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(readyEP("10.1.0.4")), withVersion("6"), withTrigger(at(4*time.Second))))
	tr.UpsertEndpointSlice(newSlice("b-1", "b", sp, withEndpoints(readyEP("10.2.0.3")), withVersion("7"), withTrigger(at(5*time.Second))))
	tr.DeleteEndpointSlice(newSlice("a-1", "a", withVersion("6")))
	want = map[ServiceName][]time.Time{svcName("b"): {start.Add(5 * time.Second)}}
	if got := tr.Snapshot(true).TriggerTimes; !reflect.DeepEqual(got, want) {
		t.Errorf("TriggerTimes after a delete = %v, want %v", got, want)
	}
}

// An EndpointSlice may arrive before its Service (they come from separate
// informers). Its change is programmed by the sync that programs the
// Service's arrival, so that snapshot, and no earlier one, carries its
// trigger time; the rule that a change altering nothing served carries
// none still holds, and a Service known but not served keeps nothing.
func TestTriggerTimesSliceBeforeService(t *testing.T) {
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	at := func(s int) time.Time { return start.Add(time.Duration(s) * time.Second) }
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	sp := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))
	upsert := func(tr *Tracker, rv string, trigger int, eps ...discoveryv1.Endpoint) {
		tr.UpsertEndpointSlice(newSlice("a-1", "a", sp, withEndpoints(eps...), withVersion(rv), withTrigger(at(trigger).Format(time.RFC3339Nano))))
	}
	named := func(h string, ep discoveryv1.Endpoint) discoveryv1.Endpoint {
		ep.Hostname = &h
		return ep
	}
	tests := []struct {
		name string
		// before runs before the Service "a" is added as served.
		before func(tr *Tracker)
		// want is the trigger times of the snapshot after "a" is added.
		want []time.Time
	}{{
		name:   "one change",
		before: func(tr *Tracker) { upsert(tr, "1", 1, readyEP("10.1.0.1")) },
		want:   []time.Time{at(1)},
	}, {
		name: "two changes",
		before: func(tr *Tracker) {
			upsert(tr, "1", 1, readyEP("10.1.0.1"))
			upsert(tr, "2", 2, readyEP("10.1.0.2"))
		},
		want: []time.Time{at(1), at(2)},
	}, {
		name: "a resync and a change of nothing served add nothing",
		before: func(tr *Tracker) {
			upsert(tr, "1", 1, readyEP("10.1.0.1"))
			upsert(tr, "1", 1, readyEP("10.1.0.1"))
			upsert(tr, "2", 2, named("pod-1", readyEP("10.1.0.1")))
		},
		want: []time.Time{at(1)},
	}, {
		name: "the slice was deleted meanwhile",
		before: func(tr *Tracker) {
			upsert(tr, "1", 1, readyEP("10.1.0.1"))
			tr.DeleteEndpointSlice(newSlice("a-1", "a", withVersion("1")))
		},
	}, {
		name: "a Service of that name was deleted meanwhile",
		before: func(tr *Tracker) {
			upsert(tr, "1", 1, readyEP("10.1.0.1"))
			tr.DeleteService(newSvc("a", "10.0.0.1", httpPort))
		},
	}, {
		name: "it arrived unserved first",
		before: func(tr *Tracker) {
			upsert(tr, "1", 1, readyEP("10.1.0.1"))
			tr.UpsertService(newSvc("a", "", withType(v1.ServiceTypeExternalName)))
			upsert(tr, "2", 2, readyEP("10.1.0.2"))
		},
	}, {
		name: "at most maxAwaitingTriggers",
		before: func(tr *Tracker) {
			for i := range maxAwaitingTriggers + 3 {
				upsert(tr, fmt.Sprint(i), 1, readyEP(fmt.Sprintf("10.1.0.%d", i)))
			}
		},
		want: slices.Repeat([]time.Time{at(1)}, maxAwaitingTriggers),
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := NewTracker(WithStartTime(start))
			tc.before(tr)
			// A sync for another reason before the Service arrives
			// programs nothing of it.
			tr.UpsertService(newSvc("b", "10.0.0.2", httpPort))
			if got := tr.Snapshot(false).TriggerTimes; got != nil {
				t.Errorf("TriggerTimes before the Service arrived = %v, want none", got)
			}
			if !tr.UpsertService(newSvc("a", "10.0.0.1", httpPort)) {
				t.Fatal("adding the Service changed nothing")
			}
			var want map[ServiceName][]time.Time
			if tc.want != nil {
				want = map[ServiceName][]time.Time{svcName("a"): tc.want}
			}
			if got := tr.Snapshot(false).TriggerTimes; !reflect.DeepEqual(got, want) {
				t.Errorf("TriggerTimes when the Service arrived = %v, want %v", got, want)
			}
			// Once known, the old rule: a change of nothing served
			// carries no time, a change of endpoints does.
			upsert(tr, "x", 10, named("pod-9", readyEP("10.1.0.9")))
			tr.Snapshot(false)
			upsert(tr, "y", 11, named("pod-8", readyEP("10.1.0.9")))
			if got := tr.Snapshot(false).TriggerTimes; got != nil {
				t.Errorf("TriggerTimes after a change of nothing served = %v, want none", got)
			}
		})
	}
}

// A headless Service's slices (common: every StatefulSet has one) keep no
// trigger times, neither for a snapshot nor waiting for a Service that is
// already there.
func TestTriggerTimesUnservedService(t *testing.T) {
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tr := NewTracker(WithStartTime(start))
	tr.UpsertService(newSvc("h", v1.ClusterIPNone, withPorts(svcPort("http", v1.ProtocolTCP, 80))))
	sp := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))
	for i := range 3 {
		tr.UpsertEndpointSlice(newSlice("h-1", "h", sp, withEndpoints(readyEP(fmt.Sprintf("10.1.0.%d", i))),
			withVersion(fmt.Sprint(i)), withTrigger(start.Add(time.Second).Format(time.RFC3339Nano))))
	}
	if got := tr.Snapshot(false).TriggerTimes; got != nil {
		t.Errorf("TriggerTimes = %v, want none", got)
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.awaiting) != 0 {
		t.Errorf("awaiting = %v, want empty: the Service is known", tr.awaiting)
	}
}

// Every part of a Service the model keeps is its served spec, as every field
// of kube-proxy's service port info is: a change to any one of them makes
// the Service pending, reverting it drops it, and a change to anything else
// (labels, trafficDistribution, whose hints come with the EndpointSlices)
// does not count.
func TestChangeCountsServedSpec(t *testing.T) {
	base := func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.Ports = []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 30080}}
		s.Spec.ExternalIPs = []string{"192.0.2.20"}
		s.Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/24"}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "203.0.113.10"}}
	}
	tests := []struct {
		name    string
		change  svcOpt
		pending bool
	}{
		{name: "port", change: func(s *v1.Service) { s.Spec.Ports[0].Port = 81 }, pending: true},
		{name: "node port", change: func(s *v1.Service) { s.Spec.Ports[0].NodePort = 30081 }, pending: true},
		{name: "session affinity", change: func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityClientIP }, pending: true},
		{name: "affinity timeout", change: func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr(int32(60))}}
		}, pending: true},
		{name: "internalTrafficPolicy Local", change: func(s *v1.Service) {
			s.Spec.InternalTrafficPolicy = ptr(v1.ServiceInternalTrafficPolicyLocal)
		}, pending: true},
		{name: "externalTrafficPolicy Local", change: func(s *v1.Service) {
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
			s.Spec.HealthCheckNodePort = 31000
		}, pending: true},
		{name: "externalIPs", change: func(s *v1.Service) { s.Spec.ExternalIPs = append(s.Spec.ExternalIPs, "192.0.2.21") }, pending: true},
		{name: "load balancer IP", change: func(s *v1.Service) { s.Status.LoadBalancer.Ingress[0].IP = "203.0.113.11" }, pending: true},
		{name: "source ranges", change: func(s *v1.Service) { s.Spec.LoadBalancerSourceRanges = nil }, pending: true},
		{name: "labels", change: func(s *v1.Service) { s.Labels = map[string]string{"v": "2"} }},
		{name: "trafficDistribution", change: func(s *v1.Service) {
			s.Spec.TrafficDistribution = ptr(v1.ServiceTrafficDistributionPreferClose)
		}},
		{name: "an ingress of ipMode Proxy", change: func(s *v1.Service) {
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: "203.0.113.12", IPMode: ptr(v1.LoadBalancerIPModeProxy)})
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := NewTracker()
			tr.UpsertService(newSvc("a", "10.0.0.1", base))
			tr.Snapshot(true)
			tr.UpsertService(newSvc("a", "10.0.0.1", base, tc.change))
			want := ChangeCounts{ServiceChanges: 2}
			if tc.pending {
				want.PendingServices = 1
			}
			checkCounts(t, tr, want)
			tr.UpsertService(newSvc("a", "10.0.0.1", base))
			checkCounts(t, tr, ChangeCounts{ServiceChanges: 3})
		})
	}
}
