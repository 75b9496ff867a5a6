package model

import (
	"net/netip"
	"strings"

	v1 "k8s.io/api/core/v1"
)

// Feature is something a Service can ask for that the proxy does not serve
// yet: a Service using one is served on its ClusterIP only, as if it did not
// ask. The values are stable: metrics use them as label values.
type Feature string

const (
	// FeatureSessionAffinity: sessionAffinity ClientIP.
	FeatureSessionAffinity Feature = "session-affinity"
	// FeatureInternalTrafficPolicyLocal: internalTrafficPolicy Local (every
	// endpoint is used, not only this node's).
	FeatureInternalTrafficPolicyLocal Feature = "internal-traffic-policy-local"
	// FeatureExternalTrafficPolicyLocal: externalTrafficPolicy Local (and the
	// health check node port that comes with it).
	FeatureExternalTrafficPolicyLocal Feature = "external-traffic-policy-local"
	// FeatureNodePort: node ports of a Service of type NodePort or
	// LoadBalancer.
	FeatureNodePort Feature = "node-port"
	// FeatureLoadBalancerIP: the ingress IPs of a LoadBalancer's status that
	// kube-proxy serves on the node (ipMode VIP or unset).
	FeatureLoadBalancerIP Feature = "load-balancer-ip"
	// FeatureLoadBalancerSourceRanges: loadBalancerSourceRanges. It filters
	// load balancer traffic, which is not served either; it is named apart
	// so that serving load balancer IPs without it cannot go unnoticed.
	FeatureLoadBalancerSourceRanges Feature = "load-balancer-source-ranges"
	// FeatureExternalIPs: spec.externalIPs.
	FeatureExternalIPs Feature = "external-ips"
	// FeatureTrafficDistribution: spec.trafficDistribution (the
	// EndpointSlice controller's zone or node hints are ignored).
	FeatureTrafficDistribution Feature = "traffic-distribution"
	// FeatureTopologyAwareRouting: the service.kubernetes.io/topology-mode
	// annotation (or its predecessor), which also makes the EndpointSlice
	// controller write hints that kube-proxy follows.
	FeatureTopologyAwareRouting Feature = "topology-aware-routing"
)

// Topology annotations of a Service: kube-proxy follows the hints the
// EndpointSlice controller writes when either is set to anything but
// "Disabled". k8s.io/api defines neither (upstream keeps them in
// k8s.io/kubernetes), so they are spelled out here.
const (
	annotationTopologyMode        = "service.kubernetes.io/topology-mode"
	annotationTopologyAwareHints  = "service.kubernetes.io/topology-aware-hints"
	annotationTopologyModeDisable = "disabled"
)

// features is a set of Features, one bit each, in the order of allFeatures.
type features uint16

var allFeatures = [...]Feature{
	FeatureSessionAffinity,
	FeatureInternalTrafficPolicyLocal,
	FeatureExternalTrafficPolicyLocal,
	FeatureNodePort,
	FeatureLoadBalancerIP,
	FeatureLoadBalancerSourceRanges,
	FeatureExternalIPs,
	FeatureTrafficDistribution,
	FeatureTopologyAwareRouting,
}

// UnservedFeatures lists every Feature in a stable order, for callers that
// export all of them (a metric at zero rather than absent).
func UnservedFeatures() []Feature {
	out := make([]Feature, len(allFeatures))
	copy(out, allFeatures[:])
	return out
}

func featureBit(f Feature) features {
	for i, g := range allFeatures {
		if g == f {
			return 1 << i
		}
	}
	return 0
}

// list returns the Features of s in the order of allFeatures; nil if none.
func (s features) list() []Feature {
	var out []Feature
	for i, f := range allFeatures {
		if s&(1<<i) != 0 {
			out = append(out, f)
		}
	}
	return out
}

// strings is list as plain strings, for logs.
func (s features) strings() []string {
	var out []string
	for _, f := range s.list() {
		out = append(out, string(f))
	}
	return out
}

// unservedFeatures returns what svc asks for that the proxy does not serve.
func unservedFeatures(svc *v1.Service) features {
	var s features
	spec := &svc.Spec
	if spec.SessionAffinity == v1.ServiceAffinityClientIP {
		s |= featureBit(FeatureSessionAffinity)
	}
	if spec.InternalTrafficPolicy != nil && *spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal {
		s |= featureBit(FeatureInternalTrafficPolicyLocal)
	}
	// API validation allows Local only on Services reachable from outside
	// (node ports, load balancer or external IPs).
	if spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal {
		s |= featureBit(FeatureExternalTrafficPolicyLocal)
	}
	if spec.Type == v1.ServiceTypeNodePort || spec.Type == v1.ServiceTypeLoadBalancer {
		// A LoadBalancer with allocateLoadBalancerNodePorts false has none.
		for i := range spec.Ports {
			if spec.Ports[i].NodePort != 0 {
				s |= featureBit(FeatureNodePort)
				break
			}
		}
	}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		// An ingress of ipMode Proxy is reached through the load balancer,
		// which forwards to node ports: kube-proxy serves nothing for it.
		if ing.IP != "" && (ing.IPMode == nil || *ing.IPMode == v1.LoadBalancerIPModeVIP) {
			s |= featureBit(FeatureLoadBalancerIP)
			break
		}
	}
	if hasSourceRanges(spec.LoadBalancerSourceRanges) {
		s |= featureBit(FeatureLoadBalancerSourceRanges)
	}
	if len(spec.ExternalIPs) > 0 {
		s |= featureBit(FeatureExternalIPs)
	}
	if spec.TrafficDistribution != nil && *spec.TrafficDistribution != "" {
		s |= featureBit(FeatureTrafficDistribution)
	}
	for _, key := range []string{annotationTopologyMode, annotationTopologyAwareHints} {
		if v, ok := svc.Annotations[key]; ok && v != "" && !strings.EqualFold(v, annotationTopologyModeDisable) {
			s |= featureBit(FeatureTopologyAwareRouting)
			break
		}
	}
	return s
}

// hasSourceRanges reports whether ranges restrict IPv4 sources, the only
// family served: as in kube-proxy, ranges of the other family and ranges
// that do not parse are ignored, and a zero-length prefix (0.0.0.0/0)
// allows every source, as no range does. Validation lets whitespace around
// a range through; kube-proxy trims it.
func hasSourceRanges(ranges []string) bool {
	restricted := false
	for _, r := range ranges {
		p, err := netip.ParsePrefix(strings.TrimSpace(r))
		if err != nil || !p.Addr().Is4() {
			continue
		}
		if p.Bits() == 0 {
			return false
		}
		restricted = true
	}
	return restricted
}
