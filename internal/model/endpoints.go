package model

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"unique"

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
// selection needs. It is kept for every endpoint the proxy knows (100k at
// 10k Services of 10 endpoints), so it is compact: 16 bytes, where a
// netip.Addr and the hints as two strings took 64. An IPv6 endpoint keeps
// its address in its slice's ip6 instead, at the same index.
type sliceEndpoint struct {
	// ip is the address of an endpoint of an IPv4 slice; zero in an IPv6
	// one.
	ip [4]byte
	// ready: the endpoint takes new connections.
	ready bool
	// serving: the endpoint answers, ready or not; established flows to it
	// are kept.
	serving bool
	// fallback: serving and terminating, used only when no endpoint of the
	// service port is ready.
	fallback bool
	// local: the endpoint is on this node (its nodeName is ours).
	local bool
	// hints are the endpoint's hints, interned: equal hints are one
	// handle, so the struct compares by ==. The zero handle is no hints.
	hints unique.Handle[endpointHints]
}

// hintsOf returns the endpoint's hints.
func (e *sliceEndpoint) hintsOf() endpointHints {
	if e.hints == (unique.Handle[endpointHints]{}) {
		return endpointHints{}
	}
	return e.hints.Value()
}

// endpointHints are an endpoint's hints.forZones and hints.forNodes, each
// name wrapped in hintSep so that a lookup is one strings.Contains; "" for
// none.
type endpointHints struct {
	zones, nodes string
}

// internHints returns the handle of h, the zero handle for no hints.
func internHints(h endpointHints) unique.Handle[endpointHints] {
	if h == (endpointHints{}) {
		return unique.Handle[endpointHints]{}
	}
	return unique.Make(h)
}

// hintSep wraps each hint name; it cannot occur in a zone or node name.
const hintSep = "\x00"

func hintSet(names []string) string {
	var b strings.Builder
	for _, n := range names {
		if n == "" {
			continue
		}
		b.WriteString(hintSep + n + hintSep)
	}
	return b.String()
}

func hasHint(set, name string) bool {
	return name != "" && strings.Contains(set, hintSep+name+hintSep)
}

// sliceInfo is what the model keeps of an EndpointSlice. It is immutable
// once built.
type sliceInfo struct {
	service   ServiceName
	ports     []slicePort
	endpoints []sliceEndpoint
	// ip6 holds the addresses of an IPv6 slice's endpoints, one per
	// endpoint; nil for an IPv4 slice.
	ip6 [][16]byte
}

// addr returns the address of endpoint i.
func (s *sliceInfo) addr(i int) netip.Addr {
	if s.ip6 != nil {
		return netip.AddrFrom16(s.ip6[i])
	}
	return netip.AddrFrom4(s.endpoints[i].ip)
}

// AddressType is the EndpointSlice address type holding family f's
// endpoints.
func (f IPFamily) AddressType() discoveryv1.AddressType {
	if f == IPv6 {
		return discoveryv1.AddressTypeIPv6
	}
	return discoveryv1.AddressTypeIPv4
}

