package inspect

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// filter selects Services by namespace and name; zero values select all.
type filter struct {
	namespace, name string
}

func (f filter) active() bool { return f.namespace != "" || f.name != "" }

func (f filter) matches(n model.ServiceName) bool {
	return (f.namespace == "" || n.Namespace == f.namespace) && (f.name == "" || n.Name == f.name)
}

// datapathOnly reports what the datapath holds, not compared. In ebpf
// mode, packets are the packet layer's ports, which the maps' unnamed ones
// cannot be joined with: each is shown on its own.
func datapathOnly(mode string, dps, packets []*dpPort, f filter) ([]ServicePort, []string) {
	var out []ServicePort
	var warnings []string
	for _, dp := range dps {
		if f.active() && (!dp.named || !f.matches(dp.name.ServiceName)) {
			continue
		}
		sp := portView(mode, dp, nil, nil, nil)
		sp.Status = StatusUnchecked
		sp.Differences = append(sp.Differences, dp.problems...)
		out = append(out, sp)
	}
	for _, pk := range packets {
		if f.active() && !f.matches(pk.name.ServiceName) {
			continue
		}
		sp := portView(mode, nil, pk, nil, nil)
		sp.Status = StatusUnchecked
		out = append(out, sp)
	}
	if f.active() && mode == ModeEBPF {
		warnings = append(warnings, "the BPF maps hold no Service names: without the API server, a Service filter matches nothing")
	}
	return out, warnings
}

// compare matches the datapath's ports with the expected ones and says
// where they differ; packets are the ebpf mode's packet layer's ports
// (nil when not read).
func compare(mode string, dps, packets []*dpPort, exp *expected, f filter) []ServicePort {
	type want struct {
		p      *model.ServicePort
		dp     *dpPort
		packet *dpPort
	}
	wants := make([]*want, 0, len(exp.ports))
	byName := map[model.ServicePortName]*want{}
	byFrontend := map[feKey]*want{}
	for i := range exp.ports {
		w := &want{p: &exp.ports[i]}
		wants = append(wants, w)
		byName[w.p.Name] = w
		for _, fe := range frontendsFor(mode, w.p) {
			if _, taken := byFrontend[fe.key()]; !taken {
				byFrontend[fe.key()] = w
			}
		}
	}
	var extra []*dpPort
	for _, dp := range dps {
		var w *want
		if dp.named {
			w = byName[dp.name]
		} else {
			// The maps hold no names: a service id belongs to the
			// port that has its frontends.
			for _, fe := range dp.frontends {
				if w = byFrontend[fe.key()]; w != nil {
					break
				}
			}
		}
		switch {
		case w == nil:
			extra = append(extra, dp)
		case w.dp == nil:
			w.dp = dp
		default:
			w.dp.merge(dp)
		}
	}

	var extraPackets []*dpPort
	for _, pk := range packets {
		if w := byName[pk.name]; w != nil {
			w.packet = pk
		} else {
			extraPackets = append(extraPackets, pk)
		}
	}

	var out []ServicePort
	for _, w := range wants {
		if f.active() && !f.matches(w.p.Name.ServiceName) {
			continue
		}
		sp := portView(mode, w.dp, w.packet, w.p, exp.states)
		var packetDiffs []string
		if packets != nil {
			packetDiffs = packetDifferences(w.packet, w.p, exp.states)
		}
		if w.dp == nil {
			sp.Status = StatusMissing
			sp.Differences = append([]string{"the datapath holds nothing of this port: it is not programmed"}, packetDiffs...)
		} else {
			sp.Differences = append(append(differences(mode, w.dp, w.p, exp.states), packetDiffs...), w.dp.problems...)
			sp.Status = StatusOK
			if len(sp.Differences) > 0 {
				sp.Status = StatusDiffers
			}
		}
		out = append(out, sp)
	}
	for _, dp := range extra {
		if f.active() && (!dp.named || !f.matches(dp.name.ServiceName)) {
			continue
		}
		sp := portView(mode, dp, nil, nil, nil)
		sp.Status = StatusExtra
		sp.Differences = append([]string{"the API server has no such port: the datapath serves it still"}, dp.problems...)
		out = append(out, sp)
	}
	for _, pk := range extraPackets {
		if f.active() && !f.matches(pk.name.ServiceName) {
			continue
		}
		sp := portView(mode, nil, pk, nil, nil)
		sp.Status = StatusExtra
		sp.Differences = []string{"the API server has no such port: the packet layer serves it still"}
		out = append(out, sp)
	}
	return out
}

