package iptables

import (
	"maps"
	"net/netip"
	"slices"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// ofFamily returns snap with every address of the other family left out:
// snap itself when it has none, which is what the model hands out (each
// family's Tracker keeps its own family's addresses). One address of the
// other family in ip6tables-restore's input (or an IPv6 one in
// iptables-restore's) fails the whole restore, so that no Service would be
// served any more: it is dropped with a warning and counted
// (other_family_address_skipped), as bad input is. A service port whose
// ClusterIP is of the other family is left out whole.
func (d *Dataplane) ofFamily(snap *model.Snapshot) *model.Snapshot {
	f := d.family
	var services map[model.ServiceName][]model.ServicePort
	var first model.ServicePortName
	skipped := 0
	for name, ports := range snap.Services {
		clean := true
		for i := range ports {
			if !portOfFamily(&ports[i], f) {
				clean = false
				break
			}
		}
		if clean {
			continue
		}
		if services == nil {
			services = maps.Clone(snap.Services)
		}
		var kept []model.ServicePort
		for _, sp := range ports {
			if portOfFamily(&sp, f) {
				kept = append(kept, sp)
				continue
			}
			if skipped == 0 {
				first = sp.Name
			}
			skipped++
			if !f.Has(sp.ClusterIP.IP) {
				continue
			}
			kept = append(kept, keepFamily(sp, f))
		}
		services[name] = kept
	}
	if skipped > 0 {
		// One line per sync, however many ports.
		klog.InfoS("Leaving addresses of the other family out of the rules", "ipFamily", f, "servicePorts", skipped, "first", first)
		d.count("other_family_address_skipped", uint64(skipped))
	}
	node, nodeOK := snap.Node, nodeOfFamily(&snap.Node, f)
	if !nodeOK {
		klog.InfoS("Leaving node addresses of the other family out of the rules", "ipFamily", f)
		d.count("other_family_address_skipped", 1)
		node.NodePortAddresses = addrsOf(node.NodePortAddresses, f)
		node.LocalAddresses = addrsOf(node.LocalAddresses, f)
	}
	if services == nil && nodeOK {
		return snap
	}
	out := *snap
	if services != nil {
		out.Services = services
	}
	out.Node = node
	return &out
}

func allOf(addrs []netip.Addr, f model.IPFamily) bool {
	for _, a := range addrs {
		if !f.Has(a) {
			return false
		}
	}
	return true
}

func backendsOf(bs []model.Backend, f model.IPFamily) bool {
	for _, b := range bs {
		if !f.Has(b.IP) {
			return false
		}
	}
	return true
}

func portOfFamily(sp *model.ServicePort, f model.IPFamily) bool {
	e := &sp.External
	for _, p := range e.SourceRanges {
		if !f.Has(p.Addr()) {
			return false
		}
	}
	return f.Has(sp.ClusterIP.IP) && allOf(e.ExternalIPs, f) && allOf(e.LoadBalancerIPs, f) &&
		backendsOf(sp.Backends, f) && backendsOf(sp.Serving, f) && backendsOf(sp.Cluster, f) && backendsOf(sp.Local, f)
}

func nodeOfFamily(n *model.NodeInfo, f model.IPFamily) bool {
	return allOf(n.NodePortAddresses, f) && allOf(n.LocalAddresses, f)
}

func addrsOf(addrs []netip.Addr, f model.IPFamily) []netip.Addr {
	return slices.DeleteFunc(slices.Clone(addrs), func(a netip.Addr) bool { return !f.Has(a) })
}

func backendsOfFamily(bs []model.Backend, f model.IPFamily) []model.Backend {
	if bs == nil || backendsOf(bs, f) {
		return bs
	}
	out := slices.DeleteFunc(slices.Clone(bs), func(b model.Backend) bool { return !f.Has(b.IP) })
	if len(out) == 0 {
		return nil
	}
	return out
}

// keepFamily is sp with the addresses of family f alone.
func keepFamily(sp model.ServicePort, f model.IPFamily) model.ServicePort {
	sp.Backends = backendsOfFamily(sp.Backends, f)
	sp.Serving = backendsOfFamily(sp.Serving, f)
	sp.Cluster = backendsOfFamily(sp.Cluster, f)
	sp.Local = backendsOfFamily(sp.Local, f)
	e := &sp.External
	e.ExternalIPs = addrsOf(e.ExternalIPs, f)
	e.LoadBalancerIPs = addrsOf(e.LoadBalancerIPs, f)
	restricted := len(e.SourceRanges) > 0
	e.SourceRanges = slices.DeleteFunc(slices.Clone(e.SourceRanges), func(p netip.Prefix) bool { return !f.Has(p.Addr()) })
	if restricted && len(e.SourceRanges) == 0 {
		// No range left would admit every source: the load balancer IPs
		// the ranges restricted are left out instead (this fails closed;
		// the model gives a family without ranges of its own none).
		e.LoadBalancerIPs = nil
	}
	if len(e.ExternalIPs) == 0 {
		e.ExternalIPs = nil
	}
	if len(e.LoadBalancerIPs) == 0 {
		e.LoadBalancerIPs = nil
	}
	if len(e.SourceRanges) == 0 {
		e.SourceRanges = nil
	}
	return sp
}
