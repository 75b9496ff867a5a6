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

	prefixServiceChain  = "KUBE-SVC-"
	prefixEndpointChain = "KUBE-SEP-"
)

// Prefixes of per-service chains, ours and those of the features kube-proxy
// adds on top (external traffic, firewalls, local-only policies): any of
// them left in a table is stale once no rule of ours names it.
var perServicePrefixes = []string{prefixServiceChain, prefixEndpointChain, "KUBE-EXT-", "KUBE-SVL-", "KUBE-FW-", "KUBE-XLB-"}

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

var ctNew = []string{"-m", "conntrack", "--ctstate", "NEW"}

// jumps are kube-proxy's, in the same built-in chains with the same
// comments.
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

// portName is the service port's name as kube-proxy prints it and hashes
// it: "namespace/name:port", or "namespace/name" for an unnamed port.
func portName(n model.ServicePortName) string {
	if n.Port == "" {
		return n.ServiceName.String()
	}
	return n.ServiceName.String() + ":" + n.Port
}

func protocol(p model.Protocol) string { return strings.ToLower(p.String()) }

// hashed derives a chain name as kube-proxy does: the first 16 characters
// of the base32 SHA-256 of what identifies the chain. The same Service gets
// the same chain names from both proxies, which makes their rules diffable.
func hashed(prefix string, parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "")))
	return prefix + base32.StdEncoding.EncodeToString(sum[:])[:16]
}

func serviceChain(n model.ServicePortName) string {
	return hashed(prefixServiceChain, portName(n), protocol(n.Protocol))
}

func endpointChain(n model.ServicePortName, b model.Backend) string {
	return hashed(prefixEndpointChain, portName(n), protocol(n.Protocol), b.String())
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
// cleanup removes).
func ownedChain(name string) bool {
	switch name {
	case chainServices, chainExternalServices, chainNodePorts, chainPostrouting, chainMarkMasq, chainForward, chainProxyFirewall:
		return true
	}
	return isPerServiceChain(name)
}
