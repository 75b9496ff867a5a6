package model

import (
	"net/netip"
	"slices"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/klog/v2"
)

// slicePort is one port of an EndpointSlice: the target port for the service
// port with the same name and protocol.
type slicePort struct {
	name  string
	proto Protocol
	port  uint16
}

// sliceEndpoint is one endpoint of an EndpointSlice, reduced to what endpoint
// selection needs.
type sliceEndpoint struct {
	ip netip.Addr
	// ready: the endpoint takes new connections.
	ready bool
	// serving: the endpoint answers, ready or not; established flows to it
	// are kept.
	serving bool
	// fallback: serving and terminating, used only when no endpoint of the
	// service port is ready.
	fallback bool
}

// sliceInfo is what the model keeps of an EndpointSlice. It is immutable
// once built.
type sliceInfo struct {
	service   ServiceName
	ports     []slicePort
	endpoints []sliceEndpoint
}

// serviceOfSlice names the Service an EndpointSlice belongs to, from its
// kubernetes.io/service-name label.
func serviceOfSlice(s *discoveryv1.EndpointSlice) (ServiceName, bool) {
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return ServiceName{}, false
	}
	return ServiceName{Namespace: s.Namespace, Name: name}, true
}

// convertSlice turns an EndpointSlice into what the model keeps of it. It
// returns nil for a slice the proxy does not use: without a service-name
// label, or not of address type IPv4. Malformed pieces are reported and
// logged, and only they are skipped.
func convertSlice(s *discoveryv1.EndpointSlice, report ReportFunc) *sliceInfo {
	if s == nil {
		return nil
	}
	svc, ok := serviceOfSlice(s)
	if !ok {
		return nil
	}
	switch s.AddressType {
	case discoveryv1.AddressTypeIPv4:
	case discoveryv1.AddressTypeIPv6:
		klog.V(2).InfoS("Ignoring IPv6 EndpointSlice: only IPv4 is served", "endpointSlice", klog.KObj(s), "service", svc)
		return nil
	default: // FQDN slices are not proxied by kube-proxy either.
		klog.V(4).InfoS("Ignoring EndpointSlice", "endpointSlice", klog.KObj(s), "addressType", s.AddressType)
		return nil
	}

	info := &sliceInfo{
		service:   svc,
		ports:     make([]slicePort, 0, len(s.Ports)),
		endpoints: make([]sliceEndpoint, 0, len(s.Endpoints)),
	}
	for i := range s.Ports {
		p := &s.Ports[i]
		var name string
		if p.Name != nil {
			name = *p.Name
		}
		proto := v1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		ourProto, ok := protocolFrom(proto)
		if !ok {
			// No service port of ours can use it; the Service's own
			// conversion already reported the protocol.
			continue
		}
		if p.Port == nil || *p.Port < 1 || *p.Port > 65535 {
			report(ResourceEndpointSlice, ReasonInvalidEndpointPort)
			klog.ErrorS(nil, "Skipping EndpointSlice port with missing or invalid port number",
				"endpointSlice", klog.KObj(s), "port", name, "number", p.Port)
			continue
		}
		sp := slicePort{name: name, proto: ourProto, port: uint16(*p.Port)}
		if slices.ContainsFunc(info.ports, func(o slicePort) bool { return o.name == sp.name && o.proto == sp.proto }) {
			report(ResourceEndpointSlice, ReasonDuplicatePort)
			klog.ErrorS(nil, "Skipping duplicate EndpointSlice port", "endpointSlice", klog.KObj(s), "port", name, "protocol", ourProto)
			continue
		}
		info.ports = append(info.ports, sp)
	}
	for i := range s.Endpoints {
		ep := &s.Endpoints[i]
		if len(ep.Addresses) == 0 {
			report(ResourceEndpointSlice, ReasonInvalidEndpointIP)
			klog.ErrorS(nil, "Skipping endpoint without address", "endpointSlice", klog.KObj(s), "index", i)
			continue
		}
		// Consumers use the first address; the API says the others may be
		// ignored.
		ip, err := netip.ParseAddr(ep.Addresses[0])
		if err != nil || !ip.Is4() || ip.IsUnspecified() {
			report(ResourceEndpointSlice, ReasonInvalidEndpointIP)
			klog.ErrorS(err, "Skipping endpoint with invalid IPv4 address", "endpointSlice", klog.KObj(s), "address", ep.Addresses[0])
			continue
		}
		// Unknown readiness or serving means true, unknown terminating
		// means false: kube-proxy's reading (its EndpointSliceCache), which
		// is what the API documents for consumers.
		ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
		serving := ep.Conditions.Serving == nil || *ep.Conditions.Serving
		terminating := ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
		info.endpoints = append(info.endpoints, sliceEndpoint{ip: ip, ready: ready, serving: serving, fallback: serving && terminating})
	}
	return info
}

