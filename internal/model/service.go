package model

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
)

// Resources named in skip reports.
const (
	ResourceService       = "Service"
	ResourceEndpointSlice = "EndpointSlice"
)

// Reasons a piece of an API object is skipped. They are stable: metrics use
// them as label values. Each names the piece that was dropped; the rest of the
// object is still used. A dual-stack proxy runs one Tracker per family and
// feeds both every object, yet each problem is reported by one of them only:
// an EndpointSlice's by the Tracker of its address type, a ClusterIP's by
// the Tracker of its family, a Service port's by the Tracker of the
// Service's first usable ClusterIP, a host-scoped external address by the
// Tracker of its family.
const (
	// ReasonInvalidClusterIP: a Service ClusterIP that does not parse, or is
	// the unspecified address (or zoned, or IPv4-mapped IPv6). The Service
	// is dropped by a Tracker if no usable ClusterIP of its family remains.
	// Each bad address is reported by the Tracker of the family it was
	// allocated for only (see clusterIPOf), so a dual-stack proxy counts
	// it once.
	ReasonInvalidClusterIP = "invalid-cluster-ip"
	// ReasonInvalidPort: a Service port outside 1..65535. That port is dropped.
	ReasonInvalidPort = "invalid-port"
	// ReasonUnsupportedProtocol: a Service port whose protocol is neither TCP
	// nor UDP (SCTP in practice). That port is dropped.
	ReasonUnsupportedProtocol = "unsupported-protocol"
	// ReasonDuplicatePort: a Service port with the same (name, protocol) or
	// the same (port, protocol) as an earlier one, or an EndpointSlice port
	// with the same (name, protocol) as an earlier one in that slice. API
	// validation forbids both; the later one is dropped.
	ReasonDuplicatePort = "duplicate-port"
	// ReasonInvalidEndpointIP: an endpoint with no address, or whose first
	// address is not a valid address of its slice's address type (IPv4 in
	// an IPv4 slice, IPv6 but not IPv4-mapped in an IPv6 one). That
	// endpoint is dropped. Only the Tracker of the slice's family sees it.
	ReasonInvalidEndpointIP = "invalid-endpoint-ip"
	// ReasonInvalidEndpointPort: an EndpointSlice port with no port number or
	// one outside 1..65535. That slice port is dropped, so the service port it
	// names gets no backends from that slice.
	ReasonInvalidEndpointPort = "invalid-endpoint-port"
	// ReasonHostScopedExternalIP: a Service whose external IPs or load
	// balancer ingress IPs name a host-scoped address (see HostScoped). It
	// is reported, once per conversion of the Service, only by a Tracker
	// made WithHostScopedReports, for a datapath that serves at socket
	// level: there such an address would be every pod's own (127.0.0.53,
	// a sidecar's 127.0.0.1), so that datapath never serves it. The
	// address stays in the model: the iptables rules keep it as kube-proxy
	// writes them, where a pod's own addresses never reach the node's
	// rules.
	ReasonHostScopedExternalIP = "host-scoped-external-ip"
)

