// Package nodeinfo keeps what the datapaths need to know of the node the
// proxy runs on: which of its addresses serve node ports
// (--nodeport-addresses, with kube-proxy's semantics), every address it has
// (an external IP is local when it is one), its zone label (for topology
// hints) and the cluster's Service IP ranges (ServiceCIDR objects). All of
// it but the zone is per address family: a proxier of each family reads
// its own (InfoFor), as kube-proxy runs one proxier per family.
//
// Addresses are read from the kernel at each sync, as kube-proxy reads them:
// interfaces come and go without any API event. The zone, the node's primary
// address, whether it is eligible for load balancer traffic (/healthz) and
// the Service ranges come from the API server.
package nodeinfo

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Primary is the --nodeport-addresses keyword for the node's primary
// addresses: per family, the Node's first InternalIP of that family, else
// its first ExternalIP of it, or a specific --bind-address for its own
// family (Config.BindAddress; kube-proxy's detectNodeIPs and "primary").
const Primary = "primary"

// Selector is a parsed --nodeport-addresses: the node ports are served on
// the node's addresses inside Prefixes, or on its primary addresses; with
// neither, on every local address. It holds both families; ChooseFor reads
// one.
type Selector struct {
	Prefixes []netip.Prefix
	Primary  bool
}

// ParseSelector parses --nodeport-addresses: empty, "primary", or IPv4
// and IPv6 CIDRs, mixed as the user likes.
func ParseSelector(values []string) (Selector, error) {
	var s Selector
	for _, v := range values {
		v = strings.TrimSpace(v)
		if v == "" {
			continue
		}
		if v == Primary {
			s.Primary = true
			continue
		}
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return Selector{}, fmt.Errorf("--nodeport-addresses %q: want %q or CIDRs such as 10.0.0.0/8,127.0.0.0/8,fd00::/64", v, Primary)
		}
		// ::ffff:10.0.0.0/104 is 10.0.0.0/8, as kube-proxy reads it:
		// as an IPv6 range it would leave the IPv4 family with no
		// CIDR, which serves every IPv4 address.
		s.Prefixes = append(s.Prefixes, model.UnmapPrefix(p).Masked())
	}
	if s.Primary && len(s.Prefixes) > 0 {
		return Selector{}, fmt.Errorf("--nodeport-addresses: %q cannot be combined with CIDRs", Primary)
	}
	return s, nil
}

// All reports whether the selector leaves every local address of every
// family serving.
func (s Selector) All() bool { return !s.Primary && len(s.Prefixes) == 0 }

// ChooseFor returns the addresses of family f among local that serve node
// ports, sorted as local is, and whether node ports of f are served on
// every local address of f (NodeInfo.AllLocalAddresses). primary is the
// Node's primary address of f (invalid if it has none or is not known),
// nodeSeen whether the Node's addresses are known at all. As kube-proxy's
// NewNodePortAddresses for the proxier of f:
//
//   - with no selector, with CIDRs none of which is of f, or with a
//     zero-length CIDR of f (0.0.0.0/0, ::/0), every local address of f
//     serves (kube-proxy adds 0.0.0.0/0 or ::/0 when the flag names no CIDR
//     of the family): all is true;
//   - "primary" serves the primary address of f; a Node seen without one
//     (an IPv4 InternalIP only, on a dual-stack node) leaves the flag with
//     no address of f, and so every local address of f serves, as in
//     kube-proxy, which turns "primary" into the node IPs' /32 and /128
//     and then finds no CIDR of the other family; before the Node is seen,
//     no address serves;
//   - CIDRs of f serve the addresses of f inside them.
//
// Loopback addresses are left out of the list unless a CIDR names them
// deliberately (a node port on 127.0.0.1 opens the Service to every
// process on the node through an address that bypasses host firewalls),
// and an IPv6 loopback address always, as kube-proxy never serves node
// ports on ::1 ("localhost NodePorts are not supported on IPv6"). IPv6
// link-local addresses (fe80::/10) serve when every address does, as
// kube-proxy's "--dst-type LOCAL" match includes them.
func (s Selector) ChooseFor(f model.IPFamily, local []netip.Addr, primary netip.Addr, nodeSeen bool) (addrs []netip.Addr, all bool) {
	var prefixes []netip.Prefix
	for _, p := range s.Prefixes {
		if f.Has(p.Addr()) {
			prefixes = append(prefixes, p)
		}
	}
	all = !s.Primary && (len(prefixes) == 0 || slices.ContainsFunc(prefixes, func(p netip.Prefix) bool { return p.Bits() == 0 }))
	if s.Primary {
		if !primary.IsValid() || !f.Has(primary) || primary.IsLoopback() {
			all = nodeSeen
		}
	}
	for _, a := range local {
		switch {
		case !f.Has(a):
		case all:
			if !a.IsLoopback() {
				addrs = append(addrs, a)
			}
		case s.Primary:
			if a == primary {
				addrs = append(addrs, a)
			}
		case a.IsLoopback() && f == model.IPv6:
		default:
			if slices.ContainsFunc(prefixes, func(p netip.Prefix) bool { return p.Contains(a) }) {
				addrs = append(addrs, a)
			}
		}
	}
	return addrs, all
}

