package healthcheck

import (
	"net/netip"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// FromSnapshot derives what to serve from the full desired state (every
// Service, as a full snapshot lists them): ports holds the health check
// node port of each Service that has one, and local its count of local
// endpoints, for SyncServices and SyncEndpoints.
//
// A Service has a port when one of its ports has
// External.HealthCheckNodePort set, which the model does only for a
// LoadBalancer Service with externalTrafficPolicy Local (kube-proxy's
// NeedsHealthCheck).
//
// The count follows kube-proxy's LocalReadyEndpoints: the number of
// distinct IP addresses among this node's endpoints over all the Service's
// ports, so that a pod serving ports 80 and 443 counts once. kube-proxy
// counts ready endpoints only: a node left with terminating endpoints only
// must fail its health check so that load balancers drain it. The model
// does not say whether a port's Local endpoints are ready ones or the
// serving-and-terminating fallback it uses when none is (see
// model.ServicePort.Local), so in that case they are counted here and the
// node keeps answering 200 until they are gone, where kube-proxy answers
// 503 at once. Closing that gap needs the model to tell the two apart.
func FromSnapshot(full map[model.ServiceName][]model.ServicePort) (ports map[model.ServiceName]uint16, local map[model.ServiceName]int) {
	ports = map[model.ServiceName]uint16{}
	local = map[model.ServiceName]int{}
	for name, sps := range full {
		var port uint16
		for i := range sps {
			if p := sps[i].External.HealthCheckNodePort; p != 0 && sps[i].External.PolicyLocal {
				port = p
				break
			}
		}
		if port == 0 {
			continue
		}
		ports[name] = port
		ips := map[netip.Addr]struct{}{}
		for i := range sps {
			for _, b := range sps[i].Local {
				ips[b.IP] = struct{}{}
			}
		}
		if len(ips) > 0 {
			local[name] = len(ips)
		}
	}
	return ports, local
}