// HostScoped reports whether ip is an address no Service may take over
// from the sockets of a network namespace: loopback (127.0.0.0/8, ::1),
// link-local (169.254.0.0/16, fe80::/10), multicast (224.0.0.0/4,
// ff00::/8), the limited broadcast address or the unspecified address
// (0.0.0.0, ::). An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is judged
// by the IPv4 address it carries. Each names something of the namespace or
// link the socket is in, never a Service of the cluster.
func HostScoped(ip netip.Addr) bool {
	ip = ip.Unmap()
	return ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified() ||
		ip == netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// reportHostScoped logs and reports a Service whose external IPs or load
// balancer IPs name host-scoped addresses, once.
func reportHostScoped(svc *v1.Service, e *External, report ReportFunc) {
	var bad []string
	for _, ips := range [][]netip.Addr{e.ExternalIPs, e.LoadBalancerIPs} {
		for _, ip := range ips {
			if HostScoped(ip) {
				bad = append(bad, ip.String())
			}
		}
	}
	if len(bad) == 0 {
		return
	}
	report(ResourceService, ReasonHostScopedExternalIP)
	klog.Warningf("Service %s names host-scoped addresses %v as external IPs or load balancer IPs "+
		"(loopback, link-local, multicast or broadcast): the socket-level datapath does not serve them, "+
		"since every pod's own address would go to the Service; fix the Service or its status", klog.KObj(svc), bad)
}

// ReportFunc is told about every skipped piece of an API object: resource is
// ResourceService or ResourceEndpointSlice, reason one of the Reason*
// constants.
type ReportFunc func(resource, reason string)

// servicePortSpec is one proxyable port of a Service, before endpoints are
// known.
type servicePortSpec struct {
	name     ServicePortName
	frontend Frontend
	nodePort uint16
}

// serviceInfo is what the model keeps of a Service: its proxyable ports,
// sorted by name then protocol, its traffic policies, session affinity and
// external frontends. It is immutable once built.
type serviceInfo struct {
	ports         []servicePortSpec
	internalLocal bool
	affinity      time.Duration
	// external is shared by every port; each port adds its node port.
	external External
}

// DefaultAffinityTimeout is the API's default ClientIP affinity timeout,
// used if a Service somehow lacks one.
const DefaultAffinityTimeout = 10800 * time.Second

// convertService turns a Service into the proxyable ports of family f. It
// returns nil for a Service the proxier of f does not serve: headless,
// ExternalName, without a ClusterIP of f (a single-stack Service of the other
// family, or one whose second ClusterIP is not allocated yet), or without a
// usable port. Malformed pieces are reported and logged, and only they are
// skipped.
func convertService(svc *v1.Service, f IPFamily, sole bool, report ReportFunc) *serviceInfo {
	if svc == nil {
		return nil
	}
	if svc.Spec.Type == v1.ServiceTypeExternalName {
		return nil
	}
	name := ServiceName{Namespace: svc.Namespace, Name: svc.Name}

	vip, first, ok := clusterIPOf(svc, f, report)
	if !ok {
		return nil
	}
	// A port's problems are the same in every family: only the Tracker
	// of the Service's first usable ClusterIP reports and logs them, so
	// that a dual-stack proxy counts each once; a single-stack proxy's
	// (sole) reports them whichever family is first.
	reportPort := func(reason string) bool {
		if first || sole {
			report(ResourceService, reason)
		}
		return first || sole
	}
	info := &serviceInfo{ports: make([]servicePortSpec, 0, len(svc.Spec.Ports))}
	for i := range svc.Spec.Ports {
		p := &svc.Spec.Ports[i]
		proto, ok := protocolFrom(p.Protocol)
		if !ok {
			if reportPort(ReasonUnsupportedProtocol) {
				msg := "Skipping service port: unsupported protocol, only TCP and UDP are served"
				if p.Protocol == v1.ProtocolSCTP {
					msg = "Skipping service port: SCTP is not supported"
				}
				klog.InfoS(msg, "service", klog.KObj(svc), "port", p.Name, "protocol", p.Protocol)
			}
			continue
		}
		if p.Port < 1 || p.Port > 65535 {
			if reportPort(ReasonInvalidPort) {
				klog.ErrorS(nil, "Skipping service port with invalid port number", "service", klog.KObj(svc), "port", p.Name, "number", p.Port)
			}
			continue
		}
		sp := servicePortSpec{
			name:     ServicePortName{ServiceName: name, Port: p.Name, Protocol: proto},
			frontend: Frontend{IP: vip, Port: uint16(p.Port), Protocol: proto},
		}
		if p.NodePort > 0 && p.NodePort <= 65535 {
			sp.nodePort = uint16(p.NodePort)
		} else if p.NodePort != 0 {
			if reportPort(ReasonInvalidPort) {
				klog.ErrorS(nil, "Ignoring invalid node port", "service", klog.KObj(svc), "port", p.Name, "nodePort", p.NodePort)
			}
		}
		if slices.ContainsFunc(info.ports, func(o servicePortSpec) bool {
			return o.name == sp.name || o.frontend == sp.frontend
		}) {
			if reportPort(ReasonDuplicatePort) {
				klog.ErrorS(nil, "Skipping duplicate service port", "service", klog.KObj(svc), "port", p.Name, "number", p.Port, "protocol", proto)
			}
			continue
		}
		info.ports = append(info.ports, sp)
	}
	if len(info.ports) == 0 {
		return nil
	}
	slices.SortFunc(info.ports, func(a, b servicePortSpec) int {
		return comparePortNames(a.name, b.name)
	})
	info.internalLocal = svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal
	if svc.Spec.SessionAffinity == v1.ServiceAffinityClientIP {
		info.affinity = DefaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			info.affinity = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	info.external = externalOf(svc, f)
	return info
}

// clusterIPOf returns the Service's ClusterIP of family f, the frontend of
// its ports in the proxier of f; false when it has none (or is headless).
// first reports whether it is the Service's first usable ClusterIP (that of
// its primary family, ipFamilies[0], unless that one is malformed).
//
// ipFamilies and ipFamilyPolicy need no reading of their own: the API server
// allocates one ClusterIP per entry of ipFamilies, in its order, and
// ipFamilyPolicy only decides how many entries there are (SingleStack one,
// RequireDualStack two, PreferDualStack two on a dual-stack cluster), so the
// ClusterIPs say it all, as kube-proxy's GetClusterIPByFamily reads them. A
// Service changed from SingleStack to dual-stack gains its second ClusterIP
// and appears in that family's Tracker; changed back, it loses it and
// disappears. We take an address's family from the address itself, which
// validation makes agree with ipFamilies.
//
// A ClusterIP that does not parse (or is the unspecified address, zoned, or
// IPv4-mapped IPv6, which validation rejects and neither family could serve
// as written) is reported with ReasonInvalidClusterIP by one Tracker only,
// so that a dual-stack proxy, which runs one Tracker per family, counts each
// bad address once, and a single-stack proxy of either family still counts
// the bad addresses of its own family: the Tracker of the family it was
// allocated for (its ipFamilies entry; without one, the family of the
// address if it parses, else IPv4, as kube-proxy hands a ClusterIP that is
// not IPv6 of a Service without ipFamilies, an object older than
// dual-stack, to its IPv4 proxier).
func clusterIPOf(svc *v1.Service, f IPFamily, report ReportFunc) (vip netip.Addr, first, ok bool) {
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	var firstFamily IPFamily
	for i, s := range ips {
		if s == v1.ClusterIPNone {
			return netip.Addr{}, false, false // headless: clients resolve endpoints through DNS
		}
		ip, err := netip.ParseAddr(s)
		if err != nil || ip.IsUnspecified() || ip.Zone() != "" || ip.Is4In6() {
			if owner := clusterIPFamily(svc, i, ip); owner == f {
				report(ResourceService, ReasonInvalidClusterIP)
				klog.ErrorS(err, "Ignoring malformed ClusterIP", "service", klog.KObj(svc), "clusterIP", s, "ipFamily", owner)
			}
			continue
		}
		if firstFamily == 0 {
			firstFamily = FamilyOf(ip)
		}
		if f.Has(ip) && !vip.IsValid() {
			vip = ip
		}
	}
	if !vip.IsValid() {
		if len(ips) > 0 && klog.V(4).Enabled() {
			klog.V(4).InfoS("Service has no ClusterIP of this proxier's family: served by the other family's proxier, if any",
				"service", klog.KObj(svc), "ipFamily", f, "clusterIPs", ips)
		}
		return netip.Addr{}, false, false
	}
	return vip, firstFamily == f, true
}

// clusterIPFamily is the family a malformed ClusterIP (clusterIPs[i]) was
// allocated for: its ipFamilies entry, else the family of the address it
// carries if it has one (an IPv4-mapped address is IPv4, as net.IP reads
// it), else IPv4.
func clusterIPFamily(svc *v1.Service, i int, ip netip.Addr) IPFamily {
	if i < len(svc.Spec.IPFamilies) {
		switch svc.Spec.IPFamilies[i] {
		case v1.IPv4Protocol:
			return IPv4
		case v1.IPv6Protocol:
			return IPv6
		}
	}
	if ip.IsValid() {
		return FamilyOf(ip.Unmap())
	}
	return IPv4
}

// externalOf reads what makes a Service reachable from outside, for family
// f, as kube-proxy's service port info does for its proxier of f: external
// IPs, load balancer ingress IPs and source ranges of the other family are
// left to that family's proxier, and ones that do not parse are ignored
// (validation rejects them). As kube-proxy reads addresses with net.IP, an
// IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it carries.
func externalOf(svc *v1.Service, f IPFamily) External {
	var e External
	for _, s := range svc.Spec.ExternalIPs {
		if ip, ok := parseOfFamily(s, f); ok {
			e.ExternalIPs = append(e.ExternalIPs, ip)
		}
	}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		// An ingress of ipMode Proxy is reached through the load
		// balancer, which forwards to node ports: kube-proxy serves
		// nothing for it.
		if ing.IP == "" || (ing.IPMode != nil && *ing.IPMode != v1.LoadBalancerIPModeVIP) {
			continue
		}
		if ip, ok := parseOfFamily(ing.IP, f); ok {
			e.LoadBalancerIPs = append(e.LoadBalancerIPs, ip)
		}
	}
	e.ExternalIPs = sortedUnique(e.ExternalIPs)
	e.LoadBalancerIPs = sortedUnique(e.LoadBalancerIPs)
	e.SourceRanges = sourceRanges(svc.Spec.LoadBalancerSourceRanges, f)
	// kube-proxy's ExternalPolicyLocal: only a Service reachable from
	// outside has an external policy.
	reachable := svc.Spec.Type == v1.ServiceTypeNodePort || svc.Spec.Type == v1.ServiceTypeLoadBalancer || len(svc.Spec.ExternalIPs) > 0
	e.PolicyLocal = reachable && svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal
	if e.PolicyLocal && svc.Spec.Type == v1.ServiceTypeLoadBalancer {
		if p := svc.Spec.HealthCheckNodePort; p > 0 && p <= 65535 {
			e.HealthCheckNodePort = uint16(p)
		} else {
			klog.ErrorS(nil, "Service has no health check node port", "service", klog.KObj(svc))
		}
	}
	return e
}

func sortedUnique(ips []netip.Addr) []netip.Addr {
	slices.SortFunc(ips, netip.Addr.Compare)
	return slices.Compact(ips)
}

// parseOfFamily parses an external or load balancer address, unmapping an
// IPv4-mapped one, and reports whether it is a usable address of family f.
func parseOfFamily(s string, f IPFamily) (netip.Addr, bool) {
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" {
		return netip.Addr{}, false
	}
	ip = ip.Unmap()
	return ip, f.Has(ip) && !ip.IsUnspecified()
}