// EndpointAddress parses an endpoint's address as the model reads it for
// a slice of family f: an address of f, not IPv4-mapped (validation
// refuses one in an IPv6 slice, where kube-proxy would write the IPv4
// address it carries into its ip6tables rules, and this model has always
// refused it in an IPv4 one), unspecified or zoned.
func EndpointAddress(s string, f IPFamily) (netip.Addr, error) {
	ip, err := netip.ParseAddr(s)
	if err == nil && (!f.Has(ip) || ip.Is4In6() || ip.IsUnspecified() || ip.Zone() != "") {
		err = fmt.Errorf("%q is not an endpoint address of an %v slice", s, f)
	}
	return ip, err
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

// convertSlice turns an EndpointSlice into what the Tracker of family f
// keeps of it. It returns nil for a slice that Tracker does not use:
// without a service-name label, or not of f's address type (an IPv6 slice
// is the IPv6 Tracker's, an IPv4 one the IPv4 Tracker's, and FQDN slices
// nobody's, as kube-proxy's per-family trackers split them). Malformed
// pieces are reported and logged, and only they are skipped.
func convertSlice(s *discoveryv1.EndpointSlice, nodeName string, f IPFamily, report ReportFunc) *sliceInfo {
	if s == nil {
		return nil
	}
	svc, ok := serviceOfSlice(s)
	if !ok {
		return nil
	}
	if s.AddressType != f.AddressType() {
		// The other family's Tracker takes it; FQDN slices are not
		// proxied by kube-proxy either.
		klog.V(4).InfoS("Ignoring EndpointSlice of another address type", "endpointSlice", klog.KObj(s), "addressType", s.AddressType, "ipFamily", f)
		return nil
	}

	info := &sliceInfo{
		service:   svc,
		ports:     make([]slicePort, 0, len(s.Ports)),
		endpoints: make([]sliceEndpoint, 0, len(s.Endpoints)),
	}
	if f == IPv6 {
		info.ip6 = make([][16]byte, 0, len(s.Endpoints))
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
		ip, err := EndpointAddress(ep.Addresses[0], f)
		if err != nil {
			report(ResourceEndpointSlice, ReasonInvalidEndpointIP)
			klog.ErrorS(err, "Skipping endpoint with an address invalid for its slice's address type", "endpointSlice", klog.KObj(s),
				"addressType", s.AddressType, "address", ep.Addresses[0])
			continue
		}
		// Unknown readiness or serving means true, unknown terminating
		// means false: kube-proxy's reading (its EndpointSliceCache), which
		// is what the API documents for consumers.
		ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
		serving := ep.Conditions.Serving == nil || *ep.Conditions.Serving
		terminating := ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
		e := sliceEndpoint{ready: ready, serving: serving, fallback: serving && terminating,
			local: nodeName != "" && ep.NodeName != nil && *ep.NodeName == nodeName}
		if ep.Hints != nil {
			zones := make([]string, 0, len(ep.Hints.ForZones))
			for _, z := range ep.Hints.ForZones {
				zones = append(zones, z.Name)
			}
			nodes := make([]string, 0, len(ep.Hints.ForNodes))
			for _, n := range ep.Hints.ForNodes {
				nodes = append(nodes, n.Name)
			}
			e.hints = internHints(endpointHints{zones: hintSet(zones), nodes: hintSet(nodes)})
		}
		if f == IPv6 {
			info.ip6 = append(info.ip6, ip.As16())
		} else {
			e.ip = ip.As4()
		}
		info.endpoints = append(info.endpoints, e)
	}
	return info
}

// candidate is one (endpoint, target port) pair seen for a service port.
type candidate struct {
	b        Backend
	ready    bool
	serving  bool
	fallback bool
	local    bool
	// zoneHints and nodeHints as in endpointHints.
	zoneHints, nodeHints string
}

// Topology is where this node is, as endpoint selection needs it: its name
// (an endpoint whose nodeName is the same is local) and its zone (the
// topology.kubernetes.io/zone label), for topology hints.
type Topology struct {
	NodeName string
	Zone     string
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
// visible. Its hints are those of the first copy in address order.
func computePorts(svc *serviceInfo, visit func(func(*sliceInfo)), topo Topology, scratch *[]candidate) []ServicePort {
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
			for i := range s.endpoints {
				ep := &s.endpoints[i]
				h := ep.hintsOf()
				cands = append(cands, candidate{b: Backend{IP: s.addr(i), Port: port}, ready: ep.ready, serving: ep.serving,
					fallback: ep.fallback, local: ep.local, zoneHints: h.zones, nodeHints: h.nodes})
			}
		})
		if sawSlice && !matched && klog.V(2).Enabled() {
			// Normal for a moment when a Service's ports change before the
			// EndpointSlice controller catches up, so not a malformed
			// object: just no backends.
			klog.V(2).InfoS("No EndpointSlice port matches service port", "servicePort", spec.name)
		}
		sp := ServicePort{Name: spec.name, ClusterIP: spec.frontend, InternalLocal: svc.internalLocal,
			Affinity: svc.affinity, External: svc.external}
		sp.External.NodePort = spec.nodePort
		if !sp.External.Accessible() {
			// kube-proxy's external policy applies only to a port
			// reachable from outside. The health check node port stays,
			// as kube-proxy serves it for every LoadBalancer Service of
			// externalTrafficPolicy Local: its load balancer probes the
			// node before the Service has a node port or an address in
			// its status (allocateLoadBalancerNodePorts false, an
			// ingress given as a hostname or of ipMode Proxy).
			sp.External = External{HealthCheckNodePort: sp.External.HealthCheckNodePort}
		}
		selectBackends(&sp, mergeCandidates(cands), topo)
		out[i] = sp
		*scratch = cands[:0]
	}
	return out
}

