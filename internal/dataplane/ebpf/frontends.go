package ebpf

import (
	"math"
	"net/netip"
	"slices"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// socketFrontend is one address a socket on the node reaches a service port
// by, as the programs serve it.
type socketFrontend struct {
	model.Frontend
	// kind holds the entry's kind flags: svcFlagNodePort or
	// svcFlagExternal (none for a ClusterIP), and svcFlagNodeNetNSOnly
	// for a loopback address.
	kind uint32
}

// socketFrontends lists the frontends of p that the socket programs serve
// on this node, its ClusterIP first:
//
//   - the ClusterIP;
//   - the NodePort on each of node.NodePortAddresses, which holds a
//     loopback address only when --nodeport-addresses named it. A loopback
//     frontend is the node's own: served to sockets in the node's network
//     namespace only, since 127.0.0.1 in a pod is the pod's;
//   - the port on each external IP that is the node's own address. An
//     external IP elsewhere is left alone at connect(); its packets go
//     through the node's stack, where the packet layer's iptables rules
//     (kube-proxy's, in nat PREROUTING and OUTPUT) serve it for the node
//     and its pods as kube-proxy does. So a Service naming someone else's
//     address still intercepts the node's and pods' traffic to it, as
//     under kube-proxy (CVE-2020-8554): only admission control prevents
//     that;
//   - the port on each LoadBalancer IP, unless loadBalancerSourceRanges
//     restrict it: the source address decides then, and a socket has none
//     at connect(), so the iptables rules serve it.
//
// An external IP or LoadBalancer IP that is host-scoped (model.HostScoped:
// loopback, link-local, multicast, broadcast) is never served: the programs
// run in every pod's namespace, where it names the pod's own loopback, its
// link's peers or groups (127.0.0.53:53, a sidecar on 127.0.0.1), which no
// Service may take over. kube-proxy's rules cannot take them either: a
// pod's loopback traffic never reaches the node's. The model reports such
// Services (model.ReasonHostScopedExternalIP).
func socketFrontends(p *model.ServicePort, node *model.NodeInfo) []socketFrontend {
	out := []socketFrontend{{Frontend: p.ClusterIP}}
	ext := &p.External
	proto := p.ClusterIP.Protocol
	if ext.NodePort != 0 {
		for _, ip := range node.NodePortAddresses {
			kind := svcFlagNodePort
			if ip.IsLoopback() {
				kind |= svcFlagNodeNetNSOnly
			}
			out = append(out, socketFrontend{model.Frontend{IP: ip, Port: ext.NodePort, Protocol: proto}, kind})
		}
	}
	for _, ip := range ext.ExternalIPs {
		if model.HostScoped(ip) {
			continue
		}
		if _, local := slices.BinarySearchFunc(node.LocalAddresses, ip, netip.Addr.Compare); !local {
			continue
		}
		out = append(out, socketFrontend{model.Frontend{IP: ip, Port: p.ClusterIP.Port, Protocol: proto}, svcFlagExternal})
	}
	if len(ext.SourceRanges) == 0 {
		for _, ip := range ext.LoadBalancerIPs {
			if model.HostScoped(ip) {
				continue
			}
			out = append(out, socketFrontend{model.Frontend{IP: ip, Port: p.ClusterIP.Port, Protocol: proto}, svcFlagExternal})
		}
	}
	return out
}

// frontendClaim is the service port a frontend of a snapshot is served for.
type frontendClaim struct {
	port *model.ServicePort
	kind uint32
}

// frontendConflict is a frontend two service ports name: kept serves it,
// skipped does not.
type frontendConflict struct {
	fe            model.Frontend
	kept, skipped model.ServicePortName
}

// claimFrontends maps each frontend of snap to the service port that serves
// it, and lists the ports left without a frontend they name. ClusterIPs
// come first, each to the first port in name order (a Service whose
// ClusterIP was reused before the old one's deletion arrived: the API gives
// each to one Service). Then the external frontends, which two Services may
// both name (an external IP or a LoadBalancer IP and port): nothing one
// Service holds may change what another serves, so the port holderOf says
// serves one now keeps it while it still names it, and when its Service is
// not in a partial snapshot; a frontend no port holds goes to the first
// port naming it in name order. holderOf returns the zero name for a
// frontend nothing serves, or whose port is unknown (after a restart);
// nil: none is held.
func claimFrontends(snap *model.Snapshot, holderOf func(model.Frontend) model.ServicePortName) (map[model.Frontend]frontendClaim, []frontendConflict) {
	claimed := make(map[model.Frontend]frontendClaim)
	var conflicts []frontendConflict
	names := sortedServiceNames(snap.Services)
	claim := func(p *model.ServicePort, f socketFrontend) {
		if other, dup := claimed[f.Frontend]; dup {
			if other.port != p {
				conflicts = append(conflicts, frontendConflict{fe: f.Frontend, kept: other.port.Name, skipped: p.Name})
			}
			return
		}
		claimed[f.Frontend] = frontendClaim{port: p, kind: f.kind}
	}
	for _, name := range names {
		ports := snap.Services[name]
		for i := range ports {
			claim(&ports[i], socketFrontend{Frontend: ports[i].ClusterIP})
		}
	}
	type external struct {
		port *model.ServicePort
		f    socketFrontend
	}
	var rest []external
	for _, name := range names {
		ports := snap.Services[name]
		for i := range ports {
			p := &ports[i]
			for _, f := range socketFrontends(p, &snap.Node)[1:] {
				var holder model.ServicePortName
				if holderOf != nil {
					holder = holderOf(f.Frontend)
				}
				switch {
				case holder == p.Name:
					claim(p, f)
				case holder == model.ServicePortName{}:
					rest = append(rest, external{p, f})
				default:
					if _, in := snap.Services[holder.ServiceName]; !in && !snap.Full {
						// Its holder's Service is not in this partial
						// snapshot: it keeps it.
						conflicts = append(conflicts, frontendConflict{fe: f.Frontend, kept: holder, skipped: p.Name})
						continue
					}
					// Its holder claims it above if it still names it.
					rest = append(rest, external{p, f})
				}
			}
		}
	}
	for _, e := range rest {
		claim(e.port, e.f)
	}
	return claimed, conflicts
}

// claimedFrontends lists the frontends of p that claims gives it, in
// socketFrontends order.
func claimedFrontends(p *model.ServicePort, node *model.NodeInfo, claims map[model.Frontend]frontendClaim) []socketFrontend {
	var out []socketFrontend
	for _, f := range socketFrontends(p, node) {
		if claims[f.Frontend].port == p {
			out = append(out, f)
		}
	}
	return out
}

// groupPlan is what one service id is to hold: frontends that share a
// backend list.
type groupPlan struct {
	// frontends are in socketFrontends order: the ClusterIP, if any,
	// first.
	frontends []socketFrontend
	backends  []model.Backend
	// flags are the group flags of each frontend's entry.
	flags uint32
	// timeout is the session affinity timeout in seconds, when flags
	// has svcFlagAffinity.
	timeout uint32
}

// groupsOf splits the frontends of p into service ids by backend list.
// The ClusterIP's connections go to p.Backends (its internal traffic
// policy's endpoints); those to external frontends from sockets on the
// node go to the Cluster endpoints whatever the external traffic policy
// (kube-proxy's short circuit of traffic from the node and its pods). The
// two lists differ only under internalTrafficPolicy Local, which then takes
// two ids; otherwise every frontend of the port shares one.
func groupsOf(p *model.ServicePort, frontends []socketFrontend) []groupPlan {
	var flags, timeout uint32
	if p.Affinity > 0 {
		flags = svcFlagAffinity
		timeout = affinitySeconds(p.Affinity)
	}
	internal := groupPlan{backends: p.Backends, flags: flags, timeout: timeout}
	if len(p.Backends) == 0 && p.HasEndpoints && p.InternalLocal {
		internal.flags |= svcFlagNoLocalEndpoint
	}
	external := groupPlan{backends: clusterBackends(p), flags: flags, timeout: timeout}
	for _, f := range frontends {
		if f.Frontend == p.ClusterIP {
			internal.frontends = append(internal.frontends, f)
		} else {
			external.frontends = append(external.frontends, f)
		}
	}
	if internal.flags == external.flags && slices.Equal(internal.backends, external.backends) {
		internal.frontends = append(internal.frontends, external.frontends...)
		external.frontends = nil
	}
	var out []groupPlan
	for _, g := range []groupPlan{internal, external} {
		if len(g.frontends) > 0 {
			out = append(out, g)
		}
	}
	return out
}

// clusterBackends are the endpoints of p's Cluster traffic policy. The
// model fills Cluster whenever a policy uses it, aliasing Backends when
// equal; under internalTrafficPolicy Cluster the two are the same list.
func clusterBackends(p *model.ServicePort) []model.Backend {
	if !p.InternalLocal {
		return p.Backends
	}
	return p.Cluster
}

// affinitySeconds is a session affinity timeout as the programs compare it:
// whole seconds, at least one.
func affinitySeconds(d time.Duration) uint32 {
	s := (d + time.Second - 1) / time.Second
	return uint32(min(max(s, 1), math.MaxUint32))
}