// sourceRanges returns the loadBalancerSourceRanges of family f, masked,
// sorted and unique; nil when they allow every source of f. As in
// kube-proxy (MapCIDRsByIPFamily, then IsZeroCIDR), ranges of the other
// family and ranges that do not parse are ignored, so:
//   - a zero-length prefix of f (0.0.0.0/0, ::/0) allows every source of f,
//     as no range does; one of the other family (::/0 for IPv4) is that
//     family's business and changes nothing for f;
//   - a Service whose ranges are all of the other family has none of f,
//     and its load balancer IPs of f allow every source, as kube-proxy's
//     proxier of f writes no firewall for them.
//
// An IPv4-mapped range (::ffff:10.0.0.0/104) is the IPv4 range it carries,
// as net.ParseCIDR reads it. Validation lets whitespace around a range
// through; kube-proxy trims it.
func sourceRanges(ranges []string, f IPFamily) []netip.Prefix {
	var out []netip.Prefix
	for _, r := range ranges {
		p, err := netip.ParsePrefix(strings.TrimSpace(r))
		if err != nil {
			continue
		}
		p = UnmapPrefix(p)
		if !f.Has(p.Addr()) {
			continue
		}
		if p.Bits() == 0 {
			return nil
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}

// comparePortNames orders the ports of one service: by name, then protocol.
func comparePortNames(a, b ServicePortName) int {
	if c := cmp.Compare(a.Port, b.Port); c != 0 {
		return c
	}
	return cmp.Compare(a.Protocol, b.Protocol)
}

// protocolFrom maps an API protocol to ours; the API defaults an empty
// protocol to TCP.
func protocolFrom(p v1.Protocol) (Protocol, bool) {
	switch p {
	case v1.ProtocolTCP, "":
		return TCP, true
	case v1.ProtocolUDP:
		return UDP, true
	default:
		return 0, false
	}
}