// mergeCandidates sorts cands by backend and merges duplicates in place.
func mergeCandidates(cands []candidate) []candidate {
	slices.SortFunc(cands, func(a, b candidate) int { return a.b.Compare(b.b) })
	n := 0
	for i, c := range cands {
		if i > 0 && c.b == cands[n-1].b {
			m := &cands[n-1]
			m.ready = m.ready || c.ready
			m.serving = m.serving || c.serving
			m.fallback = m.fallback || c.fallback
			m.local = m.local || c.local
		} else {
			cands[n] = c
			n++
		}
	}
	return cands[:n]
}

// Topology modes, as kube-proxy names them.
const (
	topologyNone     = ""
	topologySameZone = "PreferSameZone"
	topologySameNode = "PreferSameNode"
)

// topologyMode decides which hints the Cluster endpoints follow, as
// kube-proxy does: node hints when every ready endpoint has one and one
// names this node; else zone hints when every ready endpoint has one and
// one names this node's zone; else none, and every ready endpoint is used.
// Hints are followed whatever the Service asks for: the EndpointSlice
// controller writes them only for a Service that asks (trafficDistribution,
// or the topology-mode annotation).
func topologyMode(cands []candidate, topo Topology) string {
	anyReady := false
	allNode, forNode := true, false
	allZone, forZone := true, false
	for _, c := range cands {
		if !c.ready {
			continue
		}
		anyReady = true
		if c.nodeHints == "" {
			allNode = false
		} else if hasHint(c.nodeHints, topo.NodeName) {
			forNode = true
		}
		if c.zoneHints == "" {
			allZone = false
		} else if hasHint(c.zoneHints, topo.Zone) {
			forZone = true
		}
	}
	switch {
	case !anyReady:
		return topologyNone
	case allNode && forNode:
		return topologySameNode
	case allZone && forZone:
		return topologySameZone
	}
	return topologyNone
}

func availableForTopology(c candidate, mode string, topo Topology) bool {
	switch mode {
	case topologySameNode:
		return hasHint(c.nodeHints, topo.NodeName)
	case topologySameZone:
		return hasHint(c.zoneHints, topo.Zone)
	}
	return true
}

