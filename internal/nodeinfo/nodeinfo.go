// Package nodeinfo keeps what the datapaths need to know of the node the
// proxy runs on: which of its addresses serve node ports
// (--nodeport-addresses, with kube-proxy's semantics), every address it has
// (an external IP is local when it is one), its zone label (for topology
// hints) and the cluster's Service IP ranges (ServiceCIDR objects).
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
// address (its first IPv4 InternalIP, as kube-proxy's "primary").
const Primary = "primary"

// Selector is a parsed --nodeport-addresses: the node ports are served on
// the node's addresses inside Prefixes, or on its primary address; with
// neither, on every local address.
type Selector struct {
	Prefixes []netip.Prefix
	Primary  bool
}

// ParseSelector parses --nodeport-addresses: empty, "primary", or IPv4
// and IPv6 CIDRs (the IPv6 ones are accepted and, as only IPv4 Services
// are served, unused).
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
			return Selector{}, fmt.Errorf("--nodeport-addresses %q: want %q or CIDRs such as 10.0.0.0/8,127.0.0.0/8", v, Primary)
		}
		s.Prefixes = append(s.Prefixes, p.Masked())
	}
	if s.Primary && len(s.Prefixes) > 0 {
		return Selector{}, fmt.Errorf("--nodeport-addresses: %q cannot be combined with CIDRs", Primary)
	}
	return s, nil
}

// All reports whether the selector leaves every local address serving.
func (s Selector) All() bool { return !s.Primary && len(s.Prefixes) == 0 }

// Choose returns the addresses of local that serve node ports, given the
// node's primary address (invalid if unknown). With no selector, loopback
// addresses are left out: a node port on 127.0.0.1 opens the Service to
// every process on the node through an address that bypasses host
// firewalls, so it is served only when a CIDR names it deliberately.
func (s Selector) Choose(local []netip.Addr, primary netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range local {
		switch {
		case s.Primary:
			if a == primary {
				out = append(out, a)
			}
		case len(s.Prefixes) == 0:
			if !a.IsLoopback() {
				out = append(out, a)
			}
		default:
			if slices.ContainsFunc(s.Prefixes, func(p netip.Prefix) bool { return p.Contains(a) }) {
				out = append(out, a)
			}
		}
	}
	return out
}

// Config is how a Source is set up.
type Config struct {
	NodeName  string
	NodePorts Selector
	// LocalAddresses lists the node's addresses; nil reads this network
	// namespace's interfaces.
	LocalAddresses func() ([]netip.Addr, error)
	// ServiceCIDRs are used when the ServiceCIDR objects cannot be read
	// (no RBAC, an API server before 1.33); nil refuses nothing then.
	ServiceCIDRs []netip.Prefix
	// PodCIDR, when valid, is the Node's pod range the datapath tells
	// local traffic by (--detect-local-mode=NodeCIDR, WaitForPodCIDR):
	// Run ends with ErrPodCIDRChanged when the Node's changes, for the
	// process to restart with the new one, as kube-proxy exits then.
	PodCIDR netip.Prefix
}

// ErrPodCIDRChanged ends Run when the Node's pod range is no longer
// Config.PodCIDR.
var ErrPodCIDRChanged = errors.New("the Node's spec.podCIDRs changed, and local traffic is told by the old range (--detect-local-mode=NodeCIDR): exiting for the restart to read the new one")

// PodCIDR returns the Node's first IPv4 pod range (spec.podCIDRs, else
// spec.podCIDR), invalid if it has none.
func PodCIDR(node *v1.Node) netip.Prefix {
	cidrs := node.Spec.PodCIDRs
	if len(cidrs) == 0 && node.Spec.PodCIDR != "" {
		cidrs = []string{node.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		if p, err := netip.ParsePrefix(c); err == nil && p.Addr().Is4() {
			return p.Masked()
		}
	}
	return netip.Prefix{}
}

// WaitForPodCIDR returns the pod range of Node name, waiting up to
// timeout, polling each poll, for the Node to exist and have one, as
// kube-proxy waits for it in its NodeCIDR mode (5 minutes).
func WaitForPodCIDR(ctx context.Context, client kubernetes.Interface, name string, poll, timeout time.Duration) (netip.Prefix, error) {
	var cidr netip.Prefix
	var lastErr error
	seen := false
	err := wait.PollUntilContextTimeout(ctx, poll, timeout, true, func(ctx context.Context) (bool, error) {
		node, err := client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			lastErr = err
			return false, nil
		}
		seen = true
		cidr = PodCIDR(node)
		return cidr.IsValid(), nil
	})
	switch {
	case err == nil:
		return cidr, nil
	case ctx.Err() != nil:
		return netip.Prefix{}, ctx.Err()
	case !seen:
		return netip.Prefix{}, fmt.Errorf("timed out after %v waiting for Node %q, whose spec.podCIDRs --detect-local-mode=NodeCIDR needs: %v", timeout, name, lastErr)
	}
	return netip.Prefix{}, fmt.Errorf("timed out after %v waiting for an IPv4 pod range in Node %q's spec.podCIDRs, which --detect-local-mode=NodeCIDR needs (is kube-controller-manager allocating node CIDRs, --allocate-node-cidrs?)", timeout, name)
}