// packetDifferences compares the ebpf mode's packet layer's rules for a
// port (nil: none) with what they should be: as the iptables mode's, for
// the ports with an external frontend only, without the ClusterIP (unless
// the rules hold it: --bpf-socket-lb-host-netns-only serves pods' ClusterIP
// traffic there too), and with the Local list only for
// externalTrafficPolicy Local (iptables.viewOf with noClusterIPs).
func packetDifferences(pk *dpPort, p *model.ServicePort, states map[endpointKey]endpointState) []string {
	clusterIPs := pk != nil && slices.ContainsFunc(pk.frontends, func(f dpFrontend) bool { return f.kind == kindClusterIP })
	if !p.External.Accessible() && !clusterIPs {
		if pk != nil {
			return []string{"the packet layer holds rules for a port without external frontends"}
		}
		return nil
	}
	if pk == nil {
		return []string{"the packet layer holds nothing of this port: packets from outside the node are not served"}
	}
	var out []string
	have := map[feKey]bool{}
	for _, fe := range pk.frontends {
		have[fe.key()] = true
	}
	want := map[feKey]bool{}
	for _, fe := range frontendsFor(ModeIPTables, p) {
		want[fe.key()] = true
		if fe.kind == kindClusterIP && !clusterIPs {
			continue
		}
		if !have[fe.key()] {
			out = append(out, fmt.Sprintf("frontend %s %s is missing from the packet layer", fe.kind, fe.address()))
		}
	}
	for _, fe := range pk.frontends {
		if !want[fe.key()] {
			out = append(out, fmt.Sprintf("frontend %s %s should not be in the packet layer", fe.kind, fe.address()))
		}
	}
	wantLists := listsFor(ModeIPTables, p, pk)
	if !clusterIPs && !p.External.PolicyLocal {
		delete(wantLists, listLocal)
	}
	for _, list := range []string{listCluster, listLocal} {
		wl, hl := wantLists[list], pk.lists[list]
		for _, b := range wl {
			if !slices.Contains(hl, b) {
				out = append(out, fmt.Sprintf("backend %s (%s) is missing from the packet layer's %s endpoints", b, stateOf(p.Name, b, states), list))
			}
		}
		for _, b := range hl {
			if !slices.Contains(wl, b) {
				out = append(out, fmt.Sprintf("backend %s (%s) should not be among the packet layer's %s endpoints", b, stateOf(p.Name, b, states), list))
			}
		}
	}
	return out
}

// differences lists what dp holds otherwise than p says.
func differences(mode string, dp *dpPort, p *model.ServicePort, states map[endpointKey]endpointState) []string {
	var out []string
	have := map[feKey]bool{}
	for _, fe := range dp.frontends {
		have[fe.key()] = true
	}
	want := map[feKey]bool{}
	for _, fe := range frontendsFor(mode, p) {
		want[fe.key()] = true
		if !fe.optional && !have[fe.key()] {
			out = append(out, fmt.Sprintf("frontend %s %s is missing", fe.kind, fe.address()))
		}
	}
	seen := map[feKey]bool{}
	for _, fe := range dp.frontends {
		if !want[fe.key()] && !seen[fe.key()] {
			out = append(out, fmt.Sprintf("frontend %s %s should not be there", fe.kind, fe.address()))
		}
		seen[fe.key()] = true
	}

	wantLists := listsFor(mode, p, dp)
	names := slices.Sorted(func(yield func(string) bool) {
		for k := range wantLists {
			if !yield(k) {
				return
			}
		}
		for k := range dp.lists {
			if _, dup := wantLists[k]; !dup && !yield(k) {
				return
			}
		}
	})
	for _, list := range names {
		wl, hl := wantLists[list], dp.lists[list]
		label := listLabel(mode, list, p.InternalLocal)
		for _, b := range wl {
			if !slices.Contains(hl, b) {
				out = append(out, fmt.Sprintf("backend %s (%s) is missing from the %s endpoints", b, stateOf(p.Name, b, states), label))
			}
		}
		for _, b := range hl {
			if !slices.Contains(wl, b) {
				out = append(out, fmt.Sprintf("backend %s (%s) should not be among the %s endpoints", b, stateOf(p.Name, b, states), label))
			}
		}
	}

	wantAffinity := uint32(0)
	if p.Affinity > 0 {
		wantAffinity = affinitySeconds(mode, p)
	}
	if dp.affinity != wantAffinity {
		out = append(out, fmt.Sprintf("session affinity timeout is %s, should be %s", seconds(dp.affinity), seconds(wantAffinity)))
	}
	return out
}

