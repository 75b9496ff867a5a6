package iptables

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// portView is what decides the shape of one service port's rules, read off
// the model as kube-proxy's syncProxyRules reads its CategorizeEndpoints
// result: which endpoints each traffic policy uses, and what happens to
// traffic that has none.
type portView struct {
	sp *model.ServicePort
	// cluster and local are the endpoints of the Cluster and Local
	// policies (nil when no traffic uses that policy).
	cluster, local []model.Backend
	// hasEndpoints: some usable endpoint exists somewhere in the cluster;
	// without one every frontend rejects.
	hasEndpoints bool
	// hasInternal, hasExternal: ClusterIP traffic, and external traffic
	// from outside the cluster, have endpoints to go to. When false but
	// hasEndpoints, that traffic is dropped (a Local policy with no
	// endpoint on this node: the client retries, another node may serve).
	hasInternal, hasExternal bool
	// Which per-port chains exist.
	usesCluster, usesLocal, usesExt, usesFW bool
}

// viewOf reads a service port. Without the ClusterIPs (the external-only
// mode) a Local chain that only ClusterIP traffic would use is left out.
func viewOf(sp *model.ServicePort, noClusterIPs bool) portView {
	v := portView{sp: sp}
	// Backends are the internal policy's endpoints: read them as such,
	// which also serves producers that fill only Backends for ports
	// without a Local policy (the model aliases the lists when equal).
	v.cluster, v.local = sp.Cluster, sp.Local
	if sp.InternalLocal {
		v.local = sp.Backends
	} else {
		v.cluster = sp.Backends
	}
	v.hasEndpoints = sp.HasEndpoints || len(v.cluster) > 0 || len(v.local) > 0
	v.hasInternal = v.hasEndpoints && (!sp.InternalLocal || len(v.local) > 0)
	v.hasExternal = v.hasEndpoints && (!sp.External.PolicyLocal || len(v.local) > 0)
	v.usesCluster = len(v.cluster) > 0
	v.usesLocal = len(v.local) > 0 && (!noClusterIPs || sp.External.PolicyLocal)
	if !v.usesLocal {
		v.local = nil
	}
	v.usesExt = v.hasEndpoints && sp.External.Accessible()
	v.usesFW = v.hasEndpoints && len(sp.External.LoadBalancerIPs) > 0 && len(sp.External.SourceRanges) > 0
	return v
}

// reachable lists the endpoints some chain of the port jumps to: each needs
// a KUBE-SEP chain. Both lists are sorted, so this is a merge.
func (v *portView) reachable() []model.Backend {
	switch {
	case !v.usesLocal:
		return v.cluster
	case !v.usesCluster:
		return v.local
	case len(v.local) == 0 || sameBackends(v.local, v.cluster):
		return v.cluster
	}
	out := make([]model.Backend, 0, len(v.cluster)+len(v.local))
	i, j := 0, 0
	for i < len(v.cluster) || j < len(v.local) {
		switch {
		case j == len(v.local) || (i < len(v.cluster) && v.cluster[i].Compare(v.local[j]) < 0):
			out = append(out, v.cluster[i])
			i++
		case i == len(v.cluster) || v.cluster[i].Compare(v.local[j]) > 0:
			out = append(out, v.local[j])
			j++
		default:
			out = append(out, v.cluster[i])
			i, j = i+1, j+1
		}
	}
	return out
}

func sameBackends(a, b []model.Backend) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0] || slices.Equal(a, b))
}

// allowFromNode: a source range admits one of the node's own addresses.
// kube-proxy then also admits packets whose source is a load balancer IP:
// a VIP-style load balancer's IP is often local to the node, and the
// node's own connections to it leave from it. (kube-proxy tests its node
// IP alone; the node's non-loopback addresses are the same set on a node
// with one.)
func (v *portView) allowFromNode(node *model.NodeInfo) bool {
	for _, r := range v.sp.External.SourceRanges {
		for _, a := range node.LocalAddresses {
			if !a.IsLoopback() && r.Contains(a) {
				return true
			}
		}
	}
	return false
}

// portChains are the nat chains of one service port whose rules a sync
// writes: the per-port chains it has ("" for those it has not) and a
// KUBE-SEP chain per reachable endpoint.
type portChains struct {
	svc, svl, ext, fw string
	// eps are the reachable endpoints in kube-proxy's order (by their
	// "ip:port" text), with their text and their KUBE-SEP chains.
	eps  []model.Backend
	text []string
	seps []string
}

// chainsOf names the chains of a service port.
func chainsOf(sp *model.ServicePort, noClusterIPs bool) *portChains {
	if noClusterIPs && !sp.External.Accessible() {
		// Served for its health check node port alone: no chain.
		return &portChains{}
	}
	v := viewOf(sp, noClusterIPs)
	return v.chains()
}

func (v *portView) chains() *portChains {
	pc := &portChains{}
	if !v.hasEndpoints {
		return pc
	}
	base := portName(v.sp.Name) + protocol(v.sp.Name.Protocol)
	hash := hashOf(base)
	if v.usesCluster {
		pc.svc = prefixServiceChain + hash
	}
	if v.usesLocal {
		pc.svl = prefixLocalChain + hash
	}
	if v.usesExt {
		pc.ext = prefixExternalChain + hash
	}
	if v.usesFW {
		pc.fw = prefixFirewallChain + hash
	}
	eps := v.reachable()
	pc.eps = eps
	pc.text = make([]string, len(eps))
	for i, b := range eps {
		pc.text[i] = b.String()
	}
	// kube-proxy sorts endpoints by their text (10.0.0.10 before
	// 10.0.0.9); the model by address. The order decides which endpoint
	// each probability is written against, so follow kube-proxy's to keep
	// the rules diffable.
	if !slices.IsSorted(pc.text) {
		idx := make([]int, len(eps))
		for i := range idx {
			idx[i] = i
		}
		slices.SortFunc(idx, func(a, b int) int { return strings.Compare(pc.text[a], pc.text[b]) })
		sortedEps := make([]model.Backend, len(eps))
		sortedText := make([]string, len(eps))
		for i, k := range idx {
			sortedEps[i], sortedText[i] = eps[k], pc.text[k]
		}
		pc.eps, pc.text = sortedEps, sortedText
	}
	pc.seps = make([]string, len(pc.eps))
	for i, t := range pc.text {
		pc.seps[i] = prefixEndpointChain + hashOf(base+t)
	}
	return pc
}

// names lists every chain, for deciding which are stale.
func (pc *portChains) names() []string {
	if pc == nil {
		return nil
	}
	out := make([]string, 0, 4+len(pc.seps))
	for _, c := range []string{pc.svc, pc.svl, pc.ext, pc.fw} {
		if c != "" {
			out = append(out, c)
		}
	}
	return append(out, pc.seps...)
}

// subset returns the indexes into pc.eps of the endpoints in list (sorted
// by address, a subset of pc.eps), in pc.eps's order.
func (pc *portChains) subset(list []model.Backend) []int {
	out := make([]int, 0, len(list))
	for i, b := range pc.eps {
		if len(list) == len(pc.eps) {
			out = append(out, i)
			continue
		}
		if _, ok := slices.BinarySearchFunc(list, b, model.Backend.Compare); ok {
			out = append(out, i)
		}
	}
	return out
}

// isLoopback4 reports whether a is in 127.0.0.0/8.
func isLoopback4(a netip.Addr) bool { return a.Is4() && a.IsLoopback() }
