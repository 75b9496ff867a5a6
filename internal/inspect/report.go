// Package inspect is `kube-bpf-proxy inspect`: it shows what a node's
// datapath serves, per Service port, read from the pinned BPF maps (ebpf
// mode) or from the iptables rules (iptables mode), and where that differs
// from what the API server's Services and EndpointSlices say the node
// should serve now.
//
// The Report type is the schema of `-o json`; docs/operations.md
// ("Inspecting a node's datapath") documents it. Fields are only added,
// never renamed or removed.
package inspect

// Report is what one run of inspect found.
type Report struct {
	// Node is the node name the expected state was computed for
	// (--hostname-override, $NODE_NAME, the hostname).
	Node string `json:"node"`
	// Mode is the datapath read: "ebpf" or "iptables".
	Mode string `json:"mode"`
	// Source is where it was read: the pin directory, or
	// "iptables-nft" / "iptables-legacy" (with "ip6tables-nft" /
	// "ip6tables-legacy" for IPv6, joined by " and " when both).
	Source string `json:"source"`
	// Families are the address families checked, "IPv4" and/or "IPv6":
	// those the datapath holds, and those the API server's Services
	// have where the datapath serves them (a family it does not serve
	// is a warning); IPv4 when neither says.
	Families []string `json:"families"`
	// API says whether the datapath was compared with the API server.
	API APIStatus `json:"api"`
	// ServicePorts are sorted by Service, port name and protocol; ports
	// whose Service the datapath does not name (ebpf mode without the
	// API) come last, by frontend.
	ServicePorts []ServicePort `json:"servicePorts"`
	// Differences counts the differences over all ports: 0 means the
	// datapath holds what the API server says (or, not compared, is
	// consistent in itself).
	Differences int `json:"differences"`
	// Events are the eBPF programs' node-wide event counters, summed
	// over CPUs: those of the kube_bpf_proxy_datapath_events_total
	// metric that the programs count, by the same names.
	Events map[string]uint64 `json:"events,omitempty"`
	// Warnings are what limited the comparison (a filter that cannot
	// apply, say).
	Warnings []string `json:"warnings,omitempty"`
}

// APIStatus says whether and how the API server was read.
type APIStatus struct {
	// Compared: the datapath was compared with the Services and
	// EndpointSlices listed from the API server.
	Compared bool `json:"compared"`
	// Server is the API server's URL, when one was configured.
	Server string `json:"server,omitempty"`
	// Error is why the comparison was not made.
	Error string `json:"error,omitempty"`
}

// ServicePort is one port of a Service: what the datapath holds for it and,
// when compared, what it should hold.
type ServicePort struct {
	// Service is "namespace/name"; empty when the datapath does not say
	// (the BPF maps hold no names) and the API was not read.
	Service string `json:"service,omitempty"`
	// Port is the port's name in the Service ("" for a single unnamed
	// port).
	Port string `json:"port,omitempty"`
	// Protocol is TCP or UDP.
	Protocol string `json:"protocol"`
	// Family is the address family, "IPv4" or "IPv6": a dual-stack
	// Service has a port of each, compared with that family's maps or
	// rules (kbp_* or kbp6_*; iptables or ip6tables).
	Family string `json:"ipFamily"`
	// Frontends are the addresses clients reach the port by.
	Frontends []Frontend `json:"frontends"`
	// Backends are the endpoints: those the datapath holds, and when
	// compared those the API lists for the port.
	Backends []Backend `json:"backends"`
	// AffinitySeconds is the ClientIP session affinity timeout the
	// datapath holds (the API's, when the port is missing); 0 for none.
	AffinitySeconds uint32 `json:"affinitySeconds,omitempty"`
	// InternalTrafficPolicy and ExternalTrafficPolicy are "Cluster" or
	// "Local": the Service's when compared, else what the datapath's
	// shape shows (empty when it does not).
	InternalTrafficPolicy string `json:"internalTrafficPolicy,omitempty"`
	ExternalTrafficPolicy string `json:"externalTrafficPolicy,omitempty"`
	// Counters are the eBPF datapath's counters of the port (summed over
	// its service ids); absent in iptables mode.
	Counters *Counters `json:"counters,omitempty"`
	// Status is "ok" (the datapath holds what the API says), "missing"
	// (the API has the port, the datapath nothing of it), "extra" (the
	// datapath serves a port the API does not have), "differs" (see
	// Differences), or "unchecked" (not compared with the API).
	Status string `json:"status"`
	// Differences say what differs, one sentence each.
	Differences []string `json:"differences,omitempty"`
}

// Port statuses.
const (
	StatusOK        = "ok"
	StatusMissing   = "missing"
	StatusExtra     = "extra"
	StatusDiffers   = "differs"
	StatusUnchecked = "unchecked"
)

// Frontend is an address of a service port.
type Frontend struct {
	// Kind is ClusterIP, NodePort, ExternalIP, LoadBalancerIP, or
	// External (an external IP or a LoadBalancer IP, where the datapath
	// does not tell them apart).
	Kind string `json:"kind"`
	// Address is "ip:port"; a node port served on every local address
	// (iptables mode) is "*:port".
	Address string `json:"address"`
	// InDatapath: the datapath holds it (false: expected, missing).
	InDatapath bool `json:"inDatapath"`
	// Layer, in ebpf mode: "socket" (the BPF maps: what sockets on the
	// node reach) or "packet" (the packet layer's iptables rules: what
	// packets from outside the node reach). Empty in iptables mode.
	Layer string `json:"layer,omitempty"`
}

// Backend is an endpoint of a service port.
type Backend struct {
	// Address is "ip:port".
	Address string `json:"address"`
	// State is the endpoint's state in its EndpointSlice when compared:
	// "ready", "terminating" (serving while its pod is deleted),
	// "serving" (serving, not ready), "not-serving", or "unknown" (no
	// EndpointSlice lists it). Not compared, it is "active": the
	// datapath sends new connections to it.
	State string `json:"state"`
	// Policies are the traffic policies' backend lists the datapath
	// holds it in: "cluster" (every endpoint) and "local" (this node's,
	// for internalTrafficPolicy or externalTrafficPolicy Local); in ebpf
	// mode also "packet-cluster" and "packet-local", the packet layer's
	// lists. Empty: the datapath does not send new connections to it.
	Policies []string `json:"policies"`
	// Local: the endpoint is on this node (known when compared).
	Local *bool `json:"local,omitempty"`
	// Weight is how many of the port's eBPF slots it holds (its share of
	// new connections); absent in iptables mode, where endpoints are
	// picked with equal probability.
	Weight int `json:"weight,omitempty"`
}

// Counters are an eBPF service port's counters.
type Counters struct {
	Connections uint64 `json:"connections"`
	Datagrams   uint64 `json:"datagrams"`
	Refused     uint64 `json:"refused"`
	Reverse     uint64 `json:"reverse"`
}
