package ebpf

// Names of the command-line flags that size the maps, so that errors about a
// full map can say which one to raise.
const (
	FlagMaxServices = "bpf-max-services"
	FlagMaxBackends = "bpf-max-backends"
	FlagMaxRevNAT   = "bpf-max-sockets"
)

// Defaults hold 64k service ports and 256k backends.
const (
	DefaultMaxServices = 65536
	DefaultMaxBackends = 262144
	// DefaultMaxRevNAT bounds the sockets whose replies and peer names are
	// translated back to the frontend; the least recently used entry goes
	// first when it is full.
	DefaultMaxRevNAT = 262144
)
