package iptables

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// largeClusterEndpoints is kube-proxy's threshold (all endpoints of all
// services) above which it leaves the per-endpoint comments out: at that
// size they make iptables-restore's input markedly larger and slower to
// apply, and nobody reads a hundred thousand of them.
const largeClusterEndpoints = 1000

// kube-proxy's nfacct counters (pkg/proxy/metrics), by the same names so
// that tools reading them keep working.
const (
	nfacctInvalidDropped     = "ct_state_invalid_dropped_pkts"
	nfacctLocalhostNodePorts = "localhost_nps_accepted_pkts"
)

// ruleOptions are the node-wide settings that shape the rules.
type ruleOptions struct {
	// masqMark is the fwmark bit that asks KUBE-POSTROUTING to masquerade,
	// formatted as kube-proxy does (0x4000 for bit 14).
	masqMark string
	// local, when it detects anything, tells this node's pods' traffic
	// (--detect-local-mode): traffic to a ClusterIP that is not theirs is
	// masqueraded so replies come back through this node, and theirs to an
	// external frontend of an externalTrafficPolicy Local service goes to
	// every endpoint, as if it had gone out to the load balancer and come
	// back.
	local LocalTraffic
	// masqueradeAll masquerades every ClusterIP connection.
	masqueradeAll bool
	// externalOnly leaves out what only the iptables mode has (localhost
	// node ports and their KUBE-FIREWALL, the canary chains, kube-proxy's
	// counters): the eBPF mode's packet layer, for packets no socket on
	// the node sent.
	externalOnly bool
	// noClusterIPs (with externalOnly, unless Config.ClusterIPs) renders
	// only the service ports with an external frontend, and nothing that
	// matches a ClusterIP: the eBPF mode's socket hooks serve those.
	noClusterIPs bool
	// localhostNodePorts: node ports answer on 127.0.0.0/8 too, which
	// needs route_localnet, which KUBE-FIREWALL guards (kube-proxy's
	// --iptables-localhost-nodeports, effective for this node). Never
	// with ipv6.
	localhostNodePorts bool
	// ipv6: the rules are ip6tables'. They differ from the IPv4 ones in
	// the jump to KUBE-NODEPORTS alone, which never takes ::1 (kube-proxy
	// serves no IPv6 node port on localhost); ip6tables itself fills in
	// the rest (REJECT's icmp6-port-unreachable, /128 host masks).
	ipv6 bool
	// conntrackLiberal: nf_conntrack_tcp_be_liberal is set, so only
	// out-of-window RSTs are INVALID, and kube-proxy does not drop INVALID
	// packets.
	conntrackLiberal bool
	// nfacctInvalid and nfacctLocalhost: kube-proxy's nfacct counters
	// exist, so the INVALID drop and the localhost node port rules count
	// their packets in them.
	nfacctInvalid, nfacctLocalhost bool
}

// renderInput is what one sync writes.
type renderInput struct {
	// services is every service port served after this sync, in a stable
	// order. The top-level chains list them all on every sync.
	services []model.ServicePort
	// chains, index-aligned with services, names the nat chains of each
	// service port whose rules this sync writes (see chainsToWrite); a nil
	// entry leaves that service port's chains as they are in the kernel (a
	// partial sync, or a port without endpoints, which has none).
	chains []*portChains
	// node is this node, as the snapshot describes it.
	node model.NodeInfo
	// stale are per-service nat chains to flush and delete.
	stale []string
	// missingJumps are jumps from built-in chains to ours that the tables
	// lack, and staleJumps older forms of ours ("table" and "-A ..." as
	// iptables-save prints them): both fixed in the same transaction.
	missingJumps []jump
	staleJumps   []savedRule
	// canary: make sure the canary chains exist (a full sync): in mangle,
	// nat and filter for the iptables mode, as kube-proxy; in nat and
	// filter, under another name, for the external-only mode, which is no
	// kube-proxy.
	canary bool
	// createFirewall: KUBE-FIREWALL does not exist and is not written
	// (localhost node ports are off), but jumps to it are inserted.
	createFirewall bool
}

