// Package model is the proxy's picture of what the datapath must serve: service
// ports, their frontends and the backends chosen for them. It is pure Go: it
// takes Kubernetes API objects at its edge and hands out its own types, so the
// datapaths never see client-go or API types and the model never sees a kernel.
package model

import (
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Protocol is an IP protocol number as the kernel uses it.
type Protocol uint8

const (
	TCP Protocol = 6
	UDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	default:
		return fmt.Sprintf("proto-%d", uint8(p))
	}
}

// ServiceName identifies a Service object.
type ServiceName struct {
	Namespace string
	Name      string
}

func (n ServiceName) String() string { return n.Namespace + "/" + n.Name }

// ServicePortName identifies one port of a Service. The protocol is part of
// it: TCP and UDP on the same port number are different service ports.
type ServicePortName struct {
	ServiceName
	Port     string // the port's name in the Service spec; "" for a single unnamed port
	Protocol Protocol
}

func (n ServicePortName) String() string {
	return fmt.Sprintf("%s:%s/%s", n.ServiceName, n.Port, n.Protocol)
}

// Frontend is an address clients connect to: (IP, port, protocol).
type Frontend struct {
	IP       netip.Addr
	Port     uint16
	Protocol Protocol
}

func (f Frontend) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.IP, f.Port), f.Protocol)
}

// Backend is one endpoint a frontend forwards to. Its protocol is the
// frontend's.
type Backend struct {
	IP   netip.Addr
	Port uint16
}

func (b Backend) String() string { return netip.AddrPortFrom(b.IP, b.Port).String() }

// AddrPortSet returns the backends as a set of address:port pairs, for
// matching flows and sockets against them.
func AddrPortSet(backends []Backend) map[netip.AddrPort]bool {
	set := make(map[netip.AddrPort]bool, len(backends))
	for _, b := range backends {
		set[netip.AddrPortFrom(b.IP, b.Port)] = true
	}
	return set
}

// Compare orders backends by address, then port.
func (b Backend) Compare(o Backend) int {
	if c := b.IP.Compare(o.IP); c != 0 {
		return c
	}
	return int(b.Port) - int(o.Port)
}

// ServicePort is one port of a Service as the datapath serves it: its
// frontends and the backends chosen for each kind of traffic by kube-proxy's
// endpoint selection rules (ready endpoints, else serving-and-terminating
// ones; topology hints; traffic policies). Every backend list is sorted and
// unique; nil means none.
type ServicePort struct {
	Name      ServicePortName
	ClusterIP Frontend
	// Backends take new connections to the ClusterIP: the internal
	// traffic policy's endpoints (Cluster when InternalLocal is false,
	// Local when it is true). Empty means the ClusterIP refuses
	// connections (no endpoint anywhere) or drops them (InternalLocal
	// with endpoints on other nodes only, see HasEndpoints).
	Backends []Backend
	// Serving lists every endpoint whose serving condition holds, chosen for
	// new connections or not (a terminating pod still draining, a pod that
	// serves but is not ready): sorted, unique, nil when empty. Flows and
	// sockets already established to one of them are left alone, as
	// kube-proxy keeps UDP conntrack entries to serving endpoints; those to
	// any other backend are stale. It aliases Backends when the two are
	// equal, which is the common case.
	Serving []Backend
	// Cluster holds the endpoints of the Cluster traffic policy, topology
	// hints applied (kube-proxy's clusterEndpoints); Local this node's
	// endpoints (its localEndpoints). Each is filled only when the port's
	// policies use it (UsesCluster, UsesLocal), and aliases Backends when
	// equal to it.
	Cluster []Backend
	Local   []Backend
	// LocalTerminating: Local holds this node's serving and terminating
	// endpoints, as none of its endpoints is ready. The health check node
	// port counts only ready ones.
	LocalTerminating bool
	// HealthCheckLocal holds this node's ready endpoints for the health
	// check node port of a port whose policies leave Local empty: one not
	// reachable from outside (kube-proxy serves its health check all the
	// same). Nil otherwise: Local serves the count.
	HealthCheckLocal []Backend
	// HasEndpoints: the service port has a usable endpoint somewhere in
	// the cluster. kube-proxy rejects traffic to a port without one, and
	// drops traffic a Local policy cannot serve on this node when there is
	// one elsewhere (the client retries, another node may serve it).
	HasEndpoints bool
	// InternalLocal: internalTrafficPolicy Local.
	InternalLocal bool
	// Affinity is the ClientIP session affinity timeout; zero means no
	// affinity.
	Affinity time.Duration
	// External holds the port's frontends reachable from outside the
	// cluster; its zero value means none.
	External External
}

// External is what makes a service port reachable from outside the
// cluster, for one IP family.
type External struct {
	// NodePort is the port opened on the node's addresses; 0 for none.
	NodePort uint16
	// ExternalIPs are spec.externalIPs, sorted and unique.
	ExternalIPs []netip.Addr
	// LoadBalancerIPs are the status ingress IPs of ipMode VIP (or unset),
	// sorted and unique; an ipMode Proxy ingress is reached through the
	// load balancer, which forwards to node ports.
	LoadBalancerIPs []netip.Addr
	// SourceRanges are loadBalancerSourceRanges, sorted and unique; nil
	// allows every source. They filter load balancer IP traffic only.
	SourceRanges []netip.Prefix
	// PolicyLocal: externalTrafficPolicy Local. External traffic goes to
	// this node's endpoints only and keeps its source address; traffic
	// from the node or its pods still goes to the cluster's endpoints.
	PolicyLocal bool
	// HealthCheckNodePort is served with this node's local endpoint count
	// for a LoadBalancer Service of externalTrafficPolicy Local, even on a
	// port that is not Accessible (PolicyLocal is false there); 0 for none.
	HealthCheckNodePort uint16
}