// selectBackends fills sp's backend lists from the merged candidates,
// following kube-proxy's CategorizeEndpoints:
//
//   - Cluster (when a policy uses it): the ready endpoints the topology
//     hints leave; if none, every serving and terminating endpoint, so
//     that connections keep working during a rolling update that has taken
//     every endpoint out of readiness (topology is not considered then);
//   - Local (when a policy uses it): this node's ready endpoints; if none,
//     this node's serving and terminating ones;
//   - Backends: Local under internalTrafficPolicy Local, else Cluster;
//   - Serving: every endpoint that is serving or ready.
func selectBackends(sp *ServicePort, cands []candidate, topo Topology) {
	sp.Backends, sp.Serving, sp.Cluster, sp.Local, sp.HasEndpoints, sp.LocalTerminating = nil, nil, nil, nil, false, false
	sp.HealthCheckLocal = nil
	if len(cands) == 0 {
		return
	}
	// pick returns the backends of the candidates use accepts, in order:
	// same, if they are exactly its elements (no allocation), else a list
	// of exactly their number, as it is kept until the port changes.
	pickOr := func(same []Backend, use func(candidate) bool) []Backend {
		n, isSame := 0, true
		for _, c := range cands {
			if use(c) {
				isSame = isSame && n < len(same) && same[n] == c.b
				n++
			}
		}
		if n == 0 {
			return nil
		}
		if isSame && n == len(same) {
			return same
		}
		out := make([]Backend, 0, n)
		for _, c := range cands {
			if use(c) {
				out = append(out, c.b)
			}
		}
		return out
	}
	pick := func(use func(candidate) bool) []Backend { return pickOr(nil, use) }
	anyReady, anyFallback, localReady, localFallback := false, false, false, false
	for _, c := range cands {
		anyReady = anyReady || c.ready
		anyFallback = anyFallback || (!c.ready && c.fallback)
		localReady = localReady || (c.local && c.ready)
		localFallback = localFallback || (c.local && !c.ready && c.fallback)
	}
	if sp.UsesCluster() {
		mode := topologyMode(cands, topo)
		sp.Cluster = pick(func(c candidate) bool { return c.ready && availableForTopology(c, mode, topo) })
		if sp.Cluster == nil {
			sp.Cluster = pick(func(c candidate) bool { return c.fallback })
		}
		sp.HasEndpoints = sp.Cluster != nil
	}
	if sp.UsesLocal() {
		sp.HasEndpoints = sp.HasEndpoints || anyReady || anyFallback
		switch {
		case localReady:
			sp.Local = pick(func(c candidate) bool { return c.local && c.ready })
		case localFallback:
			sp.Local = pick(func(c candidate) bool { return c.local && c.fallback })
			sp.LocalTerminating = true
		}
	}
	if sp.External.HealthCheckNodePort != 0 && !sp.UsesLocal() && localReady {
		sp.HealthCheckLocal = pick(func(c candidate) bool { return c.local && c.ready })
	}
	if sp.InternalLocal {
		sp.Backends = sp.Local
	} else {
		sp.Backends = sp.Cluster
	}
	// Alias equal lists, which is the common case and what the copier
	// and the datapaths' comparisons rely on to stay cheap.
	if sp.Cluster != nil && slices.Equal(sp.Cluster, sp.Backends) {
		sp.Cluster = sp.Backends
	}
	if sp.Local != nil && slices.Equal(sp.Local, sp.Backends) {
		sp.Local = sp.Backends
	}
	// A ready endpoint whose serving condition says false is one the API
	// should never show; it counts as serving for established flows since
	// it takes new ones.
	sp.Serving = pickOr(sp.Backends, func(c candidate) bool { return c.serving || c.ready })
}

// equalPorts reports whether two computed port lists are the same.
func equalPorts(a, b []ServicePort) bool {
	return slices.EqualFunc(a, b, EqualServicePort)
}

// EqualServicePort reports whether two service ports are served the same.
func EqualServicePort(x, y ServicePort) bool {
	return x.Name == y.Name && x.ClusterIP == y.ClusterIP &&
		slices.Equal(x.Backends, y.Backends) && slices.Equal(x.Serving, y.Serving) &&
		slices.Equal(x.Cluster, y.Cluster) && slices.Equal(x.Local, y.Local) && x.LocalTerminating == y.LocalTerminating &&
		slices.Equal(x.HealthCheckLocal, y.HealthCheckLocal) &&
		x.HasEndpoints == y.HasEndpoints && x.InternalLocal == y.InternalLocal &&
		x.Affinity == y.Affinity && x.External.Equal(y.External)
}
