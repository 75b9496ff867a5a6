package iptables

import (
	"fmt"
	"net/netip"
	"strings"
)

// LocalTraffic says which packets come from this node's pods, as
// kube-proxy's --detect-local-mode (pkg/proxy/util LocalTrafficDetector):
// by their source address (modes ClusterCIDR and NodeCIDR) or by the
// interface they come in on (BridgeInterface, InterfaceNamePrefix). The
// rules masquerade ClusterIP traffic that is not local, so that replies
// come back through this node, and send local traffic to an external
// frontend of an externalTrafficPolicy Local Service to every endpoint, as
// if it had gone out to the load balancer and come back. The zero value
// detects nothing: neither rule is written.
type LocalTraffic struct {
	// cidr is the pods' range, when matched by source.
	cidr netip.Prefix
	// iface is iptables' -i argument when matched by interface: a name,
	// or a prefix followed by "+".
	iface string
}

// LocalByCIDR detects local traffic by its source address: the cluster's
// pod range (ClusterCIDR) or this node's (NodeCIDR).
func LocalByCIDR(p netip.Prefix) LocalTraffic { return LocalTraffic{cidr: p.Masked()} }

// LocalByBridge detects local traffic by the bridge it comes in on
// (BridgeInterface): pods' veths are ports of that bridge.
func LocalByBridge(name string) LocalTraffic { return LocalTraffic{iface: name} }

// LocalByInterfacePrefix detects local traffic by the name of the
// interface it comes in on (InterfaceNamePrefix): each pod's veth on the
// node starts with prefix.
func LocalByInterfacePrefix(prefix string) LocalTraffic { return LocalTraffic{iface: prefix + "+"} }

// ValidateInterfaceName checks a name (or prefix) iptables' -i takes: not
// empty, at most 15 characters (IFNAMSIZ less the NUL), no whitespace,
// slash or '+' (iptables' own wildcard). A bad one would fail every
// iptables-restore, so it is refused at start.
func ValidateInterfaceName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("must not be empty")
	case len(name) > 15:
		return fmt.Errorf("%q is longer than an interface name can be (15 characters)", name)
	case strings.ContainsAny(name, " \t\n/+:"):
		return fmt.Errorf("%q is not an interface name", name)
	}
	return nil
}

// detects reports whether local traffic is detected at all.
func (l LocalTraffic) detects() bool { return l.cidr.IsValid() || l.iface != "" }

// ifLocal returns the match for local traffic.
func (l LocalTraffic) ifLocal() []string {
	if l.iface != "" {
		return []string{"-i", l.iface}
	}
	return []string{"-s", l.cidr.String()}
}

// ifNotLocal returns the match for traffic that is not local.
func (l LocalTraffic) ifNotLocal() []string {
	return append([]string{"!"}, l.ifLocal()...)
}

// String describes the detection, for logs.
func (l LocalTraffic) String() string {
	switch {
	case l.iface != "":
		return "interface " + l.iface
	case l.cidr.IsValid():
		return "source " + l.cidr.String()
	}
	return "none"
}