// affinitySeconds is the timeout the datapath writes for p: whole seconds
// rounded up (ebpf) or truncated (iptables, as kube-proxy prints it).
func affinitySeconds(mode string, p *model.ServicePort) uint32 {
	if mode == ModeEBPF {
		return uint32(max((p.Affinity.Nanoseconds()+1e9-1)/1e9, 1))
	}
	return uint32(p.Affinity.Seconds())
}

func seconds(s uint32) string {
	if s == 0 {
		return "none"
	}
	return fmt.Sprintf("%ds", s)
}

func stateOf(n model.ServicePortName, b model.Backend, states map[endpointKey]endpointState) string {
	if st, ok := states[endpointKey{n, b}]; ok {
		return st.String()
	}
	return "unknown"
}

// listLabel names a datapath list as a traffic policy's endpoints.
func listLabel(mode, list string, internalLocal bool) string {
	switch list {
	case listInternal:
		if internalLocal {
			return listLocal
		}
		return listCluster
	case listExternal:
		return listCluster
	}
	return list
}

// portView is the report of one port: what dp (the maps, or the rules)
// and pk (the ebpf mode's packet layer) hold, and what p says when
// compared (any may be nil, not all).
func portView(mode string, dp, pk *dpPort, p *model.ServicePort, states map[endpointKey]endpointState) ServicePort {
	var sp ServicePort
	internalLocal := dp != nil && dp.internalLocal
	switch {
	case dp == nil && p == nil:
		sp.Service, sp.Port, sp.Protocol = pk.name.ServiceName.String(), pk.name.Port, pk.proto.String()
		if pk.externalLocal {
			sp.ExternalTrafficPolicy = policy(true)
		}
	case p != nil:
		sp.Service, sp.Port, sp.Protocol = p.Name.ServiceName.String(), p.Name.Port, p.Name.Protocol.String()
		internalLocal = p.InternalLocal
		sp.InternalTrafficPolicy = policy(p.InternalLocal)
		if p.External.Accessible() {
			sp.ExternalTrafficPolicy = policy(p.External.PolicyLocal)
		}
	case dp.named:
		sp.Service, sp.Port, sp.Protocol = dp.name.ServiceName.String(), dp.name.Port, dp.proto.String()
	default:
		sp.Protocol = dp.proto.String()
	}
	if p == nil && dp != nil {
		if mode == ModeIPTables || dp.internalLocal {
			sp.InternalTrafficPolicy = policy(dp.internalLocal)
		}
		if mode == ModeIPTables && slices.ContainsFunc(dp.frontends, func(f dpFrontend) bool { return f.kind != kindClusterIP }) {
			sp.ExternalTrafficPolicy = policy(dp.externalLocal)
		}
	}

	layer := ""
	if mode == ModeEBPF {
		layer = "socket"
	}
	// Frontends: the datapath's, then those missing from it.
	have := map[feKey]bool{}
	if dp != nil {
		kinds := map[feKey]string{}
		if p != nil {
			for _, fe := range frontendsFor(mode, p) {
				kinds[fe.key()] = fe.kind
			}
		}
		for _, fe := range dp.frontends {
			kind := fe.kind
			if k, ok := kinds[fe.key()]; ok && kind == kindExternal {
				kind = k
			}
			sp.Frontends = append(sp.Frontends, Frontend{Kind: kind, Address: fe.address(), InDatapath: true, Layer: layer})
			have[fe.key()] = true
		}
		sp.AffinitySeconds = dp.affinity
		sp.Counters = dp.counters
	}
	if p != nil {
		for _, fe := range frontendsFor(mode, p) {
			if !have[fe.key()] && !fe.optional {
				sp.Frontends = append(sp.Frontends, Frontend{Kind: fe.kind, Address: fe.address(), Layer: layer})
			}
		}
	}
	if pk != nil {
		for _, fe := range pk.frontends {
			sp.Frontends = append(sp.Frontends, Frontend{Kind: fe.kind, Address: fe.address(), InDatapath: true, Layer: "packet"})
		}
		if dp == nil && pk.affinity > 0 {
			sp.AffinitySeconds = pk.affinity
		}
	}
	if p != nil {
		if dp == nil && p.Affinity > 0 {
			sp.AffinitySeconds = affinitySeconds(mode, p)
		}
	}
	slices.SortStableFunc(sp.Frontends, func(a, b Frontend) int {
		if c := strings.Compare(b.Layer, a.Layer); c != 0 {
			return c // socket before packet
		}
		return cmp.Compare(frontendRank(a.Kind), frontendRank(b.Kind))
	})

	// Backends: every one the datapath holds or the API lists.
	policies := map[model.Backend][]string{}
	var all []model.Backend
	if dp != nil {
		for list, bs := range dp.lists {
			label := listLabel(mode, list, internalLocal)
			for _, b := range bs {
				if !slices.Contains(policies[b], label) {
					policies[b] = append(policies[b], label)
				}
				all = append(all, b)
			}
		}
	}
	if pk != nil {
		for list, bs := range pk.lists {
			label := "packet-" + list
			for _, b := range bs {
				policies[b] = append(policies[b], label)
				all = append(all, b)
			}
		}
	}
	if p != nil {
		all = append(all, p.Backends...)
		all = append(all, p.Cluster...)
		all = append(all, p.Local...)
		all = append(all, p.Serving...)
	}
	slices.SortFunc(all, model.Backend.Compare)
	all = slices.Compact(all)
	for _, b := range all {
		pol := policies[b]
		slices.Sort(pol)
		be := Backend{Address: b.String(), State: "active", Policies: pol}
		if be.Policies == nil {
			be.Policies = []string{}
		}
		if p != nil {
			st, ok := states[endpointKey{p.Name, b}]
			be.State = "unknown"
			if ok {
				be.State = st.String()
				local := st.local
				be.Local = &local
			}
		}
		if dp != nil && dp.weights != nil && len(pol) > 0 {
			be.Weight = dp.weights[b]
		}
		sp.Backends = append(sp.Backends, be)
	}
	if sp.Backends == nil {
		sp.Backends = []Backend{}
	}
	if sp.Frontends == nil {
		sp.Frontends = []Frontend{}
	}
	return sp
}

