package inspect

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Backend lists of a datapath port. The iptables rules hold one per
// traffic policy (KUBE-SVC, KUBE-SVL); the BPF maps one per service id:
// the ClusterIP's (its internal traffic policy's endpoints) and, under
// internalTrafficPolicy Local with external frontends, the external
// frontends' (the Cluster endpoints).
const (
	listCluster  = "cluster"
	listLocal    = "local"
	listInternal = "internal" // ebpf: the ClusterIP's service id
	listExternal = "external" // ebpf: a service id without the ClusterIP
)

// Frontend categories, for matching: external IPs and LoadBalancer IPs are
// one category (the BPF maps do not tell them apart), and a node port is
// matched by its port alone (the eBPF maps hold one entry per node
// address, the iptables rules one for all).
const (
	catClusterIP = iota
	catNodePort
	catExternal
)

// feKey identifies a frontend for matching.
type feKey struct {
	cat   int
	addr  netip.Addr // invalid for a node port
	port  uint16
	proto model.Protocol
}

// dpFrontend is a frontend the datapath holds.
type dpFrontend struct {
	kind string
	// addr is invalid for a node port on every local address.
	addr  netip.Addr
	port  uint16
	proto model.Protocol
}

func (f dpFrontend) key() feKey {
	k := feKey{cat: catExternal, addr: f.addr, port: f.port, proto: f.proto}
	switch f.kind {
	case kindClusterIP:
		k.cat = catClusterIP
	case kindNodePort:
		k.cat, k.addr = catNodePort, netip.Addr{}
	}
	return k
}

func (f dpFrontend) address() string {
	if !f.addr.IsValid() {
		return "*:" + strconv.Itoa(int(f.port))
	}
	return netip.AddrPortFrom(f.addr, f.port).String()
}

const (
	kindClusterIP      = "ClusterIP"
	kindNodePort       = "NodePort"
	kindExternalIP     = "ExternalIP"
	kindLoadBalancerIP = "LoadBalancerIP"
	kindExternal       = "External"
)

// dpPort is what the datapath holds for one service port (ebpf mode: one
// service id, until matching joins a port's ids).
type dpPort struct {
	// name is known from the iptables rules' comments; the BPF maps
	// hold none.
	name  model.ServicePortName
	named bool
	proto model.Protocol
	// frontends in the datapath's order.
	frontends []dpFrontend
	// lists are the backend lists by listCluster/listLocal (iptables),
	// or (ebpf) listInternal, the ClusterIP's service id's, and
	// listExternal, that of the external frontends (the same id but
	// under internalTrafficPolicy Local), each sorted; a key is present
	// when the datapath holds a frontend using it.
	lists map[string][]model.Backend
	// weights are the eBPF slot counts of each backend (nil in iptables
	// mode).
	weights map[model.Backend]int
	// affinity is the session affinity timeout in seconds; 0 for none.
	affinity uint32
	// internalLocal, externalLocal: the rules show a Local policy
	// (iptables: the ClusterIP or KUBE-EXT jumps to KUBE-SVL; ebpf: the
	// no-local-endpoint flag).
	internalLocal, externalLocal bool
	counters                     *Counters
	// problems are inconsistencies within the datapath itself (a slot
	// without entry, a backend id without backend).
	problems []string
}

// idSpace names the IPv6 maps' service ids apart: each family has its own.
func idSpace(g ebpf.PinnedGroup) string {
	if g.Family == model.IPv6 {
		return "IPv6 "
	}
	return ""
}

// fromPinned turns the maps' service ids into datapath ports, one per id.
func fromPinned(pinned *ebpf.Pinned) []*dpPort {
	var out []*dpPort
	for _, g := range pinned.Groups {
		if len(g.Frontends) == 0 {
			continue
		}
		p := &dpPort{proto: g.Frontends[0].Protocol, lists: map[string][]model.Backend{}, weights: map[model.Backend]int{}}
		var roles []string
		for _, f := range g.Frontends {
			kind := kindExternal
			switch f.Kind {
			case ebpf.KindClusterIP:
				kind = kindClusterIP
				roles = append(roles, listInternal)
			case ebpf.KindNodePort:
				kind = kindNodePort
			}
			if kind != kindClusterIP {
				roles = append(roles, listExternal)
			}
			p.frontends = append(p.frontends, dpFrontend{kind: kind, addr: f.IP, port: f.Port, proto: f.Protocol})
		}
		var list []model.Backend
		for _, b := range g.Backends {
			if b.Missing {
				p.problems = append(p.problems, fmt.Sprintf("%sservice id %d: a slot names backend id %d, which the backend map does not hold", idSpace(g), g.ID, b.ID))
				continue
			}
			list = append(list, b.Backend)
			p.weights[b.Backend] += b.Slots
		}
		if g.MissingSlots > 0 {
			p.problems = append(p.problems, fmt.Sprintf("%sservice id %d: %d of its live slots have no entry", idSpace(g), g.ID, g.MissingSlots))
		}
		slices.SortFunc(list, model.Backend.Compare)
		list = slices.Compact(list)
		for _, role := range roles {
			p.lists[role] = list
		}
		if g.Affinity {
			p.affinity = max(g.AffinitySeconds, 1)
		}
		p.internalLocal = g.NoLocalEndpoint
		if g.Counters != nil {
			p.counters = &Counters{Connections: g.Counters.Connections, Datagrams: g.Counters.Datagrams,
				Refused: g.Counters.Refused, Reverse: g.Counters.Reverse}
		}
		out = append(out, p)
	}
	return out
}

// merge adds o's frontends, lists and counters to p: two service ids of
// one port.
func (p *dpPort) merge(o *dpPort) {
	p.frontends = append(p.frontends, o.frontends...)
	for role, l := range o.lists {
		merged := append(slices.Clone(p.lists[role]), l...)
		slices.SortFunc(merged, model.Backend.Compare)
		p.lists[role] = slices.Compact(merged)
	}
	if p.weights == nil && o.weights != nil {
		p.weights = map[model.Backend]int{}
	}
	for b, w := range o.weights {
		p.weights[b] = max(p.weights[b], w)
	}
	p.affinity = max(p.affinity, o.affinity)
	p.internalLocal = p.internalLocal || o.internalLocal
	p.externalLocal = p.externalLocal || o.externalLocal
	if o.counters != nil {
		if p.counters == nil {
			p.counters = &Counters{}
		}
		p.counters.Connections += o.counters.Connections
		p.counters.Datagrams += o.counters.Datagrams
		p.counters.Refused += o.counters.Refused
		p.counters.Reverse += o.counters.Reverse
	}
	p.problems = append(p.problems, o.problems...)
}

// parsePortName reads "namespace/name:port" or "namespace/name" (an
// unnamed port), as kube-proxy's rule comments print a service port.
func parsePortName(s string, proto model.Protocol) (model.ServicePortName, bool) {
	ns, rest, ok := strings.Cut(s, "/")
	if !ok || ns == "" || rest == "" || strings.ContainsAny(s, " \t") {
		return model.ServicePortName{}, false
	}
	name, port, _ := strings.Cut(rest, ":")
	if name == "" {
		return model.ServicePortName{}, false
	}
	return model.ServicePortName{ServiceName: model.ServiceName{Namespace: ns, Name: name}, Port: port, Protocol: proto}, true
}