// candidate is one (endpoint, target port) pair seen for a service port.
type candidate struct {
	b        Backend
	ready    bool
	serving  bool
	fallback bool
}

// computePorts builds a service's ports from its spec and the slices that
// belong to it; visit calls its argument for each slice, in any order. The
// result is freshly allocated and sorted like svc.ports.
//
// Backends are merged across all slices and deduplicated by (IP, port). An
// endpoint seen more than once is ready if any copy is ready, and a fallback
// candidate if any copy is serving and terminating: a copy only ever adds
// reasons to use an endpoint, which is right while the EndpointSlice
// controller moves an endpoint between slices and both copies are briefly
// visible.
//
// Endpoint selection follows kube-proxy: the ready endpoints; if none is
// ready, the serving and terminating ones, so that connections keep working
// during a rolling update that has taken every endpoint out of readiness;
// else none, and the frontend refuses connections.
func computePorts(svc *serviceInfo, visit func(func(*sliceInfo)), scratch *[]candidate) []ServicePort {
	if svc == nil {
		return nil
	}
	out := make([]ServicePort, len(svc.ports))
	for i, spec := range svc.ports {
		cands := (*scratch)[:0]
		matched, sawSlice := false, false
		visit(func(s *sliceInfo) {
			sawSlice = true
			idx := slices.IndexFunc(s.ports, func(p slicePort) bool {
				return p.name == spec.name.Port && p.proto == spec.name.Protocol
			})
			if idx < 0 {
				return
			}
			matched = true
			port := s.ports[idx].port
			for _, ep := range s.endpoints {
				cands = append(cands, candidate{b: Backend{IP: ep.ip, Port: port}, ready: ep.ready, serving: ep.serving, fallback: ep.fallback})
			}
		})
		if sawSlice && !matched && klog.V(2).Enabled() {
			// Normal for a moment when a Service's ports change before the
			// EndpointSlice controller catches up, so not a malformed
			// object: just no backends.
			klog.V(2).InfoS("No EndpointSlice port matches service port", "servicePort", spec.name)
		}
		backends, serving := selectBackends(cands)
		out[i] = ServicePort{Name: spec.name, ClusterIP: spec.frontend, Backends: backends, Serving: serving}
		*scratch = cands[:0]
	}
	return out
}

// selectBackends merges duplicate candidates and applies endpoint selection.
// It returns the backends for new connections and the serving endpoints
// (the same slice when they are equal), each new and nil when empty. It
// sorts cands in place.
func selectBackends(cands []candidate) (backends, serving []Backend) {
	if len(cands) == 0 {
		return nil, nil
	}
	slices.SortFunc(cands, func(a, b candidate) int { return a.b.Compare(b.b) })
	// Merge duplicates in place.
	n := 0
	anyReady := false
	for i, c := range cands {
		if i > 0 && c.b == cands[n-1].b {
			cands[n-1].ready = cands[n-1].ready || c.ready
			cands[n-1].serving = cands[n-1].serving || c.serving
			cands[n-1].fallback = cands[n-1].fallback || c.fallback
		} else {
			cands[n] = c
			n++
		}
		anyReady = anyReady || c.ready
	}
	cands = cands[:n]
	use := func(c candidate) bool { return c.fallback }
	if anyReady {
		use = func(c candidate) bool { return c.ready }
	}
	// A ready endpoint whose serving condition says false is one the API
	// should never show; it is used as kube-proxy uses it, and counts as
	// serving for established flows since it takes new ones.
	inServing := func(c candidate) bool { return c.serving || use(c) }
	nUse, nServing := 0, 0
	for _, c := range cands {
		if use(c) {
			nUse++
		}
		if inServing(c) {
			nServing++
		}
	}
	if nUse > 0 {
		backends = make([]Backend, 0, nUse)
		for _, c := range cands {
			if use(c) {
				backends = append(backends, c.b)
			}
		}
	}
	switch {
	case nServing == nUse:
		// Every serving endpoint is used: the common case, one slice.
		serving = backends
	case nServing > 0:
		serving = make([]Backend, 0, nServing)
		for _, c := range cands {
			if inServing(c) {
				serving = append(serving, c.b)
			}
		}
	}
	return backends, serving
}

// equalPorts reports whether two computed port lists are the same.
func equalPorts(a, b []ServicePort) bool {
	return slices.EqualFunc(a, b, func(x, y ServicePort) bool {
		return x.Name == y.Name && x.ClusterIP == y.ClusterIP &&
			slices.Equal(x.Backends, y.Backends) && slices.Equal(x.Serving, y.Serving)
	})
}