// savedRule is one rule of an iptables-save dump.
type savedRule struct{ table, rule string }

// renderStats counts what a sync's rules add up to, skipped ones included,
// as kube-proxy's iptables_total metrics do.
type renderStats struct {
	// largeCluster: more than largeClusterEndpoints endpoints in all.
	largeCluster          bool
	natRules, filterRules int
	natChainsWritten      int
	natRulesWritten       int
}

// lines accumulates iptables-restore input, one rule per line.
type lines struct {
	buf   *bytes.Buffer
	count int
}

func (l *lines) write(words ...string) {
	l.count++
	for i, w := range words {
		if i > 0 {
			l.buf.WriteByte(' ')
		}
		l.buf.WriteString(w)
	}
	l.buf.WriteByte('\n')
}

func chainLine(name string) string { return ":" + name + " - [0:0]" }

func quote(comment string) string { return `"` + comment + `"` }

// probability is the chance that the i-th of n remaining endpoints is
// picked, so that the cascade of statistic matches picks each of the n
// with equal probability. kube-proxy prints ten decimals.
func probability(remaining int) string {
	return fmt.Sprintf("%0.10f", 1.0/float64(remaining))
}

// renderer writes one sync's input.
type renderer struct {
	opts ruleOptions
	in   *renderInput
	// comments: per-endpoint comments are written (not a large cluster).
	comments    bool
	filter, nat lines
	// chainDecls gets the nat chain declarations, which must precede the
	// rules that name them.
	chainDecls *bytes.Buffer
	// skipped counts the nat rules of unchanged services, left as they are.
	skipped int
	// args is reused for building rules.
	args []string
	// probabilities caches probability(n).
	probabilities []string
}