// Source is the node's current information. It is safe for concurrent use.
type Source struct {
	cfg Config

	// podCIDRChanged receives ErrPodCIDRChanged, once.
	podCIDRChanged chan error

	mu sync.Mutex
	// eligible: the Node was seen and is neither being deleted nor
	// tainted for deletion (kube-proxy's NodeEligible).
	eligible     bool
	zone         string
	primary      netip.Addr
	serviceCIDRs []netip.Prefix
	cidrsFromAPI bool
}

// New returns a Source; Run feeds it from the API server.
func New(cfg Config) *Source {
	if cfg.LocalAddresses == nil {
		cfg.LocalAddresses = InterfaceAddresses
	}
	return &Source{cfg: cfg, serviceCIDRs: cfg.ServiceCIDRs, podCIDRChanged: make(chan error, 1)}
}

// InterfaceAddresses lists the IPv4 addresses of this network namespace's
// interfaces, sorted and unique.
func InterfaceAddresses() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("listing the node's addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		if ip = ip.Unmap(); ip.Is4() {
			out = append(out, ip)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
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

// Info reads the node's addresses now and returns what the datapaths need.
// An error reading the addresses is logged and leaves them empty: node
// ports are then served nowhere until the next sync reads them.
func (s *Source) Info() model.NodeInfo {
	local, err := s.cfg.LocalAddresses()
	if err != nil {
		klog.ErrorS(err, "Could not read the node's addresses; node ports are not served on any until they can be read")
	}
	s.mu.Lock()
	primary, cidrs := s.primary, s.serviceCIDRs
	s.mu.Unlock()
	return model.NodeInfo{
		NodePortAddresses: s.cfg.NodePorts.Choose(local, primary),
		AllLocalAddresses: s.cfg.NodePorts.All(),
		LocalAddresses:    local,
		ServiceCIDRs:      slices.Clone(cidrs),
	}
}

// InfoFor is Info for one address family's proxier.
func (s *Source) InfoFor(f model.IPFamily) model.NodeInfo {
	if f != model.IPv4 {
		return model.NodeInfo{}
	}
	return s.Info()
}

// Run watches this node's Node object (zone label, primary address,
// eligibility for load balancer traffic) and the
// ServiceCIDR objects until ctx ends, calling changed after each change of
// what Info or Zone returns. ServiceCIDRs that cannot be listed (RBAC, an
// older API server) are reported once and the configured ranges kept.
// It returns nil when ctx ends, or ErrPodCIDRChanged (see Config.PodCIDR).
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
		if want := s.cfg.PodCIDR; want.IsValid() {
			if got := PodCIDR(node); got != want {
				klog.InfoS("The Node's pod range changed", "node", s.cfg.NodeName, "podCIDR", got, "inUse", want)
				select {
				case s.podCIDRChanged <- ErrPodCIDRChanged:
				default:
				}
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

// setNode records the node's zone and primary address; it reports whether
// either changed.
func (s *Source) setNode(node *v1.Node) bool {
	zone := node.Labels[v1.LabelTopologyZone]
	var primary netip.Addr
	for _, kind := range []v1.NodeAddressType{v1.NodeInternalIP, v1.NodeExternalIP} {
		for _, a := range node.Status.Addresses {
			if a.Type != kind || primary.IsValid() {
				continue
			}
			if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Is4() {
				primary = ip
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if zone == s.zone && primary == s.primary {
		return false
	}
	if zone != s.zone {
		klog.InfoS("Node zone", "node", s.cfg.NodeName, "zone", zone)
	}
	s.zone, s.primary = zone, primary
	return true
}

// setServiceCIDRs records the IPv4 ranges of the ServiceCIDR objects; it
// reports whether they changed.
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
			if p, err := netip.ParsePrefix(c); err == nil && p.Addr().Is4() {
				out = append(out, p.Masked())
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	out = slices.Compact(out)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cidrsFromAPI && slices.Equal(out, s.serviceCIDRs) {
		return false
	}
	s.cidrsFromAPI = true
	s.serviceCIDRs = out
	return true
}