// Choose is ChooseFor for IPv4, the Node seen.
func (s Selector) Choose(local []netip.Addr, primary netip.Addr) []netip.Addr {
	addrs, _ := s.ChooseFor(model.IPv4, local, primary, true)
	return addrs
}

// Config is how a Source is set up.
type Config struct {
	NodeName  string
	NodePorts Selector
	// LocalAddresses lists the node's addresses, of both families; nil
	// reads this network namespace's interfaces (InterfaceAddresses).
	// InfoFor keeps those of the family asked for.
	LocalAddresses func() ([]netip.Addr, error)
	// ServiceCIDRs are used when the ServiceCIDR objects cannot be read
	// (no RBAC, an API server before 1.33); nil refuses nothing then.
	// They may hold ranges of both families (--service-cluster-ip-range
	// takes one per family); InfoFor keeps those of its family.
	ServiceCIDRs []netip.Prefix
	// PodCIDRs, when not empty, are the Node's pod ranges by family that
	// the datapaths tell local traffic by (--detect-local-mode=NodeCIDR,
	// WaitForPodCIDRs): Run ends with ErrPodCIDRChanged when the Node's
	// ranges are no longer these (one changed, or a family gained or lost
	// one), for the process to restart with the new ones, as kube-proxy
	// exits when spec.podCIDRs changes.
	PodCIDRs map[model.IPFamily]netip.Prefix
	// BindAddress is --bind-address when it names a specific address
	// (invalid otherwise): as in kube-proxy's detectNodeIPs, it stands
	// in for the Node's primary address of its family, for "primary".
	BindAddress netip.Addr
}

// ErrPodCIDRChanged ends Run when the Node's pod ranges are no longer
// Config.PodCIDRs.
var ErrPodCIDRChanged = errors.New("the Node's spec.podCIDRs changed, and local traffic is told by the old range (--detect-local-mode=NodeCIDR): exiting for the restart to read the new one")

// PodCIDRs returns the Node's pod ranges by family (spec.podCIDRs, else
// spec.podCIDR): the first of each family, as kube-proxy's NodeCIDR
// detector takes them; empty if it has none.
func PodCIDRs(node *v1.Node) map[model.IPFamily]netip.Prefix {
	cidrs := node.Spec.PodCIDRs
	if len(cidrs) == 0 && node.Spec.PodCIDR != "" {
		cidrs = []string{node.Spec.PodCIDR}
	}
	out := make(map[model.IPFamily]netip.Prefix, 2)
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			continue
		}
		if f := model.FamilyOf(p.Addr()); !out[f].IsValid() {
			out[f] = p.Masked()
		}
	}
	return out
}

// WaitForPodCIDRs returns the pod ranges of Node name by family, waiting up
// to timeout, polling each poll, for the Node to exist and have at least
// one, as kube-proxy waits for spec.podCIDRs in its NodeCIDR mode (5
// minutes). A family without a range has no entry: kube-proxy then detects
// no local traffic in that family.
func WaitForPodCIDRs(ctx context.Context, client kubernetes.Interface, name string, poll, timeout time.Duration) (map[model.IPFamily]netip.Prefix, error) {
	return waitForPodCIDRs(ctx, client, name, poll, timeout, func(m map[model.IPFamily]netip.Prefix) bool { return len(m) > 0 }, "a pod range")
}

