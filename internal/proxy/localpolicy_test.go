package proxy

import (
	"net/netip"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/ptr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
)

func TestLocalPoliciesFollowPartialSnapshots(t *testing.T) {
	b := func(s string) model.Backend { return model.Backend{IP: netip.MustParseAddr(s), Port: 80} }
	web := model.ServiceName{Namespace: "ns", Name: "web"}
	lb := model.ServiceName{Namespace: "ns", Name: "lb"}
	itp := model.ServiceName{Namespace: "ns", Name: "itp"}
	lbPorts := func(local ...model.Backend) []model.ServicePort {
		ext := model.External{NodePort: 30080, PolicyLocal: true, HealthCheckNodePort: 31000}
		return []model.ServicePort{
			{Name: model.ServicePortName{ServiceName: lb, Port: "a"}, HasEndpoints: true, Local: local, External: ext},
			// Same pod on another port: one endpoint for the health check.
			{Name: model.ServicePortName{ServiceName: lb, Port: "b"}, HasEndpoints: true, Local: local, External: ext},
		}
	}
	m := make(localPolicies)
	m.apply(&model.Snapshot{Full: true, Services: map[model.ServiceName][]model.ServicePort{
		web: {{Name: model.ServicePortName{ServiceName: web}, HasEndpoints: true, Backends: []model.Backend{b("10.0.0.1")}}},
		lb:  lbPorts(b("10.0.0.2")),
		itp: {{Name: model.ServicePortName{ServiceName: itp}, HasEndpoints: true, InternalLocal: true}},
	}})
	if in, ex := m.totals(); in != 1 || ex != 0 {
		t.Errorf("totals %d %d, want 1 0", in, ex)
	}
	ports, local := m.healthChecks()
	if len(ports) != 1 || ports[lb] != 31000 || local[lb] != 1 {
		t.Errorf("health checks %v %v", ports, local)
	}
	// A partial snapshot: lb lost its local endpoint, itp is gone.
	m.apply(&model.Snapshot{Services: map[model.ServiceName][]model.ServicePort{lb: lbPorts(), itp: nil}})
	if in, ex := m.totals(); in != 0 || ex != 2 {
		t.Errorf("totals %d %d, want 0 2", in, ex)
	}
	if _, local := m.healthChecks(); local[lb] != 0 {
		t.Errorf("local endpoints %v", local)
	}
	// Terminating local endpoints are used but not counted as ready.
	ports2 := lbPorts(b("10.0.0.3"))
	ports2[0].LocalTerminating, ports2[1].LocalTerminating = true, true
	m.apply(&model.Snapshot{Services: map[model.ServiceName][]model.ServicePort{lb: ports2}})
	if _, local := m.healthChecks(); local[lb] != 0 {
		t.Errorf("terminating endpoints counted ready: %v", local)
	}
	m.apply(&model.Snapshot{Full: true})
	if len(m) != 0 {
		t.Errorf("full empty snapshot left %v", m)
	}
}

// As kube-proxy (its ServicePortMap.HealthCheckNodePorts): a LoadBalancer
// Service of externalTrafficPolicy Local gets its health check node port
// served even when none of its ports is reachable from outside yet (no
// node ports allocated, the load balancer's address not yet in its status,
// or given as a hostname only): the load balancer probes the node for it.
func TestHealthCheckNodePortWithoutExternalFrontends(t *testing.T) {
	svc := apitest.Service("ns", "lb", "10.96.0.9", apitest.Port("http", v1.ProtocolTCP, 80, 8080))
	svc.Spec.Type = v1.ServiceTypeLoadBalancer
	svc.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	svc.Spec.HealthCheckNodePort = 31000
	svc.Spec.AllocateLoadBalancerNodePorts = ptr.To(false)
	svc.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{Hostname: "lb.example.com"}}
	ep := apitest.Ready("10.244.1.1")
	ep.NodeName = ptr.To("node-a")
	sl := apitest.Slice("ns", "lb", "lb-1", []discoveryv1.EndpointPort{apitest.SlicePort("http", v1.ProtocolTCP, 8080)}, ep)
	tr := model.NewTracker(model.WithNodeName("node-a"))
	tr.UpsertService(svc)
	tr.UpsertEndpointSlice(sl)
	m := make(localPolicies)
	m.apply(tr.Snapshot(true))
	ports, local := m.healthChecks()
	name := model.ServiceName{Namespace: "ns", Name: "lb"}
	if ports[name] != 31000 || local[name] != 1 {
		t.Errorf("health checks %v, local endpoints %v; want port 31000 with 1 local endpoint", ports, local)
	}
	// Nothing external: no Local policy drops its traffic.
	if in, ex := m.totals(); in != 0 || ex != 0 {
		t.Errorf("ports without local endpoints %d %d, want 0 0", in, ex)
	}
}
