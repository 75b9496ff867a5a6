package inspect

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// rule is what inspect reads of one "-A" line of iptables-save.
type rule struct {
	chain   string
	comment string
	proto   model.Protocol
	dst     netip.Addr // invalid when the rule has none, or a range
	dstNet  bool       // -d names a range wider than one address
	dport   uint16
	target  string
	// toDest is DNAT's --to-destination.
	toDest netip.AddrPort
	// rcheck is "-m recent --rcheck --seconds N" (session affinity).
	rcheck       uint32
	dstTypeLocal bool
	srcTypeLocal bool
	// source: the rule matches a source address or range (-s).
	source bool
}

// splitRule splits a line into words, a double-quoted word (a comment)
// being one word without its quotes.
func splitRule(line string) []string {
	var words []string
	for i := 0; i < len(line); {
		switch {
		case line[i] == ' ':
			i++
		case line[i] == '"':
			j := i + 1
			var b strings.Builder
			for j < len(line) && line[j] != '"' {
				if line[j] == '\\' && j+1 < len(line) {
					j++
				}
				b.WriteByte(line[j])
				j++
			}
			words = append(words, b.String())
			i = j + 1
		default:
			j := strings.IndexByte(line[i:], ' ')
			if j < 0 {
				j = len(line) - i
			}
			words = append(words, line[i:i+j])
			i += j
		}
	}
	return words
}

func parseRule(line string) (rule, bool) {
	w := splitRule(line)
	if len(w) < 2 || w[0] != "-A" {
		return rule{}, false
	}
	r := rule{chain: w[1]}
	negate := false
	for i := 2; i < len(w); i++ {
		arg := func() string {
			if i+1 < len(w) {
				i++
				return w[i]
			}
			return ""
		}
		switch w[i] {
		case "!":
			negate = true
			continue
		case "--comment":
			r.comment = arg()
		case "-p":
			switch strings.ToLower(arg()) {
			case "tcp":
				r.proto = model.TCP
			case "udp":
				r.proto = model.UDP
			}
		case "-d":
			v := arg()
			if negate {
				break
			}
			if p, err := netip.ParsePrefix(v); err == nil {
				if p.IsSingleIP() {
					r.dst = p.Addr()
				} else {
					r.dstNet = true
				}
			} else if a, err := netip.ParseAddr(v); err == nil {
				r.dst = a
			}
		case "-s":
			arg()
			r.source = true
		case "--dport":
			if n, err := strconv.ParseUint(arg(), 10, 16); err == nil {
				r.dport = uint16(n)
			}
		case "-j":
			r.target = arg()
		case "--to-destination":
			if ap, err := netip.ParseAddrPort(arg()); err == nil {
				r.toDest = ap
			}
		case "--rcheck":
			r.rcheck = 1 // seconds follow
		case "--seconds":
			if n, err := strconv.ParseUint(arg(), 10, 32); err == nil && r.rcheck != 0 {
				r.rcheck = uint32(n)
			}
		case "--dst-type":
			r.dstTypeLocal = arg() == "LOCAL" && !negate
		case "--src-type":
			r.srcTypeLocal = arg() == "LOCAL" && !negate
		}
		negate = false
	}
	return r, true
}

// rulesOf parses the "-A" lines of a dump.
func rulesOf(dump []byte) []rule {
	var out []rule
	for _, line := range strings.Split(string(dump), "\n") {
		if r, ok := parseRule(line); ok {
			out = append(out, r)
		}
	}
	return out
}

// Comment suffixes of the top-level rules, as internal/dataplane/iptables
// (and kube-proxy) write them after the port's name.
const (
	suffixClusterIP        = " cluster IP"
	suffixExternalIP       = " external IP"
	suffixLoadBalancerIP   = " loadbalancer IP"
	suffixNoEndpoints      = " has no endpoints"
	suffixNoLocalEndpoints = " has no local endpoints"
	chainServices          = "KUBE-SERVICES"
	chainExternalServices  = "KUBE-EXTERNAL-SERVICES"
	chainNodePorts         = "KUBE-NODEPORTS"
	prefixServiceChain     = "KUBE-SVC-"
	prefixLocalChain       = "KUBE-SVL-"
	prefixExternalChain    = "KUBE-EXT-"
	prefixFirewallChain    = "KUBE-FW-"
	prefixEndpointChain    = "KUBE-SEP-"
)

