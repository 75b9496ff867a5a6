package dataplane

import "github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"

// ServicePortCounters is what a datapath counted for one service port since
// the port was programmed (or since its counters were created, for a port a
// restart adopted from an earlier version).
type ServicePortCounters struct {
	Name model.ServicePortName
	// Connections were translated to a backend at connect(): TCP, and UDP
	// sockets that connect; to any of the port's frontends (ClusterIP,
	// NodePort, external IP, LoadBalancer IP).
	Connections uint64
	// Datagrams were translated one by one at sendmsg(): UDP sockets that
	// do not connect.
	Datagrams uint64
	// Refused connects and datagrams failed with ECONNREFUSED: the port
	// had no backend, or none on this node under internalTrafficPolicy
	// Local (or, racing an update, found one missing).
	Refused uint64
	// ReverseTranslations showed the application the Service's address
	// instead of the backend's: received datagrams and getpeername().
	ReverseTranslations uint64
}

// MapUsage is how full one of a datapath's maps is.
type MapUsage struct {
	// Map names the map as the metrics label it: services (every
	// frontend: ClusterIPs, NodePorts, external and LoadBalancer IPs),
	// slots, backends, revnat (open translated sockets), service_stats,
	// affinity (session affinity of client namespaces), affinity_match,
	// cluster_ips.
	Map      string
	Entries  int
	Capacity int
}
