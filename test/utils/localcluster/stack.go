package localcluster

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// Stack is the IP families a cluster runs (Options.Stack). The first
// family of a stack is its primary one, as the first of a dual-stack
// cluster's ranges is: the API server's --advertise-address, the
// default/kubernetes Service's ClusterIP, a Node's spec.podCIDR and a Pod's
// status.podIP are of that family.
type Stack string

const (
	// IPv4Only is the default: IPv4 everywhere, as the cluster has always
	// been.
	IPv4Only Stack = ""
	// DualStack gives the cluster a Service range, a cluster CIDR, node
	// and pod addresses of both families, IPv4 first.
	DualStack Stack = "dual-stack"
	// IPv6Only gives it IPv6 only: the Service range, the cluster CIDR,
	// the nodes' and pods' addresses (the control plane still talks to
	// etcd on the first node's 127.0.0.1).
	IPv6Only Stack = "ipv6"
)

// ParseStack reads a stack's name: "ipv4" (or ""), "dual-stack" or "ipv6".
func ParseStack(s string) (Stack, error) {
	switch s {
	case "", "ipv4":
		return IPv4Only, nil
	case string(DualStack), string(IPv6Only):
		return Stack(s), nil
	}
	return "", fmt.Errorf("unknown stack %q: want ipv4, dual-stack or ipv6", s)
}

// String is the stack's name as ParseStack reads it.
func (s Stack) String() string {
	if s == IPv4Only {
		return "ipv4"
	}
	return string(s)
}

// Families lists the stack's families, the primary one first.
func (s Stack) Families() []model.IPFamily {
	switch s {
	case DualStack:
		return []model.IPFamily{model.IPv4, model.IPv6}
	case IPv6Only:
		return []model.IPFamily{model.IPv6}
	}
	return []model.IPFamily{model.IPv4}
}

// Has reports whether the stack runs family f.
func (s Stack) Has(f model.IPFamily) bool {
	for _, g := range s.Families() {
		if g == f {
			return true
		}
	}
	return false
}

// The IPv6 twins of the IPv4 ranges in network.go, all in the unique local
// range fd00::/8 and only ever inside the cluster's namespaces (nothing of
// them is routed out).
const (
	nodeSubnet6 = "fd00:30::/64"
	wanSubnet6  = "fd00:31::/64"
	// podGateway6 is the node's link-local address on every pod link:
	// an IPv6 default route needs no more than that.
	podGateway6 = "fe80::1"
	// ServiceCIDR6 is the API server's IPv6 Service range: /112, as
	// kind's, well within the API server's limit of /108 and smaller.
	ServiceCIDR6 = "fd00:96::/112"
	// ClusterCIDR6 holds every node's IPv6 pod CIDR (a /64 each).
	ClusterCIDR6 = "fd00:244::/48"
	// WANClientAddress6 is WANClientAddress's IPv6 twin.
	WANClientAddress6 = "fd00:31::1"
)

// nodeAddr is the i-th node's InternalIP of family f.
func nodeAddr(f model.IPFamily, i int) string {
	if f == model.IPv6 {
		return fmt.Sprintf("fd00:30::%d", 11+i)
	}
	return fmt.Sprintf("172.30.0.%d", 11+i)
}

// wanAddr is the i-th node's address on the wan link.
func wanAddr(f model.IPFamily, i int) string {
	if f == model.IPv6 {
		return fmt.Sprintf("fd00:31::%d", 11+i)
	}
	return fmt.Sprintf("172.31.0.%d", 11+i)
}

// podCIDR is the i-th node's pod CIDR of family f.
func podCIDR(f model.IPFamily, i int) string {
	if f == model.IPv6 {
		return fmt.Sprintf("fd00:244:0:%d::/64", i+1)
	}
	return fmt.Sprintf("10.244.%d.0/24", i+1)
}

// linkBits is the prefix length of the node and wan links.
func linkBits(f model.IPFamily) string {
	if f == model.IPv6 {
		return "/64"
	}
	return "/24"
}

// hostBits is the prefix length of one address.
func hostBits(f model.IPFamily) string {
	if f == model.IPv6 {
		return "/128"
	}
	return "/32"
}

// podAddr is the address host of a pod CIDR: the last byte set to host.
func podAddr(cidr string, host int) string {
	a := netip.MustParsePrefix(cidr).Addr()
	if a.Is4() {
		b := a.As4()
		b[3] = byte(host)
		return netip.AddrFrom4(b).String()
	}
	b := a.As16()
	b[15] = byte(host)
	return netip.AddrFrom16(b).String()
}

// familyOf is the family of an address or CIDR in text.
func familyOf(s string) model.IPFamily {
	if strings.Contains(s, ":") {
		return model.IPv6
	}
	return model.IPv4
}

// ServiceCIDRs are the API server's --service-cluster-ip-range, one per
// family of the stack, the primary first.
func (s Stack) ServiceCIDRs() []string {
	return perFamily(s, ServiceCIDR, ServiceCIDR6)
}

// ClusterCIDRs hold the pods' addresses, one per family, the primary first.
func (s Stack) ClusterCIDRs() []string {
	return perFamily(s, ClusterCIDR, ClusterCIDR6)
}

// KubernetesServiceIP is default/kubernetes's ClusterIP: the first address
// of the primary Service range.
func (s Stack) KubernetesServiceIP() string {
	return netip.MustParsePrefix(s.ServiceCIDRs()[0]).Addr().Next().String()
}

func perFamily(s Stack, v4, v6 string) []string {
	var out []string
	for _, f := range s.Families() {
		if f == model.IPv6 {
			out = append(out, v6)
		} else {
			out = append(out, v4)
		}
	}
	return out
}

