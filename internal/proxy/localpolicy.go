package proxy

import (
	"net/netip"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// localPolicy is what the proxy keeps of one Service for its Local traffic
// policies, across partial syncs: kube-proxy's no-local-endpoints gauge and
// the health check node port are about every Service, while a partial
// snapshot names only those that changed.
type localPolicy struct {
	// healthCheckNodePort is served for a LoadBalancer Service of
	// externalTrafficPolicy Local, whether or not any of its ports is
	// reachable from outside yet, as kube-proxy serves it; 0 for none.
	healthCheckNodePort uint16
	// localReady is the number of distinct addresses of this node's ready
	// endpoints, over all the Service's ports, as kube-proxy counts them
	// for the health check.
	localReady int
	// noLocalInternal and noLocalExternal count the Service's ports whose
	// Local policy has no endpoint on this node while some exist elsewhere
	// (the ports whose traffic kube-proxy drops).
	noLocalInternal, noLocalExternal int
}

// localPolicyOf derives a Service's entry from its ports; ok is false when
// it has nothing to record.
func localPolicyOf(ports []model.ServicePort) (lp localPolicy, ok bool) {
	for i := range ports {
		sp := &ports[i]
		if sp.External.HealthCheckNodePort != 0 {
			lp.healthCheckNodePort = sp.External.HealthCheckNodePort
		}
		if !sp.HasEndpoints {
			continue // no endpoints at all: rejected, not a Local policy's drop
		}
		if sp.InternalLocal && len(sp.Local) == 0 {
			lp.noLocalInternal++
		}
		if sp.External.PolicyLocal && sp.External.Accessible() && len(sp.Local) == 0 {
			lp.noLocalExternal++
		}
	}
	if lp.healthCheckNodePort != 0 {
		// Counted only for a health check: a full sync walks every
		// Service, and most have none.
		ready := make(map[netip.Addr]struct{})
		for i := range ports {
			if !ports[i].LocalTerminating {
				for _, b := range ports[i].Local {
					ready[b.IP] = struct{}{}
				}
			}
			for _, b := range ports[i].HealthCheckLocal {
				ready[b.IP] = struct{}{}
			}
		}
		lp.localReady = len(ready)
	}
	return lp, lp != localPolicy{}
}

// localPolicies is the proxy's view of every Service's Local policies.
type localPolicies map[model.ServiceName]localPolicy

// apply brings the view up to date with a snapshot that was programmed.
func (m localPolicies) apply(snap *model.Snapshot) {
	if snap.Full {
		clear(m)
	}
	for name, ports := range snap.Services {
		if lp, ok := localPolicyOf(ports); ok {
			m[name] = lp
		} else {
			delete(m, name)
		}
	}
}

// totals returns the ports without local endpoints per traffic policy.
func (m localPolicies) totals() (internal, external int) {
	for _, lp := range m {
		internal += lp.noLocalInternal
		external += lp.noLocalExternal
	}
	return internal, external
}

// healthChecks returns the health check node port and the local ready
// endpoint count of every Service that has one.
func (m localPolicies) healthChecks() (ports map[model.ServiceName]uint16, local map[model.ServiceName]int) {
	ports = make(map[model.ServiceName]uint16)
	local = make(map[model.ServiceName]int)
	for name, lp := range m {
		if lp.healthCheckNodePort != 0 {
			ports[name] = lp.healthCheckNodePort
			local[name] = lp.localReady
		}
	}
	return ports, local
}
