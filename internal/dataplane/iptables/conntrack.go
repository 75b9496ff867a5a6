package iptables

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// UDP has no connection to end, so conntrack keeps a flow's translation for
// as long as packets keep coming (30 s after the last one by default). A DNS
// client that retries from one source port would stay pinned to a backend
// that is gone, or, if its first packets left before the Service had
// endpoints, to no translation at all. Those entries must be deleted.
//
// staleUDP lists the UDP frontends to check (see Dataplane.staleUDP for
// which), each with its serving endpoints now. A flow to such a frontend
// is stale unless it is translated to one of them.
type staleUDP struct {
	// byAddr holds ClusterIPs, external IPs and load balancer IPs.
	byAddr map[netip.AddrPort]map[netip.AddrPort]bool
	// byNodePort holds node ports. As kube-proxy's (pkg/proxy/conntrack,
	// v1.36), a node port flow is matched by protocol and destination port
	// alone, whatever its destination address: KUBE-NODEPORTS serves the
	// port on every address the kernel deems local (--dst-type LOCAL),
	// which includes VIPs a cloud installs as local routes without putting
	// them on an interface (GCP's load balancer IPs), so the node's
	// interface addresses would miss flows the rules translated.
	byNodePort map[uint16]map[netip.AddrPort]bool
}

func newStaleUDP() *staleUDP {
	return &staleUDP{byAddr: make(map[netip.AddrPort]map[netip.AddrPort]bool), byNodePort: make(map[uint16]map[netip.AddrPort]bool)}
}

func (s *staleUDP) empty() bool { return len(s.byAddr) == 0 && len(s.byNodePort) == 0 }

// frontends lists what is checked, for tests and logs.
func (s *staleUDP) frontends() []string {
	var out []string
	for fe := range s.byAddr {
		out = append(out, fe.String())
	}
	for p := range s.byNodePort {
		out = append(out, fmt.Sprintf("nodeport %d", p))
	}
	return out
}

func addrPort(ip net.IP, port uint16) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), port)
}

// MatchConntrackFlow implements netlink.CustomConntrackFilter.
func (s *staleUDP) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	if flow.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	dst := addrPort(flow.Forward.DstIP, flow.Forward.DstPort)
	backends, ok := s.byAddr[dst]
	if !ok {
		if backends, ok = s.byNodePort[dst.Port()]; !ok {
			return false
		}
	}
	// The reply's source is where the flow really goes: a backend when it
	// was translated, the frontend itself when it was not.
	return !backends[addrPort(flow.Reverse.SrcIP, flow.Reverse.SrcPort)]
}

// add records a UDP frontend and the endpoints whose flows are kept.
func (s *staleUDP) add(fe model.Frontend, now map[netip.AddrPort]bool) {
	s.byAddr[netip.AddrPortFrom(fe.IP, fe.Port)] = now
}

// addNodePort records a UDP node port and the endpoints whose flows are
// kept.
func (s *staleUDP) addNodePort(port uint16, now map[netip.AddrPort]bool) {
	s.byNodePort[port] = now
}

// conntrack deletes flows from the kernel's connection tracking table.
type conntrack interface {
	deleteStale(*staleUDP) (uint, error)
	Close()
}

// netlinkConntrack deletes one family's flows: each proxy cleans up its
// own family's table (AF_INET or AF_INET6), as kube-proxy's per-family
// proxiers do (pkg/proxy/conntrack, v1.36).
type netlinkConntrack struct {
	h      *netlink.Handle
	family netlink.InetFamily
}

// openConntrack opens a netfilter netlink socket in the network namespace
// at nsPath, or in this process's if it is empty, for family's flows.
func openConntrack(nsPath string, family model.IPFamily) (*netlinkConntrack, error) {
	af := netlink.InetFamily(unix.AF_INET)
	if family == model.IPv6 {
		af = unix.AF_INET6
	}
	if nsPath == "" {
		h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
		if err != nil {
			return nil, fmt.Errorf("opening conntrack netlink socket: %w", err)
		}
		return &netlinkConntrack{h, af}, nil
	}
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("opening network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("opening conntrack netlink socket in %s: %w", nsPath, err)
	}
	return &netlinkConntrack{h, af}, nil
}

func (c *netlinkConntrack) deleteStale(s *staleUDP) (uint, error) {
	n, err := c.h.ConntrackDeleteFilters(netlink.ConntrackTable, c.family, s)
	if err != nil {
		return n, fmt.Errorf("deleting stale UDP conntrack entries: %w", err)
	}
	return n, nil
}

func (c *netlinkConntrack) Close() { c.h.Close() }
