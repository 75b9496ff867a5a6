package model

import (
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
)

// featureCounter sums the deltas reported for each Feature, as a gauge does.
type featureCounter struct {
	mu    sync.Mutex
	count map[Feature]int
}

func newFeatureCounter() *featureCounter { return &featureCounter{count: map[Feature]int{}} }

func (c *featureCounter) report(f Feature, delta int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.count[f] += delta
	if c.count[f] == 0 {
		delete(c.count, f)
	}
}

func (c *featureCounter) check(t *testing.T, what string, want map[Feature]int) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if want == nil {
		want = map[Feature]int{}
	}
	if !maps.Equal(c.count, want) {
		t.Errorf("%s: services per feature %v, want %v", what, c.count, want)
	}
}

// captureLogs sends klog's output to a buffer for the rest of the test and
// returns a function listing the messages logged so far with their
// "features" value, for the lines about unserved features.
func captureLogs(t *testing.T) func() []string {
	t.Helper()
	logger := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.BufferLogs(true)))
	klog.SetLogger(logger)
	t.Cleanup(klog.ClearLogger)
	return func() []string {
		var out []string
		for _, e := range logger.GetSink().(ktesting.Underlier).GetBuffer().Data() {
			if !strings.Contains(e.Message, "not served yet") {
				continue
			}
			line := e.Message
			for i := 0; i+1 < len(e.ParameterKVList); i += 2 {
				if k, _ := e.ParameterKVList[i].(string); k == "service" || k == "features" {
					line += " " + k + "=" + klogValue(e.ParameterKVList[i+1])
				}
			}
			out = append(out, line)
		}
		return out
	}
}

func klogValue(v any) string {
	switch v := v.(type) {
	case []string:
		return "[" + strings.Join(v, " ") + "]"
	case klog.ObjectRef:
		return v.String()
	default:
		return "?"
	}
}

