package healthcheck

import (
	"maps"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

const thisNode = "node-1"

// on places an endpoint on a node.
func on(node string, ep discoveryv1.Endpoint) discoveryv1.Endpoint {
	ep.NodeName = &node
	return ep
}

func notReady(addr string) discoveryv1.Endpoint {
	f := false
	return discoveryv1.Endpoint{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: &f, Serving: &f, Terminating: &f}}
}

// service is a two-port Service (http 80, https 443) of the given type and
// external policy, with node ports and health check node port 32000
// written as the API server allocates them.
func service(name string, typ v1.ServiceType, policy v1.ServiceExternalTrafficPolicy) *v1.Service {
	svc := apitest.Service("ns", name, "10.96.0.10",
		apitest.Port("http", v1.ProtocolTCP, 80, 8080), apitest.Port("https", v1.ProtocolTCP, 443, 8443))
	svc.Spec.Type = typ
	svc.Spec.ExternalTrafficPolicy = policy
	svc.Spec.Ports[0].NodePort, svc.Spec.Ports[1].NodePort = 30080, 30443
	if typ == v1.ServiceTypeLoadBalancer && policy == v1.ServiceExternalTrafficPolicyLocal {
		svc.Spec.HealthCheckNodePort = 32000
	}
	return svc
}

// TestFromSnapshot runs Services and slices through the model's tracker
// and checks the ports and counts against kube-proxy's HealthCheckNodePorts
// and LocalReadyEndpoints.
func TestFromSnapshot(t *testing.T) {
	httpPort := []discoveryv1.EndpointPort{apitest.SlicePort("http", v1.ProtocolTCP, 8080)}
	httpsPort := []discoveryv1.EndpointPort{apitest.SlicePort("https", v1.ProtocolTCP, 8443)}
	bothPorts := append(append([]discoveryv1.EndpointPort{}, httpPort...), httpsPort...)
	tests := []struct {
		name      string
		svc       *v1.Service
		slices    [][]discoveryv1.Endpoint // each with both ports
		split     bool                     // one slice per port instead, same endpoints
		wantPort  uint16
		wantCount int
	}{
		{
			name: "LoadBalancer Local: distinct local ready IPs over both ports",
			svc:  service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal),
			slices: [][]discoveryv1.Endpoint{{
				on(thisNode, apitest.Ready("10.244.0.1")), on(thisNode, apitest.Ready("10.244.0.2")),
				on("node-2", apitest.Ready("10.244.1.1")),
			}},
			wantPort: 32000, wantCount: 2,
		},
		{
			name: "endpoints in a slice per port count once",
			svc:  service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal),
			slices: [][]discoveryv1.Endpoint{{
				on(thisNode, apitest.Ready("10.244.0.1")), on(thisNode, apitest.Ready("10.244.0.2")),
				on(thisNode, apitest.Ready("10.244.0.3")),
			}},
			split:    true,
			wantPort: 32000, wantCount: 3,
		},
		{
			name:     "no endpoint on this node",
			svc:      service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal),
			slices:   [][]discoveryv1.Endpoint{{on("node-2", apitest.Ready("10.244.1.1"))}},
			wantPort: 32000, wantCount: 0,
		},
		{
			name:     "no endpoints at all",
			svc:      service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal),
			wantPort: 32000, wantCount: 0,
		},
		{
			name: "a terminating local endpoint beside a ready one is not counted",
			svc:  service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal),
			slices: [][]discoveryv1.Endpoint{{
				on(thisNode, apitest.Ready("10.244.0.1")), on(thisNode, apitest.Terminating("10.244.0.2")),
			}},
			wantPort: 32000, wantCount: 1,
		},
		{
			name:     "a local endpoint neither ready nor serving is not counted",
			svc:      service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal),
			slices:   [][]discoveryv1.Endpoint{{on(thisNode, notReady("10.244.0.1")), on("node-2", apitest.Ready("10.244.1.1"))}},
			wantPort: 32000, wantCount: 0,
		},
		{
			// kube-proxy counts 0 here (ready endpoints only) and
			// answers 503; the model does not tell its terminating
			// fallback from ready endpoints (see FromSnapshot).
			name:     "only terminating local endpoints: counted, unlike kube-proxy",
			svc:      service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal),
			slices:   [][]discoveryv1.Endpoint{{on(thisNode, apitest.Terminating("10.244.0.1")), on("node-2", apitest.Ready("10.244.1.1"))}},
			wantPort: 32000, wantCount: 1,
		},
		{
			// kube-proxy serves the port of every LoadBalancer
			// Service with policy Local (NeedsHealthCheck); the model
			// clears the external part of a port with no node port, no
			// external IP and no VIP ingress, health check port
			// included.
			name: "LoadBalancer Local without node ports or ingress yet: none, unlike kube-proxy",
			svc: func() *v1.Service {
				s := service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyLocal)
				s.Spec.Ports[0].NodePort, s.Spec.Ports[1].NodePort = 0, 0
				return s
			}(),
			slices: [][]discoveryv1.Endpoint{{on(thisNode, apitest.Ready("10.244.0.1"))}},
		},
		{
			name:   "LoadBalancer Cluster has no health check port",
			svc:    service("lb", v1.ServiceTypeLoadBalancer, v1.ServiceExternalTrafficPolicyCluster),
			slices: [][]discoveryv1.Endpoint{{on(thisNode, apitest.Ready("10.244.0.1"))}},
		},
		{
			name: "NodePort Local has none, whatever the spec says",
			svc: func() *v1.Service {
				s := service("np", v1.ServiceTypeNodePort, v1.ServiceExternalTrafficPolicyLocal)
				s.Spec.HealthCheckNodePort = 32001
				return s
			}(),
			slices: [][]discoveryv1.Endpoint{{on(thisNode, apitest.Ready("10.244.0.1"))}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := model.NewTracker(model.WithNodeName(thisNode))
			tr.UpsertService(tc.svc)
			for i, eps := range tc.slices {
				name := tc.svc.Name + "-" + string(rune('a'+i))
				if tc.split {
					tr.UpsertEndpointSlice(apitest.Slice("ns", tc.svc.Name, name+"-http", httpPort, eps...))
					tr.UpsertEndpointSlice(apitest.Slice("ns", tc.svc.Name, name+"-https", httpsPort, eps...))
				} else {
					tr.UpsertEndpointSlice(apitest.Slice("ns", tc.svc.Name, name, bothPorts, eps...))
				}
			}
			ports, local := FromSnapshot(tr.Snapshot(true).Services)
			name := model.ServiceName{Namespace: "ns", Name: tc.svc.Name}
			wantPorts := map[model.ServiceName]uint16{}
			if tc.wantPort != 0 {
				wantPorts[name] = tc.wantPort
			}
			if !maps.Equal(ports, wantPorts) {
				t.Errorf("ports %v, want %v", ports, wantPorts)
			}
			wantLocal := map[model.ServiceName]int{}
			if tc.wantCount != 0 {
				wantLocal[name] = tc.wantCount
			}
			if !maps.Equal(local, wantLocal) {
				t.Errorf("local %v, want %v", local, wantLocal)
			}
		})
	}
}
