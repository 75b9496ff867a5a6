package iptables

import (
	"bytes"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// largeClusterEndpoints is kube-proxy's threshold (all endpoints of all
// services) above which it leaves the per-endpoint comments out: at that
// size they make iptables-restore's input markedly larger and slower to
// apply, and nobody reads a hundred thousand of them.
const largeClusterEndpoints = 1000

// ruleOptions are the node-wide settings that shape the rules.
type ruleOptions struct {
	// masqMark is the fwmark bit that asks KUBE-POSTROUTING to masquerade,
	// formatted as kube-proxy does (0x4000 for bit 14).
	masqMark string
	// clusterCIDR, when valid, is the pods' range: traffic to a ClusterIP
	// from outside it is masqueraded so replies come back through this node.
	clusterCIDR netip.Prefix
	// masqueradeAll masquerades every ClusterIP connection.
	masqueradeAll bool
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
	chains [][]string
	// stale are per-service nat chains to flush and delete.
	stale []string
	// missingJumps are jumps from built-in chains to ours that the tables
	// lack; they are inserted in the same transaction.
	missingJumps []jump
}

// renderStats counts what a sync's rules add up to, skipped ones included,
// as kube-proxy's iptables_total metrics do.
type renderStats struct {
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

// render writes the iptables-restore input for one sync into buf: the
// filter table, then the nat table, each in one COMMIT. Chains named in the
// input are flushed and rewritten; with --noflush nothing else is touched.
func render(buf *bytes.Buffer, opts ruleOptions, in renderInput) renderStats {
	var st renderStats
	endpoints := 0
	for _, sp := range in.services {
		endpoints += len(sp.Backends)
	}
	comments := endpoints <= largeClusterEndpoints

	// filter: connections to a ClusterIP without endpoints are rejected with
	// icmp-port-unreachable (REJECT's default), so clients fail at once
	// with ECONNREFUSED instead of timing out.
	buf.WriteString("*filter\n")
	filter := lines{buf: buf}
	for _, c := range filterTopChains {
		buf.WriteString(chainLine(c) + "\n")
	}
	filter.write("-A", chainForward, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
	filter.write("-A", chainForward, "-m", "comment", "--comment", quote("kubernetes forwarding rules"),
		"-m", "mark", "--mark", opts.masqMark+"/"+opts.masqMark, "-j", "ACCEPT")
	filter.write("-A", chainForward, "-m", "comment", "--comment", quote("kubernetes forwarding conntrack rule"),
		"-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
	for _, sp := range in.services {
		if len(sp.Backends) > 0 {
			continue
		}
		proto := protocol(sp.Name.Protocol)
		filter.write("-A", chainServices, "-m", "comment", "--comment", quote(portName(sp.Name)+" has no endpoints"),
			"-m", proto, "-p", proto, "-d", sp.ClusterIP.IP.String(), "--dport", strconv.Itoa(int(sp.ClusterIP.Port)),
			"-j", "REJECT")
	}
	writeJumps(buf, "filter", in.missingJumps)
	buf.WriteString("COMMIT\n")
	st.filterRules = filter.count

	// nat: chain declarations first (each flushes its chain), then rules,
	// then deletions, so that a chain is deleted only after the rules that
	// jumped to it are gone.
	buf.WriteString("*nat\n")
	for _, c := range natTopChains {
		buf.WriteString(chainLine(c) + "\n")
	}
	var rules bytes.Buffer
	// Roughly what each service and endpoint takes, so that the buffer
	// does not regrow (and re-copy) tens of MiB at 10k Services.
	rules.Grow(250*len(in.services) + 400*endpoints)
	nat := lines{buf: &rules}
	nat.write("-A", chainPostrouting, "-m", "mark", "!", "--mark", opts.masqMark+"/"+opts.masqMark, "-j", "RETURN")
	// Clear the mark so a packet that traverses the stack again is not
	// masqueraded twice.
	nat.write("-A", chainPostrouting, "-j", "MARK", "--xor-mark", opts.masqMark)
	nat.write("-A", chainPostrouting, "-m", "comment", "--comment", quote("kubernetes service traffic requiring SNAT"),
		"-j", "MASQUERADE", "--random-fully")
	nat.write("-A", chainMarkMasq, "-j", "MARK", "--or-mark", opts.masqMark)

	masqRules := 0
	if opts.masqueradeAll || opts.clusterCIDR.IsValid() {
		masqRules = 1
	}
	skipped := 0 // rules of unchanged services, counted but not written
	for i, sp := range in.services {
		if len(sp.Backends) == 0 {
			continue
		}
		name := portName(sp.Name)
		proto := protocol(sp.Name.Protocol)
		chains := in.chains[i]
		var svcChain string
		if chains != nil {
			svcChain = chains[0]
		} else {
			svcChain = serviceChain(sp.Name)
		}
		match := []string{"-m", "comment", "--comment", quote(name + " cluster IP"),
			"-m", proto, "-p", proto, "-d", sp.ClusterIP.IP.String(), "--dport", strconv.Itoa(int(sp.ClusterIP.Port))}
		nat.write(append(append([]string{"-A", chainServices}, match...), "-j", svcChain)...)

		n := len(sp.Backends)
		if chains == nil {
			// A partial sync leaves this service's chains as they are.
			skipped += masqRules + 3*n
			continue
		}
		for _, c := range chains {
			buf.WriteString(chainLine(c) + "\n")
		}
		st.natChainsWritten += len(chains)
		sepChains := chains[1:]

		switch {
		case opts.masqueradeAll:
			nat.write(append(append([]string{"-A", svcChain}, match...), "-j", chainMarkMasq)...)
		case opts.clusterCIDR.IsValid():
			// Traffic from outside the pod range (a node, or a client
			// routed to the service range from outside) is masqueraded so
			// that replies return through this node's conntrack.
			nat.write(append(append([]string{"-A", svcChain}, match...), "!", "-s", opts.clusterCIDR.String(), "-j", chainMarkMasq)...)
		}
		for i, b := range sp.Backends {
			r := []string{"-A", svcChain}
			if comments {
				r = append(r, "-m", "comment", "--comment", quote(name+" -> "+b.String()))
			}
			if i < n-1 {
				r = append(r, "-m", "statistic", "--mode", "random", "--probability", probability(n-i))
			}
			nat.write(append(r, "-j", sepChains[i])...)
		}
		for i, b := range sp.Backends {
			r := []string{"-A", sepChains[i]}
			if comments {
				r = append(r, "-m", "comment", "--comment", quote(name))
			}
			// Hairpin: a pod reaching itself through the Service is
			// masqueraded, or its own reply would bypass the DNAT.
			nat.write(append(r, "-s", b.IP.String(), "-j", chainMarkMasq)...)
			nat.write(append(r, "-m", proto, "-p", proto, "-j", "DNAT", "--to-destination", b.String())...)
		}
	}
	nat.write("-A", chainServices, "-m", "comment", "--comment", quote("kubernetes service nodeports; NOTE: this must be the last rule in this chain"),
		"-m", "addrtype", "--dst-type", "LOCAL", "-j", chainNodePorts)

	for _, c := range in.stale {
		buf.WriteString(chainLine(c) + "\n")
	}
	buf.Write(rules.Bytes())
	for _, c := range in.stale {
		buf.WriteString("-X " + c + "\n")
	}
	writeJumps(buf, "nat", in.missingJumps)
	buf.WriteString("COMMIT\n")
	st.natRulesWritten = nat.count
	st.natRules = nat.count + skipped
	return st
}

// writeJumps inserts a table's missing jumps at the top of their built-in
// chains, as kube-proxy does, so that other software's rules there come
// after ours.
func writeJumps(buf *bytes.Buffer, table string, missing []jump) {
	for _, j := range missing {
		if j.table != table {
			continue
		}
		rule := append([]string{"-m", "comment", "--comment", quote(j.comment)}, j.extra...)
		buf.WriteString("-I " + j.from + " 1 " + strings.Join(append(rule, "-j", j.to), " ") + "\n")
	}
}

// chainsToWrite names the chains of the service ports whose rules a sync
// writes (those rewrite selects), index-aligned with services; the others
// get nil. Each name is a SHA-256, so a sync computes them once, for both
// rendering and finding the chains no longer needed.
func chainsToWrite(services []model.ServicePort, rewrite func(model.ServiceName) bool) [][]string {
	out := make([][]string, len(services))
	for i, sp := range services {
		if rewrite(sp.Name.ServiceName) {
			out[i] = chainsOf(sp)
		}
	}
	return out
}

// chainsOf lists the nat chains a service port's rules live in: its
// KUBE-SVC chain, then a KUBE-SEP chain per backend, in backend order.
func chainsOf(sp model.ServicePort) []string {
	if len(sp.Backends) == 0 {
		return nil
	}
	out := []string{serviceChain(sp.Name)}
	for _, b := range sp.Backends {
		out = append(out, endpointChain(sp.Name, b))
	}
	return out
}