// render writes the iptables-restore input for one sync into buf: the
// filter table, then the nat table, each in one COMMIT (and at a full sync
// the mangle table's canary). Chains named in the input are flushed and
// rewritten; with --noflush nothing else is touched.
func render(buf *bytes.Buffer, opts ruleOptions, in renderInput) renderStats {
	// endpoints decides the comments (kube-proxy counts every endpoint);
	// written sizes the buffer for the chains this sync writes.
	endpoints, written := 0, 0
	for i := range in.services {
		sp := &in.services[i]
		n := max(len(sp.Serving), len(sp.Backends), len(sp.Cluster), len(sp.Local))
		endpoints += n
		if in.chains[i] != nil {
			written += n
		}
	}
	r := &renderer{opts: opts, in: &in, comments: endpoints <= largeClusterEndpoints, args: make([]string, 0, 64)}
	st := renderStats{largeCluster: endpoints > largeClusterEndpoints}

	canary := canaryChain(opts.externalOnly)
	if in.canary && !opts.externalOnly {
		// Only the canary lives in mangle.
		buf.WriteString("*mangle\n" + chainLine(canary) + "\nCOMMIT\n")
	}

	// filter: connections to a ClusterIP without endpoints are rejected with
	// icmp-port-unreachable (REJECT's default), so clients fail at once
	// with ECONNREFUSED instead of timing out.
	buf.WriteString("*filter\n")
	r.filter = lines{buf: buf}
	for _, c := range filterTopChains {
		buf.WriteString(chainLine(c) + "\n")
	}
	if in.canary {
		buf.WriteString(chainLine(canary) + "\n")
	}
	if opts.localhostNodePorts {
		// route_localnet lets packets to 127.0.0.0/8 arrive from outside
		// the node (kubernetes issue 90259): drop those that were not
		// translated to a node port's endpoint.
		buf.WriteString(chainLine(chainFirewall) + "\n")
		r.filter.write("-A", chainFirewall, "-m", "comment", "--comment", quote("block incoming localnet connections"),
			"-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8", "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP")
	} else if in.createFirewall {
		buf.WriteString(chainLine(chainFirewall) + "\n")
	}

	// nat: chain declarations first (each flushes its chain), then rules,
	// then deletions, so that a chain is deleted only after the rules that
	// jumped to it are gone. Filter rules are written straight into buf.
	var natDecls, natRules bytes.Buffer
	natDecls.WriteString("*nat\n")
	for _, c := range natTopChains {
		natDecls.WriteString(chainLine(c) + "\n")
	}
	if in.canary {
		natDecls.WriteString(chainLine(canary) + "\n")
	}
	// Roughly what the top-level lines of each service and the chains of
	// each endpoint written take, so that the buffer does not regrow (and
	// re-copy) tens of MiB in a full sync at 10k Services, nor take that
	// much for a partial sync, which writes a few of the chains.
	natRules.Grow(160*len(in.services) + 400*written)
	r.chainDecls = &natDecls
	r.nat = lines{buf: &natRules}
	r.nat.write("-A", chainPostrouting, "-m", "mark", "!", "--mark", opts.masqMark+"/"+opts.masqMark, "-j", "RETURN")
	// Clear the mark so a packet that traverses the stack again is not
	// masqueraded twice.
	r.nat.write("-A", chainPostrouting, "-j", "MARK", "--xor-mark", opts.masqMark)
	r.nat.write("-A", chainPostrouting, "-m", "comment", "--comment", quote("kubernetes service traffic requiring SNAT"),
		"-j", "MASQUERADE", "--random-fully")
	r.nat.write("-A", chainMarkMasq, "-j", "MARK", "--or-mark", opts.masqMark)

	for i := range in.services {
		r.port(&in.services[i], in.chains[i])
	}
	r.nodePortsJumps()

	// kube-proxy's KUBE-FORWARD: drop what conntrack finds INVALID (unless
	// it is told to be liberal), which would otherwise reach a pod
	// untranslated and get it to reset the connection; accept what is to
	// be masqueraded, and its replies, whatever FORWARD's policy.
	if !opts.conntrackLiberal {
		rule := []string{"-A", chainForward, "-m", "conntrack", "--ctstate", "INVALID"}
		if opts.nfacctInvalid {
			rule = append(rule, "-m", "nfacct", "--nfacct-name", nfacctInvalidDropped)
		}
		r.filter.write(append(rule, "-j", "DROP")...)
	}
	r.filter.write("-A", chainForward, "-m", "comment", "--comment", quote("kubernetes forwarding rules"),
		"-m", "mark", "--mark", opts.masqMark+"/"+opts.masqMark, "-j", "ACCEPT")
	r.filter.write("-A", chainForward, "-m", "comment", "--comment", quote("kubernetes forwarding conntrack rule"),
		"-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
	writeJumps(buf, "filter", in.missingJumps, in.staleJumps)
	buf.WriteString("COMMIT\n")
	st.filterRules = r.filter.count

	buf.Write(natDecls.Bytes())
	for _, c := range in.stale {
		buf.WriteString(chainLine(c) + "\n")
	}
	buf.Write(natRules.Bytes())
	for _, c := range in.stale {
		buf.WriteString("-X " + c + "\n")
	}
	writeJumps(buf, "nat", in.missingJumps, in.staleJumps)
	buf.WriteString("COMMIT\n")
	st.natRulesWritten = r.nat.count
	st.natRules = r.nat.count + r.skipped
	st.natChainsWritten = strings.Count(natDecls.String(), "\n") - 1 - len(natTopChains)
	if in.canary {
		st.natChainsWritten--
	}
	return st
}

// rule starts a rule in r.args.
func (r *renderer) rule(words ...string) []string {
	r.args = append(r.args[:0], words...)
	return r.args
}

func (r *renderer) probability(n int) string {
	for len(r.probabilities) <= n {
		r.probabilities = append(r.probabilities, probability(max(len(r.probabilities), 1)))
	}
	return r.probabilities[n]
}

// port writes one service port's rules: its lines in the top-level chains
// of both tables always, its own chains when pc says so.
func (r *renderer) port(sp *model.ServicePort, pc *portChains) {
	opts := r.opts
	if opts.noClusterIPs && !sp.External.Accessible() {
		// Only a health check node port (see isExternal): its ACCEPT,
		// and no chain (chainsOf names none).
		r.healthCheck(sp)
		return
	}
	v := viewOf(sp, opts.noClusterIPs)
	name := portName(sp.Name)
	proto := protocol(sp.Name.Protocol)
	port := strconv.Itoa(int(sp.ClusterIP.Port))
	ext := &sp.External

	// The chains this port's top-level rules jump to.
	var chains *portChains
	if pc != nil {
		chains = pc
	} else if v.hasEndpoints {
		hash := portHash(sp.Name)
		chains = &portChains{}
		if v.usesCluster {
			chains.svc = prefixServiceChain + hash
		}
		if v.usesLocal {
			chains.svl = prefixLocalChain + hash
		}
		chains.ext = prefixExternalChain + hash
		chains.fw = prefixFirewallChain + hash
	}
	internalChain := ""
	if chains != nil {
		internalChain = chains.svc
		if sp.InternalLocal {
			internalChain = chains.svl
		}
	}

	// What traffic without endpoints meets.
	var internalTarget, internalComment, externalTarget, externalComment string
	switch {
	case !v.hasEndpoints:
		internalTarget, externalTarget = "REJECT", "REJECT"
		internalComment = quote(name + " has no endpoints")
		externalComment = internalComment
	default:
		if !v.hasInternal {
			internalTarget, internalComment = "DROP", quote(name+" has no local endpoints")
		}
		if !v.hasExternal {
			externalTarget, externalComment = "DROP", quote(name+" has no local endpoints")
		}
	}

	// The ClusterIP.
	if !opts.noClusterIPs {
		if v.hasInternal {
			r.nat.write("-A", chainServices, "-m", "comment", "--comment", quote(name+" cluster IP"),
				"-m", proto, "-p", proto, "-d", sp.ClusterIP.IP.String(), "--dport", port, "-j", internalChain)
		} else {
			r.filter.write("-A", chainServices, "-m", "comment", "--comment", internalComment,
				"-m", proto, "-p", proto, "-d", sp.ClusterIP.IP.String(), "--dport", port, "-j", internalTarget)
		}
	}
	// External IPs.
	for _, ip := range ext.ExternalIPs {
		if v.hasEndpoints {
			r.nat.write("-A", chainServices, "-m", "comment", "--comment", quote(name+" external IP"),
				"-m", proto, "-p", proto, "-d", ip.String(), "--dport", port, "-j", chains.ext)
		}
		if !v.hasExternal {
			// No endpoints at all (REJECT), or none for traffic from
			// outside (DROP what the EXT chain did not short-circuit).
			r.filter.write("-A", chainExternalServices, "-m", "comment", "--comment", externalComment,
				"-m", proto, "-p", proto, "-d", ip.String(), "--dport", port, "-j", externalTarget)
		}
	}
	// Load balancer IPs: through the firewall chain when source ranges
	// restrict them; what it lets through is DNATed, so what reaches
	// KUBE-PROXY-FIREWALL untranslated was refused.
	lbChain := ""
	if chains != nil {
		lbChain = chains.ext
		if v.usesFW {
			lbChain = chains.fw
		}
	}
	for _, ip := range ext.LoadBalancerIPs {
		if v.hasEndpoints {
			r.nat.write("-A", chainServices, "-m", "comment", "--comment", quote(name+" loadbalancer IP"),
				"-m", proto, "-p", proto, "-d", ip.String(), "--dport", port, "-j", lbChain)
		}
		if v.usesFW {
			r.filter.write("-A", chainProxyFirewall, "-m", "comment", "--comment", quote(name+" traffic not accepted by "+chains.fw),
				"-m", proto, "-p", proto, "-d", ip.String(), "--dport", port, "-j", "DROP")
		}
	}
	if !v.hasExternal {
		for _, ip := range ext.LoadBalancerIPs {
			r.filter.write("-A", chainExternalServices, "-m", "comment", "--comment", externalComment,
				"-m", proto, "-p", proto, "-d", ip.String(), "--dport", port, "-j", externalTarget)
		}
	}
	// The node port, on whichever addresses KUBE-SERVICES sends to
	// KUBE-NODEPORTS. Node ports are not subject to the source ranges.
	if ext.NodePort != 0 {
		nodePort := strconv.Itoa(int(ext.NodePort))
		if v.hasEndpoints {
			if opts.localhostNodePorts && opts.nfacctLocalhost {
				r.nat.write("-A", chainNodePorts, "-m", "comment", "--comment", quote(name), "-m", proto, "-p", proto,
					"-d", "127.0.0.0/8", "--dport", nodePort, "-m", "nfacct", "--nfacct-name", nfacctLocalhostNodePorts, "-j", chains.ext)
			}
			r.nat.write("-A", chainNodePorts, "-m", "comment", "--comment", quote(name), "-m", proto, "-p", proto,
				"--dport", nodePort, "-j", chains.ext)
		}
		if !v.hasExternal {
			r.filter.write("-A", chainExternalServices, "-m", "comment", "--comment", externalComment,
				"-m", "addrtype", "--dst-type", "LOCAL", "-m", proto, "-p", proto, "--dport", nodePort, "-j", externalTarget)
		}
	}
	r.healthCheck(sp)

	if pc == nil {
		// A partial sync leaves this port's chains as they are; count
		// their rules all the same, as kube-proxy's metrics do.
		r.skipped += v.chainRules(opts, &r.in.node)
		return
	}
	r.portChains(&v, pc, name, proto, port)
}

// portChains writes the port's own chains.
func (r *renderer) portChains(v *portView, pc *portChains, name, proto, port string) {
	opts := r.opts
	sp := v.sp
	ext := &sp.External
	for _, c := range pc.names() {
		r.chainDecls.WriteString(chainLine(c) + "\n")
	}

	// ClusterIP traffic from outside the pods' range (the node, or a
	// client routed to the service range) is masqueraded so that replies
	// come back through this node.
	if v.hasInternal && !opts.noClusterIPs && (opts.masqueradeAll || opts.local.detects()) {
		internalChain := pc.svc
		if sp.InternalLocal {
			internalChain = pc.svl
		}
		args := r.rule("-A", internalChain, "-m", "comment", "--comment", quote(name+" cluster IP"),
			"-m", proto, "-p", proto, "-d", sp.ClusterIP.IP.String(), "--dport", port)
		if !opts.masqueradeAll {
			args = append(args, opts.local.ifNotLocal()...)
		}
		r.nat.write(append(args, "-j", chainMarkMasq)...)
	}

	if v.usesExt {
		if !ext.PolicyLocal {
			// Endpoints may be on other nodes: masquerade, or their
			// replies would not come back through this node.
			r.nat.write("-A", pc.ext, "-m", "comment", "--comment", quote("masquerade traffic for "+name+" external destinations"),
				"-j", chainMarkMasq)
		} else {
			// Local endpoints only: the client's address is kept. Pods
			// of this node reach every endpoint, as if they had gone
			// out to the load balancer and come back; so does the node
			// itself, masqueraded, as its source would be the external
			// address, which is local.
			if opts.local.detects() {
				args := r.rule("-A", pc.ext, "-m", "comment", "--comment", quote("pod traffic for "+name+" external destinations"))
				args = append(args, opts.local.ifLocal()...)
				r.nat.write(append(args, "-j", pc.svc)...)
			}
			r.nat.write("-A", pc.ext, "-m", "comment", "--comment", quote("masquerade LOCAL traffic for "+name+" external destinations"),
				"-m", "addrtype", "--src-type", "LOCAL", "-j", chainMarkMasq)
			r.nat.write("-A", pc.ext, "-m", "comment", "--comment", quote("route LOCAL traffic for "+name+" external destinations"),
				"-m", "addrtype", "--src-type", "LOCAL", "-j", pc.svc)
		}
		if v.hasExternal {
			policy := pc.svc
			if ext.PolicyLocal {
				policy = pc.svl
			}
			r.nat.write("-A", pc.ext, "-j", policy)
		}
	}

	if v.usesFW {
		comment := quote(name + " loadbalancer IP")
		for _, cidr := range ext.SourceRanges {
			r.nat.write("-A", pc.fw, "-m", "comment", "--comment", comment, "-s", cidr.String(), "-j", pc.ext)
		}
		if v.allowFromNode(&r.in.node) {
			for _, ip := range ext.LoadBalancerIPs {
				r.nat.write("-A", pc.fw, "-m", "comment", "--comment", comment, "-s", ip.String(), "-j", pc.ext)
			}
		}
		// What falls through was not DNATed: KUBE-PROXY-FIREWALL drops it.
		r.nat.write("-A", pc.fw, "-m", "comment", "--comment", quote("other traffic to "+name+" will be dropped by KUBE-PROXY-FIREWALL"))
	}

	if v.usesCluster {
		r.policyChain(v, pc, pc.svc, pc.subset(v.cluster), name)
	}
	if v.usesLocal {
		r.policyChain(v, pc, pc.svl, pc.subset(v.local), name)
	}

	affinity := sp.Affinity > 0
	for i, b := range pc.eps {
		sep := pc.seps[i]
		args := r.rule("-A", sep)
		if r.comments {
			args = append(args, "-m", "comment", "--comment", quote(name))
		}
		n := len(args)
		// Hairpin: a pod reaching itself through the Service is
		// masqueraded, or its own reply would bypass the DNAT.
		r.nat.write(append(args, "-s", b.IP.String(), "-j", chainMarkMasq)...)
		args = args[:n]
		if affinity {
			// Remember the client's address for this endpoint.
			args = append(args, "-m", "recent", "--name", sep, "--set")
		}
		r.nat.write(append(args, "-m", proto, "-p", proto, "-j", "DNAT", "--to-destination", pc.text[i])...)
	}
}

// healthCheck accepts the port's health check node port, if it has one,
// whether or not this node has endpoints: that is what it is asked.
func (r *renderer) healthCheck(sp *model.ServicePort) {
	if hc := sp.External.HealthCheckNodePort; hc != 0 {
		r.filter.write("-A", chainNodePorts, "-m", "comment", "--comment", quote(portName(sp.Name)+" health check node port"),
			"-m", "tcp", "-p", "tcp", "--dport", strconv.Itoa(int(hc)), "-j", "ACCEPT")
	}
}

// policyChain writes a KUBE-SVC or KUBE-SVL chain over the endpoints
// pc.eps[idx...]: with session affinity, first a jump to the endpoint a
// client used within the timeout, then the cascade of random matches that
// picks each endpoint with equal probability.
func (r *renderer) policyChain(v *portView, pc *portChains, chain string, idx []int, name string) {
	if v.sp.Affinity > 0 {
		seconds := strconv.Itoa(int(v.sp.Affinity.Seconds()))
		for _, i := range idx {
			args := r.rule("-A", chain)
			if r.comments {
				args = append(args, "-m", "comment", "--comment", quote(name+" -> "+pc.text[i]))
			}
			r.nat.write(append(args, "-m", "recent", "--name", pc.seps[i], "--rcheck", "--seconds", seconds, "--reap", "-j", pc.seps[i])...)
		}
	}
	n := len(idx)
	for k, i := range idx {
		args := r.rule("-A", chain)
		if r.comments {
			args = append(args, "-m", "comment", "--comment", quote(name+" -> "+pc.text[i]))
		}
		if k < n-1 {
			args = append(args, "-m", "statistic", "--mode", "random", "--probability", r.probability(n-k))
		}
		r.nat.write(append(args, "-j", pc.seps[i])...)
	}
}

// nodePortsJumps ends KUBE-SERVICES with the jump to KUBE-NODEPORTS for
// packets to the node's own addresses: any local address, or each of the
// listed ones (--nodeport-addresses). 127.0.0.0/8 only with localhost node
// ports; ::1 never, as kube-proxy's IPv6 proxier (a --nodeport-addresses
// naming it is ignored there, with an error in kube-proxy's log at every
// sync).
func (r *renderer) nodePortsJumps() {
	const comment = `"kubernetes service nodeports; NOTE: this must be the last rule in this chain"`
	node := &r.in.node
	if node.AllLocalAddresses {
		args := r.rule("-A", chainServices, "-m", "comment", "--comment", comment, "-m", "addrtype", "--dst-type", "LOCAL")
		switch {
		case r.opts.ipv6:
			args = append(args, "!", "-d", "::1/128")
		case !r.opts.localhostNodePorts:
			args = append(args, "!", "-d", "127.0.0.0/8")
		}
		r.nat.write(append(args, "-j", chainNodePorts)...)
		return
	}
	for _, ip := range node.NodePortAddresses {
		if ip.IsLoopback() && !r.opts.localhostNodePorts {
			continue
		}
		r.nat.write("-A", chainServices, "-m", "comment", "--comment", comment, "-d", ip.String(), "-j", chainNodePorts)
	}
}

// chainRules counts the rules portChains writes for the port, without
// writing them (a partial sync skips unchanged ports, but kube-proxy's rule
// count metric includes them).
func (v *portView) chainRules(opts ruleOptions, node *model.NodeInfo) int {
	if !v.hasEndpoints {
		return 0
	}
	sp := v.sp
	n := 0
	if v.hasInternal && !opts.noClusterIPs && (opts.masqueradeAll || opts.local.detects()) {
		n++
	}
	if v.usesExt {
		if sp.External.PolicyLocal {
			n += 2
			if opts.local.detects() {
				n++
			}
		} else {
			n++
		}
		if v.hasExternal {
			n++
		}
	}
	if v.usesFW {
		n += len(sp.External.SourceRanges) + 1
		if v.allowFromNode(node) {
			n += len(sp.External.LoadBalancerIPs)
		}
	}
	perEndpoint := 1
	if sp.Affinity > 0 {
		perEndpoint = 2
	}
	if v.usesCluster {
		n += perEndpoint * len(v.cluster)
	}
	if v.usesLocal {
		n += perEndpoint * len(v.local)
	}
	return n + 2*len(v.reachable())
}

// writeJumps fixes a table's jumps from built-in chains: older forms of
// ours are deleted, and missing ones inserted at the top of their chains,
// as kube-proxy does, so that other software's rules there come after ours.
func writeJumps(buf *bytes.Buffer, table string, missing []jump, stale []savedRule) {
	for _, s := range stale {
		if s.table == table {
			buf.WriteString("-D" + strings.TrimPrefix(s.rule, "-A") + "\n")
		}
	}
	for _, j := range missing {
		if j.table == table {
			buf.WriteString("-I " + j.from + " 1 " + j.rule() + "\n")
		}
	}
}

// chainsToWrite names the chains of the service ports whose rules a sync
// writes (those rewrite selects), index-aligned with services; the others
// get nil. Each name is a SHA-256, so a sync computes them once, for both
// rendering and finding the chains no longer needed.
func chainsToWrite(services []model.ServicePort, noClusterIPs bool, rewrite func(*model.ServicePort) bool) []*portChains {
	out := make([]*portChains, len(services))
	for i := range services {
		if rewrite(&services[i]) {
			out[i] = chainsOf(&services[i], noClusterIPs)
		}
	}
	return out
}