// Equal reports whether two External are the same.
func (e External) Equal(o External) bool {
	return e.NodePort == o.NodePort && e.PolicyLocal == o.PolicyLocal && e.HealthCheckNodePort == o.HealthCheckNodePort &&
		slices.Equal(e.ExternalIPs, o.ExternalIPs) && slices.Equal(e.LoadBalancerIPs, o.LoadBalancerIPs) &&
		slices.Equal(e.SourceRanges, o.SourceRanges)
}

// Accessible reports whether the port has any external frontend.
func (e External) Accessible() bool {
	return e.NodePort != 0 || len(e.ExternalIPs) > 0 || len(e.LoadBalancerIPs) > 0
}

// UsesCluster reports whether any traffic to the port goes to Cluster
// endpoints: the ClusterIP's under internalTrafficPolicy Cluster, or
// external traffic, whose sources inside the cluster are always sent to
// them (kube-proxy's "short circuit").
func (sp *ServicePort) UsesCluster() bool {
	return !sp.InternalLocal || sp.External.Accessible()
}

// UsesLocal reports whether any traffic to the port goes to this node's
// endpoints only.
func (sp *ServicePort) UsesLocal() bool {
	return sp.InternalLocal || (sp.External.PolicyLocal && sp.External.Accessible())
}

// ExternalBackends are the endpoints for traffic arriving from outside the
// node at an external frontend: Local under externalTrafficPolicy Local,
// else Cluster; nil for a port without external frontends.
func (sp *ServicePort) ExternalBackends() []Backend {
	if !sp.External.Accessible() {
		return nil
	}
	if sp.External.PolicyLocal {
		return sp.Local
	}
	return sp.Cluster
}

// Snapshot is the desired state handed to a datapath in one sync.
//
// A full snapshot lists every service to serve; anything a datapath serves
// that is not in it must go. A partial snapshot lists only the services that
// changed since the previous snapshot; a changed service that is gone, or has
// nothing left to serve, maps to an empty slice.
type Snapshot struct {
	Full     bool
	Services map[ServiceName][]ServicePort
	// TriggerTimes holds, per Service, the last-change-trigger-time of
	// each EndpointSlice change this snapshot is the first to include
	// (only changes made after the Tracker started that changed what is
	// served; a change to a slice that came before its Service is
	// included with the Service's arrival); nil if none. The
	// proxy observes now minus each one once the snapshot is programmed,
	// as kube-proxy's network programming latency. Datapaths ignore it.
	TriggerTimes map[ServiceName][]time.Time
	// Node is what the datapath needs to know of this node, in every
	// snapshot, full or partial. When it changes the next snapshot is a
	// full one, unless the datapath takes node changes in partial ones
	// (the iptables rules rewrite only what reads the node).
	Node NodeInfo
}

// NodeInfo is what the datapaths need to know of the node they run on, for
// one address family: a proxier of each family gets its own.
type NodeInfo struct {
	// NodePortAddresses are the node's addresses of the proxier's family
	// node ports are served on: those matching --nodeport-addresses, or
	// with none given (or none of this family) every address of the node
	// of this family but loopback ones, sorted. An IPv4 loopback address
	// is here only when --nodeport-addresses names it; an IPv6 one never
	// is, as kube-proxy never serves node ports on ::1.
	NodePortAddresses []netip.Addr
	// AllLocalAddresses: --nodeport-addresses names no CIDR of the
	// proxier's family (or a zero-length one), so node ports are served on
	// whatever address of the family is local when a packet arrives
	// (iptables: -m addrtype --dst-type LOCAL, as kube-proxy).
	AllLocalAddresses bool
	// LocalAddresses are every address of the node of the proxier's
	// family, loopback and link-local included, sorted: an external IP is
	// local when it is one of them.
	LocalAddresses []netip.Addr
	// ServiceCIDRs are the cluster's Service IP ranges of the proxier's
	// family, from the ServiceCIDR objects, or the flag when they cannot
	// be read; sorted. Traffic to an address in them that is no Service's
	// is refused, as kube-proxy does; nil refuses nothing.
	ServiceCIDRs []netip.Prefix
	// ForeignClusterIPs are the ClusterIPs of the Services another proxy
	// serves (labelled service.kubernetes.io/service-proxy-name), which
	// are in no snapshot's Services, sorted and unique: a datapath that
	// refuses unallocated Service addresses leaves them alone, as
	// kube-proxy leaves them, for that proxy to serve.
	ForeignClusterIPs []netip.Addr
}

// Equal reports whether two NodeInfo are the same.
func (n NodeInfo) Equal(o NodeInfo) bool {
	return n.AllLocalAddresses == o.AllLocalAddresses && slices.Equal(n.NodePortAddresses, o.NodePortAddresses) &&
		slices.Equal(n.LocalAddresses, o.LocalAddresses) &&
		slices.Equal(n.ServiceCIDRs, o.ServiceCIDRs) && slices.Equal(n.ForeignClusterIPs, o.ForeignClusterIPs)
}