// fromRules reads the service ports the nat and filter tables serve: the
// frontends from KUBE-SERVICES, KUBE-NODEPORTS (nat) and the REJECT and
// DROP rules of ports without (local) endpoints (filter), the endpoints by
// following each frontend's jump through KUBE-FW-, KUBE-EXT- to the
// KUBE-SVC- (Cluster policy) and KUBE-SVL- (Local policy) chains and their
// KUBE-SEP- chains' DNAT.
func fromRules(nat, filter []byte) []*dpPort {
	byChain := map[string][]rule{}
	natRules := rulesOf(nat)
	for _, r := range natRules {
		byChain[r.chain] = append(byChain[r.chain], r)
	}
	ports := map[model.ServicePortName]*dpPort{}
	var order []model.ServicePortName
	port := func(name string, proto model.Protocol) *dpPort {
		n, ok := parsePortName(name, proto)
		if !ok {
			return nil
		}
		p := ports[n]
		if p == nil {
			p = &dpPort{name: n, named: true, proto: proto, lists: map[string][]model.Backend{}}
			ports[n] = p
			order = append(order, n)
		}
		return p
	}
	addFrontend := func(p *dpPort, f dpFrontend) {
		for i, g := range p.frontends {
			if g.key() == f.key() {
				if g.kind == kindExternal && f.kind != kindExternal {
					p.frontends[i].kind = f.kind
				}
				return
			}
		}
		p.frontends = append(p.frontends, f)
	}
	// targets are the chains each port's frontends jump to.
	targets := map[*dpPort][]string{}

	for _, r := range byChain[chainServices] {
		if r.proto == 0 || !r.dst.IsValid() {
			continue // the jump to KUBE-NODEPORTS
		}
		var name, kind string
		switch {
		case strings.HasSuffix(r.comment, suffixClusterIP):
			name, kind = strings.TrimSuffix(r.comment, suffixClusterIP), kindClusterIP
		case strings.HasSuffix(r.comment, suffixExternalIP):
			name, kind = strings.TrimSuffix(r.comment, suffixExternalIP), kindExternalIP
		case strings.HasSuffix(r.comment, suffixLoadBalancerIP):
			name, kind = strings.TrimSuffix(r.comment, suffixLoadBalancerIP), kindLoadBalancerIP
		default:
			continue
		}
		p := port(name, r.proto)
		if p == nil {
			continue
		}
		addFrontend(p, dpFrontend{kind: kind, addr: r.dst, port: r.dport, proto: r.proto})
		targets[p] = append(targets[p], r.target)
		if kind == kindClusterIP && strings.HasPrefix(r.target, prefixLocalChain) {
			p.internalLocal = true
		}
	}
	for _, r := range byChain[chainNodePorts] {
		if r.proto == 0 || r.dport == 0 {
			continue
		}
		p := port(r.comment, r.proto)
		if p == nil {
			continue
		}
		addFrontend(p, dpFrontend{kind: kindNodePort, port: r.dport, proto: r.proto})
		targets[p] = append(targets[p], r.target)
	}
	// Ports without endpoints (REJECT) or without local ones (DROP):
	// their frontends are in filter only.
	for _, r := range rulesOf(filter) {
		if r.chain != chainServices && r.chain != chainExternalServices {
			continue
		}
		var name string
		switch {
		case strings.HasSuffix(r.comment, suffixNoEndpoints):
			name = strings.TrimSuffix(r.comment, suffixNoEndpoints)
		case strings.HasSuffix(r.comment, suffixNoLocalEndpoints):
			name = strings.TrimSuffix(r.comment, suffixNoLocalEndpoints)
		default:
			continue
		}
		p := port(name, r.proto)
		if p == nil {
			continue
		}
		switch {
		case r.chain == chainServices && r.dst.IsValid():
			addFrontend(p, dpFrontend{kind: kindClusterIP, addr: r.dst, port: r.dport, proto: r.proto})
			if strings.HasSuffix(r.comment, suffixNoLocalEndpoints) {
				p.internalLocal = true
			}
		case r.dstTypeLocal:
			addFrontend(p, dpFrontend{kind: kindNodePort, port: r.dport, proto: r.proto})
		case r.dst.IsValid():
			addFrontend(p, dpFrontend{kind: kindExternal, addr: r.dst, port: r.dport, proto: r.proto})
		}
		if r.chain == chainExternalServices && strings.HasSuffix(r.comment, suffixNoLocalEndpoints) {
			p.externalLocal = true
		}
	}

	out := make([]*dpPort, 0, len(order))
	for _, n := range order {
		p := ports[n]
		walkChains(p, targets[p], byChain)
		out = append(out, p)
	}
	return out
}

// walkChains follows a port's jumps down to its endpoints.
func walkChains(p *dpPort, start []string, byChain map[string][]rule) {
	seen := map[string]bool{}
	queue := slices.Clone(start)
	for len(queue) > 0 {
		chain := queue[0]
		queue = queue[1:]
		if seen[chain] {
			continue
		}
		seen[chain] = true
		switch {
		case strings.HasPrefix(chain, prefixFirewallChain):
			for _, r := range byChain[chain] {
				if r.target != "" {
					queue = append(queue, r.target)
				}
			}
		case strings.HasPrefix(chain, prefixExternalChain):
			rules := byChain[chain]
			for _, r := range rules {
				// The jumps of the node's and pods' own traffic
				// (-s CIDR, --src-type LOCAL) short-circuit to
				// KUBE-SVC; the last, unconditional one is the
				// external traffic policy's.
				if strings.HasPrefix(r.target, prefixServiceChain) || strings.HasPrefix(r.target, prefixLocalChain) {
					queue = append(queue, r.target)
				}
			}
			if n := len(rules); n > 0 && !rules[n-1].source && !rules[n-1].srcTypeLocal &&
				strings.HasPrefix(rules[n-1].target, prefixLocalChain) {
				p.externalLocal = true
			}
		case strings.HasPrefix(chain, prefixServiceChain), strings.HasPrefix(chain, prefixLocalChain):
			list := listCluster
			if strings.HasPrefix(chain, prefixLocalChain) {
				list = listLocal
			}
			var backends []model.Backend
			for _, r := range byChain[chain] {
				if !strings.HasPrefix(r.target, prefixEndpointChain) {
					continue
				}
				if r.rcheck > 1 {
					p.affinity = max(p.affinity, r.rcheck)
				}
				for _, sep := range byChain[r.target] {
					if sep.target == "DNAT" && sep.toDest.IsValid() {
						backends = append(backends, model.Backend{IP: sep.toDest.Addr(), Port: sep.toDest.Port()})
					}
				}
			}
			slices.SortFunc(backends, model.Backend.Compare)
			p.lists[list] = slices.Compact(append(p.lists[list], backends...))
			slices.SortFunc(p.lists[list], model.Backend.Compare)
		}
	}
}