func TestUnservedFeatures(t *testing.T) {
	httpPort := svcPort("http", v1.ProtocolTCP, 80)
	withNodePort := func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeNodePort
		s.Spec.Ports[0].NodePort = 30080
	}
	withIngress := func(ip string, mode *v1.LoadBalancerIPMode) svcOpt {
		return func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeLoadBalancer
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: ip, IPMode: mode})
		}
	}
	withAnnotation := func(k, v string) svcOpt {
		return func(s *v1.Service) { s.Annotations = map[string]string{k: v} }
	}
	withSourceRanges := func(r ...string) svcOpt {
		return func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeLoadBalancer
			s.Spec.LoadBalancerSourceRanges = r
		}
	}

	tests := []struct {
		name string
		opts []svcOpt
		want []Feature
	}{
		{name: "plain ClusterIP"},
		{
			name: "sessionAffinity ClientIP",
			opts: []svcOpt{func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityClientIP }},
			want: []Feature{FeatureSessionAffinity},
		},
		{
			name: "sessionAffinity None",
			opts: []svcOpt{func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityNone }},
		},
		{
			name: "internalTrafficPolicy Local",
			opts: []svcOpt{func(s *v1.Service) { s.Spec.InternalTrafficPolicy = ptr(v1.ServiceInternalTrafficPolicyLocal) }},
			want: []Feature{FeatureInternalTrafficPolicyLocal},
		},
		{
			name: "internalTrafficPolicy Cluster",
			opts: []svcOpt{func(s *v1.Service) { s.Spec.InternalTrafficPolicy = ptr(v1.ServiceInternalTrafficPolicyCluster) }},
		},
		{
			name: "externalTrafficPolicy Local on a NodePort",
			opts: []svcOpt{withNodePort, func(s *v1.Service) { s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal }},
			want: []Feature{FeatureExternalTrafficPolicyLocal, FeatureNodePort},
		},
		{
			name: "type NodePort",
			opts: []svcOpt{withNodePort},
			want: []Feature{FeatureNodePort},
		},
		{
			name: "LoadBalancer without node ports or ingress yet",
			opts: []svcOpt{withType(v1.ServiceTypeLoadBalancer)},
		},
		{
			name: "LoadBalancer ingress IP",
			opts: []svcOpt{withIngress("192.0.2.10", nil)},
			want: []Feature{FeatureLoadBalancerIP},
		},
		{
			name: "LoadBalancer ingress IP of ipMode VIP",
			opts: []svcOpt{withIngress("192.0.2.10", ptr(v1.LoadBalancerIPModeVIP))},
			want: []Feature{FeatureLoadBalancerIP},
		},
		{
			name: "LoadBalancer ingress of ipMode Proxy or hostname only: nothing to serve on the node",
			opts: []svcOpt{withIngress("192.0.2.10", ptr(v1.LoadBalancerIPModeProxy)), withIngress("", nil)},
		},
		{
			name: "loadBalancerSourceRanges",
			opts: []svcOpt{withSourceRanges(" 192.0.2.0/24", "2001:db8::/32")},
			want: []Feature{FeatureLoadBalancerSourceRanges},
		},
		{
			name: "loadBalancerSourceRanges allowing every IPv4 source",
			opts: []svcOpt{withSourceRanges("192.0.2.0/24", "0.0.0.0/0")},
		},
		{
			name: "loadBalancerSourceRanges of IPv6 only",
			opts: []svcOpt{withSourceRanges("2001:db8::/32")},
		},
		{
			name: "externalIPs",
			opts: []svcOpt{func(s *v1.Service) { s.Spec.ExternalIPs = []string{"192.0.2.20"} }},
			want: []Feature{FeatureExternalIPs},
		},
		{
			name: "trafficDistribution",
			opts: []svcOpt{func(s *v1.Service) { s.Spec.TrafficDistribution = ptr(v1.ServiceTrafficDistributionPreferClose) }},
			want: []Feature{FeatureTrafficDistribution},
		},
		{
			name: "topology-mode Auto",
			opts: []svcOpt{withAnnotation(annotationTopologyMode, "Auto")},
			want: []Feature{FeatureTopologyAwareRouting},
		},
		{
			name: "topology-aware-hints auto (deprecated annotation)",
			opts: []svcOpt{withAnnotation(annotationTopologyAwareHints, "auto")},
			want: []Feature{FeatureTopologyAwareRouting},
		},
		{
			name: "topology-mode Disabled",
			opts: []svcOpt{withAnnotation(annotationTopologyMode, "Disabled")},
		},
		{
			name: "everything at once",
			opts: []svcOpt{
				withNodePort, withType(v1.ServiceTypeLoadBalancer), withIngress("192.0.2.10", nil), withSourceRanges("192.0.2.0/24"),
				withAnnotation(annotationTopologyMode, "Auto"),
				func(s *v1.Service) {
					s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
					s.Spec.InternalTrafficPolicy = ptr(v1.ServiceInternalTrafficPolicyLocal)
					s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
					s.Spec.ExternalIPs = []string{"192.0.2.20"}
					s.Spec.TrafficDistribution = ptr(v1.ServiceTrafficDistributionPreferSameZone)
				},
			},
			want: UnservedFeatures(),
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			logs := captureLogs(t)
			c := newFeatureCounter()
			tr := NewTracker(WithOnUnservedFeature(c.report))
			svc := newSvc("a", "10.0.0.1", append([]svcOpt{withPorts(httpPort)}, tc.opts...)...)
			tr.UpsertService(svc)

			want := map[Feature]int{}
			for _, f := range tc.want {
				want[f] = 1
			}
			c.check(t, "after upsert", want)

			var wantLogs []string
			if len(tc.want) > 0 {
				var names []string
				for _, f := range tc.want {
					names = append(names, string(f))
				}
				wantLogs = []string{"Service uses features that are not served yet; only its ClusterIP is served service=ns/a features=[" + strings.Join(names, " ") + "]"}
			}
			if got := logs(); !slices.Equal(got, wantLogs) {
				t.Errorf("logs:\n got %q\nwant %q", got, wantLogs)
			}

			tr.DeleteService(svc)
			c.check(t, "after delete", nil)
		})
	}
}

