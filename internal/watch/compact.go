package watch

import (
	"net/netip"
	"unique"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// The informers cache Services and EndpointSlices in the compact forms
// below rather than as API objects: an API struct is mostly fields the proxy
// never reads (a Service about 800 bytes before its strings, an Endpoint 96
// before its address), and at 10k Services of 10 endpoints the caches were
// the largest part of the proxy's heap. The event handlers expand a cached
// form back into the trimmed API object (slimService, slimSlice) for each
// event; that object is garbage once the handler returns, since the model
// keeps its own form of it. Expanding reuses the cached strings, so what the
// model keeps of them is shared with the cache.
//
// client-go needs only the object's metadata from what it stores (its key,
// namespace index and deltas), which GetObjectMeta gives.

// Bits of cachedMeta.flags and cachedEndpoint.flags.
const (
	flagHasAnnotation         = 1 << iota // the kept annotation was set
	flagClusterIPsIsClusterIP             // Service: ClusterIPs is [ClusterIP]
)

// keptLabelValues are the values of keptLabels that an object sets.
type keptLabelValues struct {
	vals [3]string
	set  uint8 // bit i: keptLabels[i] is set
}

// cachedMeta is what slimMeta keeps.
type cachedMeta struct {
	name, namespace, resourceVersion string
	uid                              types.UID
	labels                           *keptLabelValues // nil: none of keptLabels
	annotation                       string           // the kept annotation's value
	flags                            uint8
}

func compactMeta(m *metav1.ObjectMeta) cachedMeta {
	out := cachedMeta{name: m.Name, namespace: m.Namespace, resourceVersion: m.ResourceVersion, uid: m.UID}
	if len(m.Labels) > 0 {
		var kl keptLabelValues
		for i, k := range keptLabels {
			if v, ok := m.Labels[k]; ok {
				kl.vals[i], kl.set = v, kl.set|1<<i
			}
		}
		if kl.set != 0 {
			out.labels = &kl
		}
	}
	return out
}

// objectMeta expands m; annotation is the kept annotation's key.
func (m *cachedMeta) objectMeta(annotation string) metav1.ObjectMeta {
	out := metav1.ObjectMeta{Name: m.name, Namespace: m.namespace, UID: m.uid, ResourceVersion: m.resourceVersion}
	if m.labels != nil {
		out.Labels = make(map[string]string, 1)
		for i, k := range keptLabels {
			if m.labels.set&(1<<i) != 0 {
				out.Labels[k] = m.labels.vals[i]
			}
		}
	}
	if m.flags&flagHasAnnotation != 0 {
		out.Annotations = map[string]string{annotation: m.annotation}
	}
	return out
}

type cachedServicePort struct {
	name, protocol string
	port, nodePort int32
}

type cachedIngress struct {
	ip   string
	mode *v1.LoadBalancerIPMode
}

// cachedService is a Service as the informers cache it: what slimService
// keeps.
type cachedService struct {
	meta            cachedMeta
	typ             v1.ServiceType
	clusterIP       string
	clusterIPs      []string // unless flagClusterIPsIsClusterIP
	externalIPs     []string
	sourceRanges    []string
	externalPolicy  v1.ServiceExternalTrafficPolicy
	internalPolicy  *v1.ServiceInternalTrafficPolicy
	healthCheckPort int32
	affinity        v1.ServiceAffinity
	affinityConfig  *v1.SessionAffinityConfig
	ports           []cachedServicePort
	ingress         []cachedIngress
}

// GetObjectMeta makes a cachedService a metav1.ObjectMetaAccessor, which is
// what client-go's key functions and indexers read.
func (c *cachedService) GetObjectMeta() metav1.Object {
	m := c.meta.objectMeta("")
	return &m
}

// compactService returns the cached form of slimService(s).
func compactService(s *v1.Service) *cachedService {
	if s == nil {
		return nil
	}
	sl := slimService(s)
	out := &cachedService{
		meta:            compactMeta(&sl.ObjectMeta),
		typ:             sl.Spec.Type,
		clusterIP:       sl.Spec.ClusterIP,
		externalIPs:     sl.Spec.ExternalIPs,
		sourceRanges:    sl.Spec.LoadBalancerSourceRanges,
		externalPolicy:  sl.Spec.ExternalTrafficPolicy,
		internalPolicy:  sl.Spec.InternalTrafficPolicy,
		healthCheckPort: sl.Spec.HealthCheckNodePort,
		affinity:        sl.Spec.SessionAffinity,
		affinityConfig:  sl.Spec.SessionAffinityConfig,
	}
	if len(s.Spec.ClusterIPs) == 1 && s.Spec.ClusterIPs[0] == s.Spec.ClusterIP {
		out.meta.flags |= flagClusterIPsIsClusterIP
	} else {
		out.clusterIPs = sl.Spec.ClusterIPs
	}
	if len(sl.Spec.Ports) > 0 {
		out.ports = make([]cachedServicePort, len(sl.Spec.Ports))
		for i, p := range sl.Spec.Ports {
			out.ports[i] = cachedServicePort{name: p.Name, protocol: string(p.Protocol), port: p.Port, nodePort: p.NodePort}
		}
	}
	if len(sl.Status.LoadBalancer.Ingress) > 0 {
		out.ingress = make([]cachedIngress, len(sl.Status.LoadBalancer.Ingress))
		for i, in := range sl.Status.LoadBalancer.Ingress {
			out.ingress[i] = cachedIngress{ip: in.IP, mode: in.IPMode}
		}
	}
	return out
}

// service expands c into what slimService returned for it.
func (c *cachedService) service() *v1.Service {
	out := &v1.Service{
		ObjectMeta: c.meta.objectMeta(""),
		Spec: v1.ServiceSpec{
			Type:                     c.typ,
			ClusterIP:                c.clusterIP,
			ClusterIPs:               c.clusterIPs,
			ExternalIPs:              c.externalIPs,
			LoadBalancerSourceRanges: c.sourceRanges,
			ExternalTrafficPolicy:    c.externalPolicy,
			HealthCheckNodePort:      c.healthCheckPort,
			InternalTrafficPolicy:    c.internalPolicy,
			SessionAffinity:          c.affinity,
			SessionAffinityConfig:    c.affinityConfig,
		},
	}
	if c.meta.flags&flagClusterIPsIsClusterIP != 0 {
		out.Spec.ClusterIPs = []string{c.clusterIP}
	}
	if len(c.ports) > 0 {
		out.Spec.Ports = make([]v1.ServicePort, len(c.ports))
		for i, p := range c.ports {
			out.Spec.Ports[i] = v1.ServicePort{Name: p.name, Protocol: v1.Protocol(p.protocol), Port: p.port, NodePort: p.nodePort}
		}
	}
	if len(c.ingress) > 0 {
		out.Status.LoadBalancer.Ingress = make([]v1.LoadBalancerIngress, len(c.ingress))
		for i, in := range c.ingress {
			out.Status.LoadBalancer.Ingress[i] = v1.LoadBalancerIngress{IP: in.ip, IPMode: in.mode}
		}
	}
	return out
}

// Encoding of one condition in two bits of cachedEndpoint.conditions.
const (
	condNil = iota
	condFalse
	condTrue
)

func condBits(b *bool) uint8 {
	switch {
	case b == nil:
		return condNil
	case *b:
		return condTrue
	default:
		return condFalse
	}
}

func condPtr(bits uint8) *bool {
	switch bits & 3 {
	case condTrue:
		return &sharedTrue
	case condFalse:
		return &sharedFalse
	}
	return nil
}

// cachedEndpoint is an Endpoint as slimSlice keeps it: 32 bytes, against
// 96, an address list, the address string and a node name pointer.
type cachedEndpoint struct {
	// ipv4 is the first address when it is an IPv4 address in the form
	// netip.Addr.String gives (which the API server's validation asks of
	// IPv4 slices); other is any other first address.
	ipv4       [4]byte
	conditions uint8 // ready, serving, terminating: two bits each
	flags      uint8 // endpointHas*
	nodeName   unique.Handle[string]
	hints      *discoveryv1.EndpointHints
	other      *string
}

// Bits of cachedEndpoint.flags.
const (
	endpointHasIPv4 = 1 << iota
	endpointHasOther
	endpointHasNode
)

type cachedEndpointPort struct {
	name     unique.Handle[string]
	hasName  bool
	protocol *v1.Protocol // shared (sharedProtocol)
	port     *int32
}

// cachedSlice is an EndpointSlice as the informers cache it: what slimSlice
// keeps.
type cachedSlice struct {
	meta        cachedMeta
	addressType discoveryv1.AddressType
	ports       []cachedEndpointPort
	endpoints   []cachedEndpoint
}

// GetObjectMeta makes a cachedSlice a metav1.ObjectMetaAccessor.
func (c *cachedSlice) GetObjectMeta() metav1.Object {
	m := c.meta.objectMeta(v1.EndpointsLastChangeTriggerTime)
	return &m
}

// compactSlice returns the cached form of slimSlice(s).
func compactSlice(s *discoveryv1.EndpointSlice) *cachedSlice {
	if s == nil {
		return nil
	}
	out := &cachedSlice{meta: compactMeta(&s.ObjectMeta), addressType: s.AddressType}
	if v, ok := s.Annotations[v1.EndpointsLastChangeTriggerTime]; ok {
		out.meta.annotation, out.meta.flags = v, out.meta.flags|flagHasAnnotation
	}
	out.meta.namespace = intern(out.meta.namespace)
	if len(s.Ports) > 0 {
		out.ports = make([]cachedEndpointPort, len(s.Ports))
		for i, p := range s.Ports {
			cp := cachedEndpointPort{protocol: sharedProtocol(p.Protocol), port: p.Port}
			if p.Name != nil {
				cp.name, cp.hasName = unique.Make(*p.Name), true
			}
			out.ports[i] = cp
		}
	}
	if len(s.Endpoints) > 0 {
		out.endpoints = make([]cachedEndpoint, len(s.Endpoints))
		for i := range s.Endpoints {
			ep := &s.Endpoints[i]
			e := cachedEndpoint{
				conditions: condBits(ep.Conditions.Ready) | condBits(ep.Conditions.Serving)<<2 |
					condBits(ep.Conditions.Terminating)<<4,
			}
			if len(ep.Addresses) > 0 {
				a := ep.Addresses[0]
				if ip, err := netip.ParseAddr(a); err == nil && ip.Is4() && ip.String() == a {
					e.ipv4, e.flags = ip.As4(), e.flags|endpointHasIPv4
				} else {
					e.other, e.flags = &a, e.flags|endpointHasOther
				}
			}
			if ep.NodeName != nil {
				e.nodeName, e.flags = unique.Make(*ep.NodeName), e.flags|endpointHasNode
			}
			e.hints = internHints(ep.Hints)
			out.endpoints[i] = e
		}
	}
	return out
}

// slice expands c into what slimSlice returned for it.
func (c *cachedSlice) slice() *discoveryv1.EndpointSlice {
	out := &discoveryv1.EndpointSlice{
		ObjectMeta:  c.meta.objectMeta(v1.EndpointsLastChangeTriggerTime),
		AddressType: c.addressType,
	}
	if len(c.ports) > 0 {
		out.Ports = make([]discoveryv1.EndpointPort, len(c.ports))
		for i, p := range c.ports {
			ep := discoveryv1.EndpointPort{Protocol: p.protocol, Port: p.port}
			if p.hasName {
				name := p.name.Value()
				ep.Name = &name
			}
			out.Ports[i] = ep
		}
	}
	if len(c.endpoints) > 0 {
		out.Endpoints = make([]discoveryv1.Endpoint, len(c.endpoints))
		for i, e := range c.endpoints {
			ep := discoveryv1.Endpoint{
				Conditions: discoveryv1.EndpointConditions{
					Ready:       condPtr(e.conditions),
					Serving:     condPtr(e.conditions >> 2),
					Terminating: condPtr(e.conditions >> 4),
				},
				Hints: e.hints,
			}
			switch {
			case e.flags&endpointHasIPv4 != 0:
				ep.Addresses = []string{netip.AddrFrom4(e.ipv4).String()}
			case e.flags&endpointHasOther != 0:
				ep.Addresses = []string{*e.other}
			}
			if e.flags&endpointHasNode != 0 {
				n := e.nodeName.Value()
				ep.NodeName = &n
			}
			out.Endpoints[i] = ep
		}
	}
	return out
}

// expandService is the Service handlers' eventHandler.expand: the cached
// form expanded, or a Service as is (an informer without Transform).
func expandService(obj any) (*v1.Service, bool) {
	switch o := obj.(type) {
	case *cachedService:
		if o != nil {
			return o.service(), true
		}
	case *v1.Service:
		return o, o != nil
	}
	return nil, false
}

// expandSlice is the EndpointSlice handler's eventHandler.expand.
func expandSlice(obj any) (*discoveryv1.EndpointSlice, bool) {
	switch o := obj.(type) {
	case *cachedSlice:
		if o != nil {
			return o.slice(), true
		}
	case *discoveryv1.EndpointSlice:
		return o, o != nil
	}
	return nil, false
}
