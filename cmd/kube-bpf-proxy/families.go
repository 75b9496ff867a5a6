package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Which IP families the proxy serves is kube-proxy's decision
// (cmd/kube-proxy/app server.go and server_linux.go, v1.36): it runs
// dual-stack whenever the node can serve both families, whether or not the
// cluster is dual-stack, and otherwise serves the node's primary family,
// failing if the node cannot serve that one.

// familySupport is what the node can serve: kube-proxy's
// platformCheckSupported.
type familySupport struct {
	ipv4, ipv6 bool
	// why says what made a family unusable, for the log.
	why map[model.IPFamily]string
}

// nodeProbes are what familySupport reads from the node, replaceable in
// tests.
type nodeProbes struct {
	// readFile reads /proc files.
	readFile func(string) ([]byte, error)
	// ip6tables runs ip6tables (with the backend's binary) with args.
	ip6tables func(ctx context.Context, backend string, args ...string) error
}

func realProbes() nodeProbes {
	return nodeProbes{
		readFile: os.ReadFile,
		ip6tables: func(ctx context.Context, backend string, args ...string) error {
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, "ip6tables-"+backend, args...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("ip6tables-%s %s: %w: %s", backend, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
			}
			return nil
		},
	}
}

// supportedFamilies checks, as kube-proxy's platformCheckSupported, which
// families the node can serve in mode. IPv4 always: a node without
// iptables fails later, in the datapath's start, with its own error.
// IPv6 needs the kernel's IPv6 (/proc/net/if_inet6, not disabled by
// net.ipv6.conf.all.disable_ipv6) and ip6tables working in the node's
// network namespace: the iptables mode's rules, and the ebpf mode's packet
// layer, are ip6tables rules there.
func supportedFamilies(ctx context.Context, mode, backend string, probe nodeProbes) familySupport {
	s := familySupport{ipv4: true, ipv6: true, why: map[model.IPFamily]string{}}
	no6 := func(why string) {
		if s.ipv6 {
			s.ipv6 = false
			s.why[model.IPv6] = why
		}
	}
	if _, err := probe.readFile("/proc/net/if_inet6"); err != nil {
		no6("no kernel support for IPv6 (/proc/net/if_inet6)")
	} else if b, err := probe.readFile("/proc/sys/net/ipv6/conf/all/disable_ipv6"); err == nil && strings.TrimSpace(string(b)) == "1" {
		no6("IPv6 disabled in the kernel (net.ipv6.conf.all.disable_ipv6=1)")
	}
	if !s.ipv6 {
		return s
	}
	// kube-proxy's check (utiliptables Present): the nat table's
	// POSTROUTING chain can be listed.
	args := []string{"-w", "5", "-t", "nat", "-S", "POSTROUTING"}
	backends := []string{backend}
	if backend == iptables.BackendAuto {
		backends = []string{iptables.BackendNFT, iptables.BackendLegacy}
	}
	var errs []error
	for _, b := range backends {
		err := probe.ip6tables(ctx, b, args...)
		if err == nil {
			return s
		}
		errs = append(errs, err)
	}
	what := "iptables rules"
	if mode == "ebpf" {
		what = "packet layer"
	}
	no6(fmt.Sprintf("ip6tables does not work, which the %s needs: %v", what, errors.Join(errs...)))
	return s
}

// chooseFamilies is kube-proxy's decision: both families when the node
// supports both, primary first; otherwise primary alone, which the node
// must support.
func chooseFamilies(primary model.IPFamily, s familySupport) ([]model.IPFamily, error) {
	ok := map[model.IPFamily]bool{model.IPv4: s.ipv4, model.IPv6: s.ipv6}
	if !ok[primary] {
		why := s.why[primary]
		if why == "" {
			why = "not supported"
		}
		return nil, fmt.Errorf("no support for the node's primary IP family %v: %s", primary, why)
	}
	if ok[primary.Other()] {
		return []model.IPFamily{primary, primary.Other()}, nil
	}
	return []model.IPFamily{primary}, nil
}

