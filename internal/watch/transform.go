package watch

import (
	"unique"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Transform is the informers' cache.TransformFunc: each Service and
// EndpointSlice enters the cache in a compact form of our own (compact.go)
// holding only what the handlers read, so that the caches of a large
// cluster keep neither managedFields, selectors, target references and the
// rest, nor the API structs' many empty fields. The event handlers hand
// each event's object on as the trimmed API object that slimService or
// slimSlice makes from the original.
//
// What the trimmed object keeps (the model's conversion, internal/model service.go and
// endpoints.go, and the Proxier are the readers; a new field read there must
// be added here, and TestTransformKeepsWhatTheModelReads fails until it is):
//
//   - metadata: name, namespace, UID (the Proxier's events), resourceVersion
//     (the informer's and the tracker's change detection), the labels
//     Selector and the tracker read (service-proxy-name, headless,
//     kubernetes.io/service-name) and the EndpointSlice annotation
//     endpoints.kubernetes.io/last-change-trigger-time;
//   - Service: type, ClusterIP(s), ports (name, protocol, port, node port),
//     external IPs, source ranges, traffic policies, health check node port,
//     session affinity and its timeout, and the load balancer ingress IPs
//     with their ipMode;
//   - EndpointSlice: address type, ports (name, protocol, port), and each
//     endpoint's first address (the one consumers use), conditions, node
//     name and hints.
//
// Strings repeated across objects (namespaces, port names, node names,
// hint zones) are interned, and the condition and protocol pointers point
// at shared values: the copies are read-only, like every cached object.
// Anything else, the compact forms included, passes through unchanged:
// Transform is idempotent, as client-go asks.
func Transform(obj any) (any, error) {
	switch o := obj.(type) {
	case *v1.Service:
		if o != nil {
			return compactService(o), nil
		}
	case *discoveryv1.EndpointSlice:
		if o != nil {
			return compactSlice(o), nil
		}
	}
	return obj, nil
}

// keptLabels are the labels anything here reads: Selector's and
// foreignSelector's keys and the slices' Service name.
var keptLabels = []string{LabelServiceProxyName, v1.IsHeadlessService, discoveryv1.LabelServiceName}

func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

func slimMeta(m *metav1.ObjectMeta, annotation string) metav1.ObjectMeta {
	out := metav1.ObjectMeta{
		Name:            m.Name,
		Namespace:       intern(m.Namespace),
		UID:             m.UID,
		ResourceVersion: m.ResourceVersion,
	}
	for _, k := range keptLabels {
		if v, ok := m.Labels[k]; ok {
			if out.Labels == nil {
				out.Labels = make(map[string]string, 1)
			}
			out.Labels[k] = v
		}
	}
	if v, ok := m.Annotations[annotation]; ok && annotation != "" {
		out.Annotations = map[string]string{annotation: v}
	}
	return out
}

func slimService(s *v1.Service) *v1.Service {
	if s == nil {
		return nil
	}
	out := &v1.Service{
		ObjectMeta: slimMeta(&s.ObjectMeta, ""),
		Spec: v1.ServiceSpec{
			Type:                     s.Spec.Type,
			ClusterIP:                s.Spec.ClusterIP,
			ExternalIPs:              s.Spec.ExternalIPs,
			LoadBalancerSourceRanges: s.Spec.LoadBalancerSourceRanges,
			ExternalTrafficPolicy:    s.Spec.ExternalTrafficPolicy,
			HealthCheckNodePort:      s.Spec.HealthCheckNodePort,
			InternalTrafficPolicy:    s.Spec.InternalTrafficPolicy,
			SessionAffinity:          s.Spec.SessionAffinity,
			SessionAffinityConfig:    s.Spec.SessionAffinityConfig,
		},
	}
	// ClusterIPs almost always repeats ClusterIP: share its string.
	if len(s.Spec.ClusterIPs) == 1 && s.Spec.ClusterIPs[0] == s.Spec.ClusterIP {
		out.Spec.ClusterIPs = []string{out.Spec.ClusterIP}
	} else {
		out.Spec.ClusterIPs = s.Spec.ClusterIPs
	}
	if len(s.Spec.Ports) > 0 {
		out.Spec.Ports = make([]v1.ServicePort, len(s.Spec.Ports))
		for i, p := range s.Spec.Ports {
			out.Spec.Ports[i] = v1.ServicePort{Name: intern(p.Name), Protocol: p.Protocol, Port: p.Port, NodePort: p.NodePort}
		}
	}
	if ing := s.Status.LoadBalancer.Ingress; len(ing) > 0 {
		out.Status.LoadBalancer.Ingress = make([]v1.LoadBalancerIngress, len(ing))
		for i, in := range ing {
			out.Status.LoadBalancer.Ingress[i] = v1.LoadBalancerIngress{IP: in.IP, IPMode: in.IPMode}
		}
	}
	return out
}

// Shared targets of the slices' pointer fields.
var (
	sharedTrue, sharedFalse          = true, false
	sharedTCP, sharedUDP, sharedSCTP = v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP
)

func sharedBool(b *bool) *bool {
	switch {
	case b == nil:
		return nil
	case *b:
		return &sharedTrue
	default:
		return &sharedFalse
	}
}

func sharedProtocol(p *v1.Protocol) *v1.Protocol {
	if p == nil {
		return nil
	}
	switch *p {
	case v1.ProtocolTCP:
		return &sharedTCP
	case v1.ProtocolUDP:
		return &sharedUDP
	case v1.ProtocolSCTP:
		return &sharedSCTP
	}
	c := *p
	return &c
}

func internPtr(s *string) *string {
	if s == nil {
		return nil
	}
	v := intern(*s)
	return &v
}

func slimSlice(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	if s == nil {
		return nil
	}
	out := &discoveryv1.EndpointSlice{
		ObjectMeta:  slimMeta(&s.ObjectMeta, v1.EndpointsLastChangeTriggerTime),
		AddressType: s.AddressType,
	}
	if len(s.Ports) > 0 {
		out.Ports = make([]discoveryv1.EndpointPort, len(s.Ports))
		for i, p := range s.Ports {
			out.Ports[i] = discoveryv1.EndpointPort{Name: internPtr(p.Name), Protocol: sharedProtocol(p.Protocol), Port: p.Port}
		}
	}
	if len(s.Endpoints) > 0 {
		out.Endpoints = make([]discoveryv1.Endpoint, len(s.Endpoints))
		for i := range s.Endpoints {
			ep := &s.Endpoints[i]
			e := discoveryv1.Endpoint{
				Conditions: discoveryv1.EndpointConditions{
					Ready:       sharedBool(ep.Conditions.Ready),
					Serving:     sharedBool(ep.Conditions.Serving),
					Terminating: sharedBool(ep.Conditions.Terminating),
				},
				NodeName: internPtr(ep.NodeName),
			}
			if len(ep.Addresses) > 0 {
				e.Addresses = ep.Addresses[:1:1]
			}
			e.Hints = internHints(ep.Hints)
			out.Endpoints[i] = e
		}
	}
	return out
}

// internHints copies an endpoint's topology hints with their zone and node
// names interned: every endpoint of a zone repeats the same few names.
func internHints(h *discoveryv1.EndpointHints) *discoveryv1.EndpointHints {
	if h == nil {
		return nil
	}
	out := &discoveryv1.EndpointHints{}
	for _, z := range h.ForZones {
		out.ForZones = append(out.ForZones, discoveryv1.ForZone{Name: intern(z.Name)})
	}
	for _, n := range h.ForNodes {
		out.ForNodes = append(out.ForNodes, discoveryv1.ForNode{Name: intern(n.Name)})
	}
	return out
}