func TestUnservedFeaturesLifecycle(t *testing.T) {
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	affinity := func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityClientIP }
	externalIPs := func(s *v1.Service) { s.Spec.ExternalIPs = []string{"192.0.2.20"} }
	headless := func(s *v1.Service) {
		s.Spec.ClusterIP, s.Spec.ClusterIPs = v1.ClusterIPNone, []string{v1.ClusterIPNone}
	}
	newLog := func(svc string, features ...string) string {
		return "Service uses features that are not served yet; only its ClusterIP is served service=ns/" + svc + " features=[" + strings.Join(features, " ") + "]"
	}

	type step struct {
		desc     string
		do       func(*Tracker)
		want     map[Feature]int
		wantLogs []string // logged by this step
	}
	upsert := func(name string, opts ...svcOpt) func(*Tracker) {
		return func(tr *Tracker) { tr.UpsertService(newSvc(name, "10.0.0.1", append([]svcOpt{httpPort}, opts...)...)) }
	}
	steps := []step{
		{
			desc:     "a uses session affinity: logged at first sight",
			do:       upsert("a", affinity),
			want:     map[Feature]int{FeatureSessionAffinity: 1},
			wantLogs: []string{newLog("a", "session-affinity")},
		},
		{
			desc: "a updated, same features: not logged again",
			do:   upsert("a", affinity, func(s *v1.Service) { s.Labels = map[string]string{"v": "2"} }),
			want: map[Feature]int{FeatureSessionAffinity: 1},
		},
		{
			desc:     "b uses session affinity too",
			do:       upsert("b", affinity),
			want:     map[Feature]int{FeatureSessionAffinity: 2},
			wantLogs: []string{newLog("b", "session-affinity")},
		},
		{
			desc:     "a adds external IPs: logged again, naming both",
			do:       upsert("a", affinity, externalIPs),
			want:     map[Feature]int{FeatureSessionAffinity: 2, FeatureExternalIPs: 1},
			wantLogs: []string{newLog("a", "session-affinity", "external-ips")},
		},
		{
			desc: "a stops using session affinity: the gauge goes down, nothing logged",
			do:   upsert("a", externalIPs),
			want: map[Feature]int{FeatureSessionAffinity: 1, FeatureExternalIPs: 1},
		},
		{
			desc: "a stops using anything",
			do:   upsert("a"),
			want: map[Feature]int{FeatureSessionAffinity: 1},
		},
		{
			desc: "b made headless: no longer served, no longer counted",
			do:   upsert("b", affinity, headless),
			want: nil,
		},
		{
			desc:     "b served again: a new first sight",
			do:       upsert("b", affinity),
			want:     map[Feature]int{FeatureSessionAffinity: 1},
			wantLogs: []string{newLog("b", "session-affinity")},
		},
		{
			desc: "b deleted",
			do:   func(tr *Tracker) { tr.DeleteService(newSvc("b", "10.0.0.1")) },
			want: nil,
		},
		{
			desc: "deleting an unknown Service changes nothing",
			do:   func(tr *Tracker) { tr.DeleteService(newSvc("c", "10.0.0.1")) },
			want: nil,
		},
	}

	logs := captureLogs(t)
	c := newFeatureCounter()
	tr := NewTracker(WithOnUnservedFeature(c.report))
	seen := 0
	for _, s := range steps {
		s.do(tr)
		c.check(t, s.desc, s.want)
		all := logs()
		if got := all[seen:]; !slices.Equal(got, s.wantLogs) {
			t.Errorf("%s: logged\n %q\nwant\n %q", s.desc, got, s.wantLogs)
		}
		seen = len(all)
	}
}

func TestTrackerRequeue(t *testing.T) {
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	tr := NewTracker()
	tr.UpsertService(newSvc("a", "10.0.0.1", httpPort))
	tr.UpsertService(newSvc("b", "10.0.0.2", httpPort))
	tr.Snapshot(true)

	aPorts := []ServicePort{sp("a", "http", TCP, "10.0.0.1:80")}
	bPorts := []ServicePort{sp("b", "http", TCP, "10.0.0.2:80")}

	// A requeued service is listed although nothing changed, next to a
	// changed one; a requeued service that is gone is listed as nil.
	tr.Requeue(svcName("a"), svcName("gone"))
	tr.UpsertService(newSvc("b", "10.0.0.2", httpPort, withPorts(svcPort("dns", v1.ProtocolUDP, 53))))
	checkServices(t, "partial after Requeue", tr.Snapshot(false).Services, services{
		svcName("a"):    aPorts,
		svcName("gone"): nil,
		svcName("b"):    {sp("b", "dns", UDP, "10.0.0.2:53"), bPorts[0]},
	})
	checkServices(t, "the next partial", tr.Snapshot(false).Services, services{})

	// A change reverted before the snapshot still leaves a requeued
	// service listed: the datapath may hold neither version.
	tr.Requeue(svcName("a"))
	tr.UpsertService(newSvc("a", "10.0.0.9", httpPort))
	tr.UpsertService(newSvc("a", "10.0.0.1", httpPort))
	checkServices(t, "requeued and reverted", tr.Snapshot(false).Services, services{svcName("a"): aPorts})

	// A full snapshot serves the request.
	tr.Requeue(svcName("a"))
	tr.Snapshot(true)
	checkServices(t, "partial after a full", tr.Snapshot(false).Services, services{})
}