// detectPrimaryFamily is kube-proxy's detectNodeIPs, for the family: a
// specific --bind-address decides, then the Node's first address
// (InternalIP, else ExternalIP); IPv4 when none is known (kube-proxy then
// assumes 127.0.0.1).
func detectPrimaryFamily(bindAddress string, nodeIPs []netip.Addr) model.IPFamily {
	if ip, err := netip.ParseAddr(bindAddress); err == nil && !ip.IsUnspecified() {
		return model.FamilyOf(ip.Unmap())
	}
	if len(nodeIPs) > 0 {
		return model.FamilyOf(nodeIPs[0].Unmap())
	}
	return model.IPv4
}

// nodeAddresses returns the Node's InternalIPs, else its ExternalIPs, as
// kube-proxy's NodeManager reads them; nil if the Node cannot be read.
func nodeAddresses(ctx context.Context, client kubernetes.Interface, name string) []netip.Addr {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	node, err := client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		klog.InfoS("Cannot read the Node for its primary IP family; assuming IPv4, as kube-proxy does", "node", name, "err", err)
		return nil
	}
	for _, t := range []v1.NodeAddressType{v1.NodeInternalIP, v1.NodeExternalIP} {
		var ips []netip.Addr
		for _, a := range node.Status.Addresses {
			if ip, err := netip.ParseAddr(a.Address); err == nil && a.Type == t {
				ips = append(ips, ip)
			}
		}
		if len(ips) > 0 {
			return ips
		}
	}
	return nil
}

// servedFamilies decides the families this node serves, and logs it as
// kube-proxy does. The Node is read only when the node cannot serve both
// families and --bind-address does not name the primary one: then the
// primary family decides. On a node that serves both, without a specific
// --bind-address, IPv4 is listed first (kube-proxy reads the Node there
// too; only its log and order follow).
func servedFamilies(ctx context.Context, o options, client kubernetes.Interface, nodeName string, probe nodeProbes) ([]model.IPFamily, error) {
	support := supportedFamilies(ctx, o.mode, o.iptablesBackend, probe)
	for f, why := range support.why {
		klog.InfoS("No support for IP family", "ipFamily", f, "reason", why)
	}
	var nodeIPs []netip.Addr
	if ip, err := netip.ParseAddr(o.bindAddress); (err != nil || ip.IsUnspecified()) && !support.ipv6 {
		// Only then does the primary family choose what is served:
		// IPv4 is always supported.
		nodeIPs = nodeAddresses(ctx, client, nodeName)
	}
	primary := detectPrimaryFamily(o.bindAddress, nodeIPs)
	families, err := chooseFamilies(primary, support)
	if err != nil {
		return nil, err
	}
	// kube-proxy's lines, in its order.
	if len(families) > 1 {
		klog.InfoS("kube-bpf-proxy running in dual-stack mode", "primary ipFamily", families[0])
	} else {
		klog.InfoS("kube-bpf-proxy running in single-stack mode", "ipFamily", families[0])
	}
	if o.mode == "iptables" {
		klog.InfoS("Using iptables Proxier")
	}
	if len(families) > 1 {
		klog.InfoS("Creating dualStackProxier", "ipFamilies", familyNames(families))
	}
	return families, nil
}

// familyNames spells families as the API does, for the log.
func familyNames(families []model.IPFamily) []string {
	out := make([]string, len(families))
	for i, f := range families {
		out[i] = f.String()
	}
	return out
}

// afterAll returns, for each of n callers, a function that does nothing
// (and succeeds) until every caller has called its own at least once, and
// from then on runs fn: what must wait until every family's datapath
// serves (the other mode's removal, the socket layer's confinement) runs
// once the last one does, and is retried by that one's caller.
func afterAll(n int, fn func(context.Context) error) []func(context.Context) error {
	var mu sync.Mutex
	called := make([]bool, n)
	out := make([]func(context.Context) error, n)
	for i := range out {
		out[i] = func(ctx context.Context) error {
			mu.Lock()
			called[i] = true
			all := true
			for _, c := range called {
				all = all && c
			}
			mu.Unlock()
			if !all {
				return nil
			}
			return fn(ctx)
		}
	}
	return out
}