func waitForPodCIDRs(ctx context.Context, client kubernetes.Interface, name string, poll, timeout time.Duration,
	done func(map[model.IPFamily]netip.Prefix) bool, what string) (map[model.IPFamily]netip.Prefix, error) {
	var cidrs map[model.IPFamily]netip.Prefix
	var lastErr error
	seen := false
	err := wait.PollUntilContextTimeout(ctx, poll, timeout, true, func(ctx context.Context) (bool, error) {
		node, err := client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			lastErr = err
			return false, nil
		}
		seen = true
		cidrs = PodCIDRs(node)
		return done(cidrs), nil
	})
	switch {
	case err == nil:
		return cidrs, nil
	case ctx.Err() != nil:
		return nil, ctx.Err()
	case !seen:
		return nil, fmt.Errorf("timed out after %v waiting for Node %q, whose spec.podCIDRs --detect-local-mode=NodeCIDR needs: %v", timeout, name, lastErr)
	}
	return nil, fmt.Errorf("timed out after %v waiting for %s in Node %q's spec.podCIDRs, which --detect-local-mode=NodeCIDR needs (is kube-controller-manager allocating node CIDRs, --allocate-node-cidrs?)", timeout, what, name)
}

// Source is the node's current information. It is safe for concurrent use.
type Source struct {
	cfg Config

	// podCIDRChanged receives ErrPodCIDRChanged, once.
	podCIDRChanged chan error

	mu sync.Mutex
	// eligible: the Node was seen and is neither being deleted nor
	// tainted for deletion (kube-proxy's NodeEligible).
	eligible bool
	zone     string
	// nodeSeen: setNode has run, so primary is known (even if empty).
	nodeSeen bool
	// primary holds the Node's primary address of each family, if any.
	primary map[model.IPFamily]netip.Addr
	// serviceCIDRs holds the ranges of both families, sorted.
	serviceCIDRs []netip.Prefix
	cidrsFromAPI bool
}

// New returns a Source; Run feeds it from the API server.
func New(cfg Config) *Source {
	if cfg.LocalAddresses == nil {
		cfg.LocalAddresses = InterfaceAddresses
	}
	return &Source{cfg: cfg, serviceCIDRs: sortedPrefixes(slices.Clone(cfg.ServiceCIDRs)), podCIDRChanged: make(chan error, 1)}
}

// InterfaceAddresses lists the addresses of this network namespace's
// interfaces, of both families, sorted (IPv4 first) and unique: loopback
// ones (127.0.0.1, ::1) and IPv6 link-local ones (fe80::/10, without
// their zone; one address may be on several links) included.
func InterfaceAddresses() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("listing the node's addresses: %w", err)
	}
	return addressesOf(addrs), nil
}

// addressesOf is InterfaceAddresses' reading of net.InterfaceAddrs.
func addressesOf(addrs []net.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		var raw net.IP
		switch a := a.(type) {
		case *net.IPNet:
			raw = a.IP
		case *net.IPAddr:
			raw = a.IP
		default:
			continue
		}
		ip, ok := netip.AddrFromSlice(raw)
		if !ok {
			continue
		}
		// net.IP holds an IPv4 address in 16 bytes at times.
		out = append(out, ip.Unmap())
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// ofFamily returns the addresses of family f, in order.
func ofFamily[T any](f model.IPFamily, all []T, addr func(T) netip.Addr) []T {
	var out []T
	for _, a := range all {
		if f.Has(addr(a)) {
			out = append(out, a)
		}
	}
	return out
}

// Zone is the node's topology.kubernetes.io/zone label, "" if none or not
// known yet.
func (s *Source) Zone() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.zone
}

// ToBeDeletedTaint is the taint the cluster autoscaler puts on a node it
// is about to delete.
const ToBeDeletedTaint = "ToBeDeletedByClusterAutoscaler"

// NodeEligible reports whether the node is to take traffic from load
// balancers, as kube-proxy v1.36's /healthz decides it: its Node object
// has been seen, and is neither being deleted (deletionTimestamp, or gone)
// nor tainted ToBeDeletedByClusterAutoscaler.
func (s *Source) NodeEligible() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.eligible
}

