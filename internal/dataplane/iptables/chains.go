package iptables

import (
	"crypto/sha256"
	"encoding/base32"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// The chains kube-proxy's iptables mode owns, by the same names, so that
// operators' tooling, runbooks and kube-proxy's own cleanup keep working.
const (
	chainServices         = "KUBE-SERVICES"
	chainExternalServices = "KUBE-EXTERNAL-SERVICES"
	chainNodePorts        = "KUBE-NODEPORTS"
	chainPostrouting      = "KUBE-POSTROUTING"
	chainMarkMasq         = "KUBE-MARK-MASQ"
	chainForward          = "KUBE-FORWARD"
	chainProxyFirewall    = "KUBE-PROXY-FIREWALL"
	// chainCanary is kube-proxy's canary: an empty chain in mangle, nat
	// and filter whose disappearance tells that someone deleted the
	// tables' chains, ours with them. Each --sync-period checks it
	// (Dataplane.Intact), and a missing one makes the next sync a full
	// one, which restores everything.
	chainCanary = "KUBE-PROXY-CANARY"
	// chainPacketsCanary is the eBPF mode's packet layer's canary, in nat
	// and filter: that layer is no kube-proxy, and tools reading
	// KUBE-PROXY-CANARY as a sign of kube-proxy should not find one.
	chainPacketsCanary = "KUBE-BPF-PROXY-CANARY"
	// chainFirewall is kubelet's chain, which kube-proxy writes too: it
	// guards route_localnet (needed for node ports on 127.0.0.1) by
	// dropping packets to 127.0.0.0/8 that come from elsewhere.
	chainFirewall = "KUBE-FIREWALL"

	prefixServiceChain  = "KUBE-SVC-" // Cluster policy endpoints
	prefixLocalChain    = "KUBE-SVL-" // Local policy endpoints
	prefixExternalChain = "KUBE-EXT-" // external frontends: masquerade, short-circuit
	prefixFirewallChain = "KUBE-FW-"  // loadBalancerSourceRanges
	prefixEndpointChain = "KUBE-SEP-"
)

// Prefixes of per-service chains, ours and kube-proxy's older ones
// (KUBE-XLB- until v1.24): any of them left in a table is stale once no rule
// of ours names it.
var perServicePrefixes = []string{prefixServiceChain, prefixEndpointChain, prefixExternalChain, prefixLocalChain, prefixFirewallChain, "KUBE-XLB-"}

// Top-level chains, declared (and so flushed and rewritten) on every sync.
var (
	natTopChains    = []string{chainServices, chainNodePorts, chainPostrouting, chainMarkMasq}
	filterTopChains = []string{chainServices, chainExternalServices, chainForward, chainNodePorts, chainProxyFirewall}
)

// jump is a rule in a built-in chain that sends traffic into ours. An
// --noflush restore cannot rewrite a built-in chain without touching other
// software's rules there, so a full sync looks for each jump in the tables
// it read back and inserts only the missing ones.
type jump struct {
	table, from, to, comment string
	extra                    []string
}

// rule is the jump as iptables-save prints it (and as restore takes it
// after -A or -I): kube-proxy puts its extra matches before the comment.
func (j jump) rule() string {
	var b strings.Builder
	for _, w := range j.extra {
		b.WriteString(w + " ")
	}
	if j.comment != "" {
		b.WriteString(`-m comment --comment "` + j.comment + `" `)
	}
	b.WriteString("-j " + j.to)
	return b.String()
}

var ctNew = []string{"-m", "conntrack", "--ctstate", "NEW"}

// jumps are kube-proxy's, in the same built-in chains with the same
// comments, in the order kube-proxy prepends them.
var jumps = []jump{
	{"filter", "INPUT", chainExternalServices, "kubernetes externally-visible service portals", ctNew},
	{"filter", "FORWARD", chainExternalServices, "kubernetes externally-visible service portals", ctNew},
	{"filter", "INPUT", chainNodePorts, "kubernetes health check service ports", nil},
	{"filter", "FORWARD", chainServices, "kubernetes service portals", ctNew},
	{"filter", "OUTPUT", chainServices, "kubernetes service portals", ctNew},
	{"filter", "FORWARD", chainForward, "kubernetes forwarding rules", nil},
	{"filter", "INPUT", chainProxyFirewall, "kubernetes load balancer firewall", ctNew},
	{"filter", "OUTPUT", chainProxyFirewall, "kubernetes load balancer firewall", ctNew},
	{"filter", "FORWARD", chainProxyFirewall, "kubernetes load balancer firewall", ctNew},
	{"nat", "OUTPUT", chainServices, "kubernetes service portals", nil},
	{"nat", "PREROUTING", chainServices, "kubernetes service portals", nil},
	{"nat", "POSTROUTING", chainPostrouting, "kubernetes postrouting rules", nil},
}

// firewallJumps are kubelet's jumps to KUBE-FIREWALL, which kube-proxy
// ensures after its own (so they come first in INPUT and OUTPUT).
var firewallJumps = []jump{
	{"filter", "INPUT", chainFirewall, "", nil},
	{"filter", "OUTPUT", chainFirewall, "", nil},
}

// jumpsFor lists the jumps a mode makes: the external-only mode guards no
// localhost node ports, so it leaves KUBE-FIREWALL to kubelet.
func jumpsFor(externalOnly bool) []jump {
	if externalOnly {
		return jumps
	}
	return append(append([]jump(nil), jumps...), firewallJumps...)
}

// portName is the service port's name as kube-proxy prints it and hashes
// it: "namespace/name:port", or "namespace/name" for an unnamed port.
func portName(n model.ServicePortName) string {
	if n.Port == "" {
		return n.ServiceName.String()
	}
	return n.ServiceName.String() + ":" + n.Port
}

func protocol(p model.Protocol) string { return strings.ToLower(p.String()) }

// hashOf is kube-proxy's chain-name hash: the first 16 characters of the
// base32 SHA-256 of what identifies the chain. The same Service gets the
// same chain names from both proxies, which makes their rules diffable.
func hashOf(s string) string {
	sum := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(sum[:])[:16]
}

// portHash is the suffix every per-port chain of a service port shares
// (KUBE-SVC-, KUBE-SVL-, KUBE-EXT-, KUBE-FW-): the hash of its name and
// protocol.
func portHash(n model.ServicePortName) string { return hashOf(portName(n) + protocol(n.Protocol)) }

func serviceChain(n model.ServicePortName) string { return prefixServiceChain + portHash(n) }

func endpointChain(n model.ServicePortName, b model.Backend) string {
	return prefixEndpointChain + hashOf(portName(n)+protocol(n.Protocol)+b.String())
}

func isPerServiceChain(name string) bool {
	for _, p := range perServicePrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// ownedChain reports whether a chain is one this mode creates (and so one
// cleanup removes). KUBE-FIREWALL is not: kubelet makes it too, and it
// guards route_localnet, which stays set (cleanup removes it only when it
// is empty, see cleanupInput).
func ownedChain(name string) bool {
	switch name {
	case chainServices, chainExternalServices, chainNodePorts, chainPostrouting, chainMarkMasq, chainForward, chainProxyFirewall, chainCanary, chainPacketsCanary:
		return true
	}
	return isPerServiceChain(name)
}

// canaryChain is the canary chain a mode writes at each full sync.
func canaryChain(externalOnly bool) string {
	if externalOnly {
		return chainPacketsCanary
	}
	return chainCanary
}

// canaryTables are the tables holding it; the first is the one checked,
// as kube-proxy's Monitor polls mangle only: a table of a few rules, where
// listing the canary costs milliseconds, while the legacy backend reads a
// whole table to list a chain of it (at 10k Services, a second for nat).
// A firewall reload deletes every table's chains. The packet layer writes
// nothing in mangle: filter, small too, is its first.
func canaryTables(externalOnly bool) []string {
	if externalOnly {
		return []string{"filter", "nat"}
	}
	return []string{"mangle", "nat", "filter"}
}
