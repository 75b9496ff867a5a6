package model

import "net/netip"

// IPFamily is an IP address family. kube-proxy runs one proxier per family
// on a dual-stack node, and so does this proxy: each family has its own
// Tracker, snapshots and datapath, and a Service with ClusterIPs of both
// families is served by both.
type IPFamily uint8

const (
	IPv4 IPFamily = 4
	IPv6 IPFamily = 6
)

// Families lists the families in the order a dual-stack proxy starts them.
var Families = []IPFamily{IPv4, IPv6}

// String returns "IPv4" or "IPv6": the API's spelling (v1.IPFamily) and the
// values of kube-proxy's ip_family metric label.
func (f IPFamily) String() string {
	switch f {
	case IPv4:
		return "IPv4"
	case IPv6:
		return "IPv6"
	default:
		return "unknown"
	}
}

// FamilyOf returns the family of ip. An IPv4-mapped IPv6 address
// (::ffff:a.b.c.d) is IPv6, as net/netip has it: callers that take one for
// the IPv4 address it carries unmap it first.
func FamilyOf(ip netip.Addr) IPFamily {
	if ip.Is4() {
		return IPv4
	}
	return IPv6
}

// UnmapPrefix returns an IPv4-mapped prefix (::ffff:10.0.0.0/104: an
// IPv4-mapped address and at least 96 bits) as the IPv4 prefix it carries,
// as net.ParseCIDR and so kube-proxy read a range the user wrote; any other
// prefix as it is.
func UnmapPrefix(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p
}

// Has reports whether ip is a valid address of family f.
func (f IPFamily) Has(ip netip.Addr) bool {
	return ip.IsValid() && FamilyOf(ip) == f
}

// Other is the other family.
func (f IPFamily) Other() IPFamily {
	if f == IPv4 {
		return IPv6
	}
	return IPv4
}
