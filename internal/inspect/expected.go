package inspect

import (
	"context"
	"fmt"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/watch"
)

// endpointKey identifies an endpoint of a service port.
type endpointKey struct {
	port    model.ServicePortName
	backend model.Backend
}

// endpointState is what the EndpointSlices say of one endpoint.
type endpointState struct {
	ready, serving, terminating, local bool
}

func (s endpointState) String() string {
	switch {
	case s.ready:
		return "ready"
	case s.serving && s.terminating:
		return "terminating"
	case s.serving:
		return "serving"
	default:
		return "not-serving"
	}
}

// expected is what the API server says this node should serve now.
type expected struct {
	ports  []model.ServicePort
	states map[endpointKey]endpointState
}

// listExpected lists the Services and EndpointSlices the proxy watches (the
// same label selector) and computes, for each address family, the model
// the proxy's proxier of that family would sync for node, with the same
// conversion (model.Tracker with model.WithFamily). A family without
// service ports is absent.
func listExpected(ctx context.Context, client kubernetes.Interface, node string) (map[model.IPFamily]*expected, error) {
	sel := metav1.ListOptions{LabelSelector: watch.Selector().String()}
	svcs, err := client.CoreV1().Services(metav1.NamespaceAll).List(ctx, sel)
	if err != nil {
		return nil, fmt.Errorf("listing Services: %w", err)
	}
	eps, err := client.DiscoveryV1().EndpointSlices(metav1.NamespaceAll).List(ctx, sel)
	if err != nil {
		return nil, fmt.Errorf("listing EndpointSlices: %w", err)
	}
	// Topology hints need the node's zone; a Node that cannot be read
	// leaves hints unused, as the proxy does until it reads it.
	zone := ""
	if n, err := client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{}); err == nil {
		zone = n.Labels[v1.LabelTopologyZone]
	}
	out := map[model.IPFamily]*expected{}
	for _, f := range model.Families {
		tracker := model.NewTracker(model.WithNodeName(node), model.WithFamily(f))
		tracker.SetZone(zone)
		for i := range svcs.Items {
			tracker.UpsertService(&svcs.Items[i])
		}
		for i := range eps.Items {
			tracker.UpsertEndpointSlice(&eps.Items[i])
		}
		snap := tracker.Snapshot(true)
		e := &expected{states: endpointStates(eps.Items, node, f)}
		for _, ports := range snap.Services {
			e.ports = append(e.ports, ports...)
		}
		if len(e.ports) > 0 {
			out[f] = e
		}
	}
	return out, nil
}

// endpointStates reads the conditions of each endpoint of family f (the
// EndpointSlices of its address type), as the model reads them: unknown ready or serving is true, unknown terminating false; an
// endpoint in two slices has the union of their reasons to be used.
func endpointStates(slices []discoveryv1.EndpointSlice, node string, f model.IPFamily) map[endpointKey]endpointState {
	addrType := f.AddressType()
	out := map[endpointKey]endpointState{}
	for i := range slices {
		s := &slices[i]
		svc := s.Labels[discoveryv1.LabelServiceName]
		if svc == "" || s.AddressType != addrType {
			continue
		}
		for _, p := range s.Ports {
			if p.Port == nil {
				continue
			}
			name := ""
			if p.Name != nil {
				name = *p.Name
			}
			proto := model.TCP
			if p.Protocol != nil && *p.Protocol == v1.ProtocolUDP {
				proto = model.UDP
			} else if p.Protocol != nil && *p.Protocol != v1.ProtocolTCP {
				continue
			}
			spn := model.ServicePortName{ServiceName: model.ServiceName{Namespace: s.Namespace, Name: svc}, Port: name, Protocol: proto}
			for _, ep := range s.Endpoints {
				if len(ep.Addresses) == 0 {
					continue
				}
				ip, err := model.EndpointAddress(ep.Addresses[0], f)
				if err != nil {
					continue
				}
				k := endpointKey{spn, model.Backend{IP: ip, Port: uint16(*p.Port)}}
				c := ep.Conditions
				st := out[k]
				st.ready = st.ready || c.Ready == nil || *c.Ready
				st.serving = st.serving || c.Serving == nil || *c.Serving
				st.terminating = st.terminating || (c.Terminating != nil && *c.Terminating)
				st.local = st.local || (ep.NodeName != nil && *ep.NodeName == node)
				out[k] = st
			}
		}
	}
	return out
}

// expFrontend is a frontend the datapath should hold; optional ones may
// be there or not (an external IP the socket layer serves only when it is
// the node's own address).
type expFrontend struct {
	dpFrontend
	optional bool
}

// frontendsFor lists the frontends mode's datapath holds for p. The eBPF
// maps hold what the socket programs serve (see ebpf.socketFrontends):
// the ClusterIP; the node port on each node port address; external IPs
// that are the node's own; LoadBalancer IPs without source ranges; never
// a host-scoped address. Packets from outside the node meet the packet
// layer's iptables rules instead, which hold every external frontend (see
// packetDifferences), as the iptables mode's rules hold every frontend.
func frontendsFor(mode string, p *model.ServicePort) []expFrontend {
	proto := p.ClusterIP.Protocol
	port := p.ClusterIP.Port
	ext := &p.External
	out := []expFrontend{{dpFrontend: dpFrontend{kind: kindClusterIP, addr: p.ClusterIP.IP, port: port, proto: proto}}}
	if ext.NodePort != 0 {
		out = append(out, expFrontend{dpFrontend: dpFrontend{kind: kindNodePort, port: ext.NodePort, proto: proto}})
	}
	for _, ip := range ext.ExternalIPs {
		f := expFrontend{dpFrontend: dpFrontend{kind: kindExternalIP, addr: ip, port: port, proto: proto}}
		if mode == ModeEBPF {
			if model.HostScoped(ip) {
				continue
			}
			f.optional = true
		}
		out = append(out, f)
	}
	for _, ip := range ext.LoadBalancerIPs {
		if mode == ModeEBPF && (model.HostScoped(ip) || len(ext.SourceRanges) > 0) {
			continue
		}
		out = append(out, expFrontend{dpFrontend: dpFrontend{kind: kindLoadBalancerIP, addr: ip, port: port, proto: proto}})
	}
	return out
}

// listsFor is the backend lists mode's datapath holds for p, in the
// datapath port's vocabulary (see the list* constants).
func listsFor(mode string, p *model.ServicePort, dp *dpPort) map[string][]model.Backend {
	out := map[string][]model.Backend{}
	if mode == ModeEBPF {
		// See ebpf.groupsOf: the ClusterIP's connections go to the
		// internal policy's endpoints; those to external frontends
		// from sockets on the node to the Cluster endpoints, whatever
		// the external traffic policy. Each list is compared where the
		// datapath holds a frontend using it: a missing frontend is
		// reported as such, not again by its backends.
		if _, ok := dp.lists[listInternal]; ok {
			out[listInternal] = p.Backends
		}
		if _, ok := dp.lists[listExternal]; ok {
			cluster := p.Backends
			if p.InternalLocal {
				cluster = p.Cluster
			}
			out[listExternal] = cluster
		}
		return out
	}
	// As the iptables rules read the model (iptables.viewOf).
	cluster, local := p.Backends, p.Local
	if p.InternalLocal {
		cluster, local = p.Cluster, p.Backends
	}
	if len(cluster) > 0 {
		out[listCluster] = cluster
	}
	if len(local) > 0 {
		out[listLocal] = local
	}
	return out
}