// ofFamily returns the first of addrs (addresses or CIDRs) of family f, ""
// if none is.
func ofFamily(addrs []string, f model.IPFamily) string {
	for _, a := range addrs {
		if familyOf(a) == f {
			return a
		}
	}
	return ""
}

// IPOf is the node's InternalIP of family f, "" if the cluster's stack has
// none.
func (n NodeInfo) IPOf(f model.IPFamily) string { return ofFamily(n.AllIPs(), f) }

// AllIPs are the node's InternalIPs, the primary family's first.
func (n NodeInfo) AllIPs() []string {
	if len(n.IPs) == 0 { // recorded before nodes had several
		return []string{n.IP}
	}
	return n.IPs
}

// AllPodCIDRs are the node's pod CIDRs (its spec.podCIDRs), the primary
// family's first.
func (n NodeInfo) AllPodCIDRs() []string {
	if len(n.PodCIDRs) == 0 {
		return []string{n.PodCIDR}
	}
	return n.PodCIDRs
}

// IPOf is the pod's address of family f; invalid if the cluster's stack
// has none.
func (p *Pod) IPOf(f model.IPFamily) netip.Addr {
	for _, a := range p.IPs {
		if f.Has(a) {
			return a
		}
	}
	return netip.Addr{}
}

// Families are the cluster's IP families, the primary first.
func (c *Cluster) Families() []model.IPFamily { return c.Stack.Families() }

// ServiceOptions describe a Service for NewService: one TCP port (Port,
// sent to TargetPort, default Port) on the pods Selector picks, with an IP
// family policy and families as a user writes them (both empty: the API
// server's defaults, SingleStack of the primary family).
type ServiceOptions struct {
	Namespace, Name string
	Selector        map[string]string
	Port            int32
	TargetPort      int32
	Policy          corev1.IPFamilyPolicy
	Families        []model.IPFamily
}

// NewService returns the Service o describes, to create with the client.
func NewService(o ServiceOptions) *corev1.Service {
	target := o.TargetPort
	if target == 0 {
		target = o.Port
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: o.Namespace, Name: o.Name},
		Spec: corev1.ServiceSpec{
			Selector: o.Selector,
			Ports: []corev1.ServicePort{{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: o.Port,
				TargetPort: intstr.FromInt32(target)}},
		},
	}
	if o.Policy != "" {
		svc.Spec.IPFamilyPolicy = &o.Policy
	}
	for _, f := range o.Families {
		svc.Spec.IPFamilies = append(svc.Spec.IPFamilies, corev1.IPFamily(f.String()))
	}
	return svc
}

// ClusterIPOf returns the Service's ClusterIP of family f (from
// spec.clusterIPs, which holds one per family of a dual-stack Service).
func ClusterIPOf(svc *corev1.Service, f model.IPFamily) (netip.Addr, bool) {
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	for _, s := range ips {
		if a, err := netip.ParseAddr(s); err == nil && f.Has(a) {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// ConnectArgs is the command that makes n TCP connections to addr:port
// from the namespace it runs in and prints a line per connection ("ok NAME
// peer=ADDR" from a server testnet's "serve" helper runs, or "err ..."): an
// AF_INET socket for an IPv4 address, an AF_INET6 one for an IPv6 address.
// Run it with Pod.Output or Cluster.NodeOutput. It re-runs this test
// binary as testnet's helper, so the binary's TestMain must call
// testnet.RunHelperIfRequested.
func ConnectArgs(addr netip.Addr, port uint16, n int) []string {
	helper := "tcp"
	if addr.Is6() {
		helper = "tcp6"
	}
	return testnet.Helper(helper, netip.AddrPortFrom(addr, port).String(), fmt.Sprint(n))
}

// ServeArgs is the command of a pod that answers each TCP connection (HTTP,
// for curl) and UDP datagram with name (testnet's "serve" helper; see
// ConnectArgs) on listens ("tcp:80", "udp:5353": IPv4), and, on a stack
// with IPv6, on each one's IPv6 twin ("tcp6:80", "udp6:5353") too.
func (s Stack) ServeArgs(name string, listens ...string) []string {
	all := slices.Clone(listens)
	if s.Has(model.IPv6) {
		for _, l := range listens {
			if proto, port, ok := strings.Cut(l, ":"); ok && (proto == "tcp" || proto == "udp") {
				all = append(all, proto+"6:"+port)
			}
		}
	}
	return testnet.Helper(append([]string{"serve", name}, all...)...)
}

// ServiceAddr is the Service's ClusterIP of family f with its first port:
// what ConnectFrom and Pod.Connect take.
func ServiceAddr(svc *corev1.Service, f model.IPFamily) (netip.AddrPort, bool) {
	ip, ok := ClusterIPOf(svc, f)
	if !ok || len(svc.Spec.Ports) == 0 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ip, uint16(svc.Spec.Ports[0].Port)), true
}

// Connect makes n TCP connections to addr from the pod (ConnectArgs) and
// returns one result line each.
func (p *Pod) Connect(ctx context.Context, addr netip.AddrPort, n int) ([]string, error) {
	out, err := p.Output(ctx, ConnectArgs(addr.Addr(), addr.Port(), n)...)
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimSpace(out), "\n"), nil
}

// NodeConnect makes n TCP connections to addr from the node's network
// namespace, as a hostNetwork client does, in the node's cgroup (so the
// node's socket programs see it, as they see every process of a real
// node), and returns one result line each.
func (c *Cluster) NodeConnect(ctx context.Context, node string, addr netip.AddrPort, n int) ([]string, error) {
	nd, err := c.Node(node)
	if err != nil {
		return nil, err
	}
	p := &Pod{Name: "hostNetwork client on " + node, Node: node, NetNS: nd.NetNS, cgroup: nd.Cgroup}
	return p.Connect(ctx, addr, n)
}