// eligibleNode is NodeEligible's rule, with the reason a node is not.
func eligibleNode(node *v1.Node) (bool, string) {
	if node == nil {
		return false, "no Node object"
	}
	if node.DeletionTimestamp != nil {
		return false, "being deleted"
	}
	for _, t := range node.Spec.Taints {
		if t.Key == ToBeDeletedTaint {
			return false, "tainted " + ToBeDeletedTaint
		}
	}
	return true, ""
}

// setEligible records the node's eligibility, logging a change.
func (s *Source) setEligible(node *v1.Node) {
	ok, reason := eligibleNode(node)
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok == s.eligible {
		return
	}
	s.eligible = ok
	if ok {
		klog.InfoS("Node eligible for load balancer traffic: /healthz follows the datapath again", "node", s.cfg.NodeName)
	} else {
		klog.InfoS("Node not eligible for load balancer traffic: /healthz answers 503 so that load balancers drain it", "node", s.cfg.NodeName, "reason", reason)
	}
}

// Info is InfoFor(model.IPv4), for the single-stack callers.
func (s *Source) Info() model.NodeInfo { return s.InfoFor(model.IPv4) }

// InfoFor reads the node's addresses now and returns what the proxier of
// family f needs: the node's addresses of f, those of them serving node
// ports (ChooseFor), and the Service ranges of f. An error reading the
// addresses is logged and leaves them empty: node ports are then served
// nowhere until the next sync reads them. ForeignClusterIPs is left for
// the caller to fill.
func (s *Source) InfoFor(f model.IPFamily) model.NodeInfo {
	all, err := s.cfg.LocalAddresses()
	if err != nil {
		klog.ErrorS(err, "Could not read the node's addresses; node ports are not served on any until they can be read", "ipFamily", f)
	}
	local := ofFamily(f, all, func(a netip.Addr) netip.Addr { return a })
	s.mu.Lock()
	primary, seen := s.primary[f], s.nodeSeen
	cidrs := ofFamily(f, s.serviceCIDRs, netip.Prefix.Addr)
	s.mu.Unlock()
	nodePorts, allLocal := s.cfg.NodePorts.ChooseFor(f, local, primary, seen)
	return model.NodeInfo{
		NodePortAddresses: nodePorts,
		AllLocalAddresses: allLocal,
		LocalAddresses:    local,
		ServiceCIDRs:      cidrs,
	}
}

// PrimaryAddress is the Node's primary address of family f (its first
// InternalIP of f, else its first ExternalIP of f, as kube-proxy's node
// IPs), invalid if it has none or the Node is not known yet.
func (s *Source) PrimaryAddress(f model.IPFamily) netip.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.primary[f]
}

// Run watches this node's Node object (zone label, primary addresses,
// eligibility for load balancer traffic) and the ServiceCIDR objects until
// ctx ends, calling changed after each change of what InfoFor (of either
// family), PrimaryAddress or Zone returns. ServiceCIDRs that cannot be
// listed (RBAC, an older API server) are reported once and the configured
// ranges kept.
// It returns nil when ctx ends, or ErrPodCIDRChanged (see Config.PodCIDRs).
func (s *Source) Run(ctx context.Context, client kubernetes.Interface, changed func()) error {
	// The informers stop with ctx, which ends early on a pod range change.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	nodes := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", s.cfg.NodeName).String()
		}))
	nodeInformer := nodes.Core().V1().Nodes().Informer()
	onNode := func(obj any) {
		node, ok := obj.(*v1.Node)
		if !ok {
			return
		}
		s.setEligible(node)
		if s.podCIDRsChanged(node) {
			select {
			case s.podCIDRChanged <- ErrPodCIDRChanged:
			default:
			}
		}
		if s.setNode(node) {
			changed()
		}
	}
	if _, err := nodeInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    onNode,
		UpdateFunc: func(_, obj any) { onNode(obj) },
		// A Node without finalizers goes at once, with no update showing
		// its deletionTimestamp: the node is on its way out all the same.
		DeleteFunc: func(any) { s.setEligible(nil) },
	}); err != nil {
		klog.ErrorS(err, "Not watching the Node: topology hints and --nodeport-addresses=primary are not followed")
		return nil
	}
	nodes.Start(ctx.Done())

	if s.canListServiceCIDRs(ctx, client) {
		cidrs := informers.NewSharedInformerFactory(client, 0)
		inf := cidrs.Networking().V1().ServiceCIDRs().Informer()
		store := inf.GetStore()
		onCIDR := func(any) {
			if s.setServiceCIDRs(store.List()) {
				changed()
			}
		}
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    onCIDR,
			UpdateFunc: func(_, obj any) { onCIDR(obj) },
			DeleteFunc: onCIDR,
		}); err == nil {
			cidrs.Start(ctx.Done())
		}
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-s.podCIDRChanged:
	}
	cancel()
	nodes.Shutdown()
	return err
}

