package ebpf

// Names of the command-line flags that size the maps, so that errors about a
// full map can say which one to raise.
const (
	FlagMaxServices  = "bpf-max-services"
	FlagMaxBackends  = "bpf-max-backends"
	FlagMaxRevNAT    = "bpf-max-sockets"
	FlagMaxFrontends = "bpf-max-frontends"
	FlagMaxAffinity  = "bpf-max-affinity"
)

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