func policy(local bool) string {
	if local {
		return "Local"
	}
	return "Cluster"
}

func frontendRank(kind string) int {
	switch kind {
	case kindClusterIP:
		return 0
	case kindNodePort:
		return 1
	case kindExternalIP:
		return 2
	case kindLoadBalancerIP:
		return 3
	}
	return 4
}

// sortPorts orders named ports by name, the unnamed after them by their
// first frontend.
func sortPorts(ports []ServicePort) {
	slices.SortStableFunc(ports, func(a, b ServicePort) int {
		if (a.Service == "") != (b.Service == "") {
			if a.Service == "" {
				return 1
			}
			return -1
		}
		if c := strings.Compare(a.Service, b.Service); c != 0 {
			return c
		}
		if c := strings.Compare(a.Port, b.Port); c != 0 {
			return c
		}
		if c := strings.Compare(a.Protocol, b.Protocol); c != 0 {
			return c
		}
		if c := strings.Compare(a.Family, b.Family); c != 0 {
			return c // IPv4 before IPv6
		}
		fa, fb := "", ""
		if len(a.Frontends) > 0 {
			fa = a.Frontends[0].Address
		}
		if len(b.Frontends) > 0 {
			fb = b.Frontends[0].Address
		}
		return strings.Compare(fa, fb)
	})
}