// podCIDRsChanged reports whether the Node's pod ranges are no longer
// those in use (Config.PodCIDRs, when set), logging it.
func (s *Source) podCIDRsChanged(node *v1.Node) bool {
	got := PodCIDRs(node)
	if want := s.cfg.PodCIDRs; len(want) > 0 {
		if maps.Equal(got, want) {
			return false
		}
		klog.InfoS("The Node's pod ranges changed", "node", s.cfg.NodeName, "podCIDRs", node.Spec.PodCIDRs, "inUse", want)
		return true
	}
	return false
}

func (s *Source) canListServiceCIDRs(ctx context.Context, client kubernetes.Interface) bool {
	for {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := client.NetworkingV1().ServiceCIDRs().List(ctx, metav1.ListOptions{Limit: 1})
		cancel()
		switch {
		case err == nil:
			return true
		case apierrors.IsForbidden(err) || apierrors.IsNotFound(err):
			klog.InfoS("Cannot read ServiceCIDR objects; traffic to unallocated Service addresses is refused only within the configured ranges",
				"ranges", s.cfg.ServiceCIDRs, "err", err)
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(5 * time.Second):
		}
	}
}

// PrimaryAddresses returns the Node's primary address of each family: its
// first InternalIP of the family, else its first ExternalIP of it, as
// kube-proxy's GetNodeHostIPs orders them. A family without one has no
// entry.
func PrimaryAddresses(node *v1.Node) map[model.IPFamily]netip.Addr {
	out := make(map[model.IPFamily]netip.Addr, 2)
	for _, kind := range []v1.NodeAddressType{v1.NodeInternalIP, v1.NodeExternalIP} {
		for _, a := range node.Status.Addresses {
			if a.Type != kind {
				continue
			}
			ip, err := netip.ParseAddr(a.Address)
			if err != nil || ip.Zone() != "" {
				continue
			}
			// net.IP reads an IPv4-mapped address as IPv4.
			ip = ip.Unmap()
			if f := model.FamilyOf(ip); !out[f].IsValid() {
				out[f] = ip
			}
		}
	}
	return out
}

// setNode records the node's zone and primary addresses; it reports
// whether any changed.
func (s *Source) setNode(node *v1.Node) bool {
	zone := node.Labels[v1.LabelTopologyZone]
	primary := PrimaryAddresses(node)
	if b := s.cfg.BindAddress; b.IsValid() && !b.IsUnspecified() {
		primary[model.FamilyOf(b.Unmap())] = b.Unmap()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nodeSeen && zone == s.zone && maps.Equal(primary, s.primary) {
		return false
	}
	if zone != s.zone {
		klog.InfoS("Node zone", "node", s.cfg.NodeName, "zone", zone)
	}
	s.zone, s.primary, s.nodeSeen = zone, primary, true
	return true
}

// setServiceCIDRs records the ranges of the ServiceCIDR objects, of both
// families (a dual-stack ServiceCIDR holds one of each); it reports whether
// they changed.
func (s *Source) setServiceCIDRs(objs []any) bool {
	var out []netip.Prefix
	for _, o := range objs {
		sc, ok := o.(*networkingv1.ServiceCIDR)
		if !ok {
			continue
		}
		// A range being deleted still holds the addresses of its
		// Services until they go: it stays.
		for _, c := range sc.Spec.CIDRs {
			if p, err := netip.ParsePrefix(c); err == nil {
				out = append(out, p.Masked())
			}
		}
	}
	out = sortedPrefixes(out)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cidrsFromAPI && slices.Equal(out, s.serviceCIDRs) {
		return false
	}
	s.cidrsFromAPI = true
	s.serviceCIDRs = out
	return true
}

// sortedPrefixes sorts prefixes by address (IPv4 first), then length, and
// drops duplicates.
func sortedPrefixes(out []netip.Prefix) []netip.Prefix {
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}
