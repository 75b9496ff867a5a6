package ebpf

// Names of the command-line flags that size the maps, each after what it
// counts, so that errors about a full map can say which one to raise:
//
//	--bpf-service-ports-max  service ids: one per Service port and protocol
//	                         (kbp_svc_stats, kbp_cluster_ips)
//	--bpf-backend-slots-max  backend references summed over all service
//	                         ports (kbp_slots, kbp_backends, kbp_aff_match)
//	--bpf-sock-revnat-max    open translated sockets (kbp_revnat)
//	--bpf-frontends-max      frontends: ClusterIP, node port, external and
//	                         load balancer addresses (kbp_services)
//	--bpf-affinity-max       ClientIP affinity entries (kbp_affinity)
const (
	FlagMaxServices  = "bpf-service-ports-max"
	FlagMaxBackends  = "bpf-backend-slots-max"
	FlagMaxRevNAT    = "bpf-sock-revnat-max"
	FlagMaxFrontends = "bpf-frontends-max"
	FlagMaxAffinity  = "bpf-affinity-max"
)

// DeprecatedFlagNames are the names the capacity flags had before they were
// named after what they size; the command still accepts them, with a
// warning.
var DeprecatedFlagNames = map[string]string{
	"bpf-max-services":  FlagMaxServices,
	"bpf-max-backends":  FlagMaxBackends,
	"bpf-max-sockets":   FlagMaxRevNAT,
	"bpf-max-frontends": FlagMaxFrontends,
	"bpf-max-affinity":  FlagMaxAffinity,
}

// FlagHostNetNSOnly names the flag that confines socket-level load
// balancing to the node's own network namespace (Config.HostNetNSOnly).
const FlagHostNetNSOnly = "bpf-socket-lb-host-netns-only"

// Defaults hold 64k service ports and 256k backends.
const (
	DefaultMaxServices = 65536
	DefaultMaxBackends = 262144
	// DefaultMaxRevNAT bounds the open sockets whose replies and peer names
	// are translated back to the frontend. Each entry goes when its socket
	// closes; a socket translated while the map is full shows the backend's
	// address (counted as reverse_entry_update_failed).
	DefaultMaxRevNAT = 262144
	// DefaultMaxFrontends holds a ClusterIP and three node addresses'
	// NodePorts (or external IPs) for each of DefaultMaxServices ports.
	DefaultMaxFrontends = 4 * DefaultMaxServices
	// DefaultMaxAffinity bounds the (client network namespace, Service
	// port) pairs whose session affinity is remembered, as Cilium's
	// default does; the least recently used is forgotten first.
	DefaultMaxAffinity = 65536
)
