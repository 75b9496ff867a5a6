package iptables

import (
	"bytes"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
)

// all selects every service for rewriting, as a full sync does.
func all(*model.ServicePort) bool { return true }

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// goldenCase is a set of API objects, taken through the model as the
// proxy does on testNode, and the options the rules are rendered with.
type goldenCase struct {
	name     string
	services []*v1.Service
	slices   []*discoveryv1.EndpointSlice
	opts     ruleOptions
	// node is the node's description; the zero value means defaultNode.
	node *model.NodeInfo
	// firstSync renders what a first sync on a clean node writes: the
	// jumps from the built-in chains and the canary chains too.
	firstSync bool
	// ipv6 renders the ip6tables rules of the same Services, their
	// addresses and the node's mapped into IPv6 (snapshotTo6); opts
	// should be IPv6 options (ipv6 set, no localhost node ports). Their
	// golden files are named ipv6-*.
	ipv6 bool
}

// defaultOpts are kube-proxy's defaults with --cluster-cidr set, on a
// kernel with nfacct: localhost node ports, the nfacct counters.
var defaultOpts = ruleOptions{masqMark: "0x00004000", local: LocalByCIDR(netip.MustParsePrefix("10.244.0.0/16")),
	localhostNodePorts: true, nfacctInvalid: true, nfacctLocalhost: true}

// defaultNode is a node with one address, without --nodeport-addresses.
var defaultNode = model.NodeInfo{
	AllLocalAddresses: true,
	NodePortAddresses: []netip.Addr{netip.MustParseAddr("172.29.0.2")},
	LocalAddresses:    []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("172.29.0.2")},
}

var tcp, udp = v1.ProtocolTCP, v1.ProtocolUDP

func goldenCases() []goldenCase {
	manyEndpoints := apitest.ReadyRange("10.244", 12)
	kinds, kindSlices := kindsOfServices()
	listed := model.NodeInfo{
		NodePortAddresses: []netip.Addr{netip.MustParseAddr("172.29.0.2")},
		LocalAddresses:    defaultNode.LocalAddresses,
	}
	withLoopback := listed
	withLoopback.NodePortAddresses = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("172.29.0.2")}
	externalOnly := defaultOpts
	externalOnly.externalOnly, externalOnly.noClusterIPs, externalOnly.localhostNodePorts, externalOnly.nfacctInvalid, externalOnly.nfacctLocalhost = true, true, false, false, false
	withClusterIPs := externalOnly
	withClusterIPs.noClusterIPs = false
	plain := ruleOptions{masqMark: "0x00004000", conntrackLiberal: true}
	byBridge, byPrefix := defaultOpts, defaultOpts
	byBridge.local, byPrefix.local = LocalByBridge("cbr0"), LocalByInterfacePrefix("veth")
	// kube-proxy's IPv6 proxier: the same defaults, the pods' IPv6 range,
	// never localhost node ports.
	opts6 := defaultOpts
	opts6.ipv6, opts6.localhostNodePorts = true, false
	opts6.local = LocalByCIDR(prefixTo6(netip.MustParsePrefix("10.244.0.0/16")))
	externalOnly6 := withClusterIPs
	externalOnly6.ipv6, externalOnly6.local = true, opts6.local
	return []goldenCase{
		{
			name: "multi-port",
			services: []*v1.Service{apitest.Service("default", "web", "10.96.0.10",
				apitest.Port("http", tcp, 80, 8080), apitest.Port("https", tcp, 443, 8443), apitest.Port("dns", udp, 53, 5353))},
			slices: []*discoveryv1.EndpointSlice{apitest.Slice("default", "web", "web-1",
				[]discoveryv1.EndpointPort{apitest.SlicePort("http", tcp, 8080), apitest.SlicePort("https", tcp, 8443), apitest.SlicePort("dns", udp, 5353)},
				apitest.Ready("10.244.1.1"), apitest.Ready("10.244.2.1"))},
			opts:      defaultOpts,
			firstSync: true,
		},
		{
			name:     "no-endpoints",
			services: []*v1.Service{apitest.Service("default", "empty", "10.96.0.20", apitest.Port("http", tcp, 80, 8080), apitest.Port("dns", udp, 53, 53))},
			opts:     defaultOpts,
		},
		{
			// Only terminating endpoints: the model falls back to the
			// ones still serving, as kube-proxy does.
			name:     "terminating-only",
			services: []*v1.Service{apitest.Service("default", "draining", "10.96.0.30", apitest.Port("", tcp, 80, 8080))},
			slices: []*discoveryv1.EndpointSlice{apitest.Slice("default", "draining", "draining-1",
				[]discoveryv1.EndpointPort{apitest.SlicePort("", tcp, 8080)},
				apitest.Terminating("10.244.3.1"), apitest.Terminating("10.244.3.2"))},
			opts: defaultOpts,
		},
		{
			// Endpoints in kube-proxy's order: by text, 10.244.0.10
			// before 10.244.0.2.
			name:     "many-endpoints",
			services: []*v1.Service{apitest.Service("default", "big", "10.96.0.40", apitest.Port("", tcp, 80, 80))},
			slices: []*discoveryv1.EndpointSlice{apitest.Slice("default", "big", "big-1",
				[]discoveryv1.EndpointPort{apitest.SlicePort("", tcp, 80)}, manyEndpoints...)},
			opts: defaultOpts,
		},
		{
			// A pod reaching itself through its Service is masqueraded by
			// its KUBE-SEP chain; with --masquerade-all every connection is.
			name:     "hairpin-masquerade-all",
			services: []*v1.Service{apitest.Service("kube-system", "self", "10.96.0.50", apitest.Port("", tcp, 80, 8080))},
			slices: []*discoveryv1.EndpointSlice{apitest.Slice("kube-system", "self", "self-1",
				[]discoveryv1.EndpointPort{apitest.SlicePort("", tcp, 8080)}, apitest.Ready("10.244.0.100"))},
			opts: ruleOptions{masqMark: "0x00004000", masqueradeAll: true},
		},
		{
			// Every kind of Service, as kube-proxy renders them by
			// default (TestKernelFidelity compares these with it).
			name: "every-kind", services: kinds, slices: kindSlices, opts: defaultOpts, firstSync: true,
		},
		{
			// Without --cluster-cidr nothing is masqueraded by source and
			// pods are not short-circuited; conntrack liberal: no
			// INVALID drop; no nfacct; no localhost node ports.
			name: "every-kind-plain", services: kinds, slices: kindSlices, opts: plain,
		},
		{
			// --detect-local-mode=BridgeInterface and
			// InterfaceNamePrefix: pods' traffic is told by the
			// interface it comes in on, where every-kind tells it by
			// source (the ClusterIP masquerade and the pod short
			// circuit of externalTrafficPolicy Local).
			name: "detect-local-bridge", services: kinds, slices: kindSlices, opts: byBridge,
		},
		{
			name: "detect-local-interface-prefix", services: kinds, slices: kindSlices, opts: byPrefix,
		},
		{
			// --nodeport-addresses: one jump per listed address.
			name: "nodeport-addresses", services: kinds[2:3], slices: kindSlices[1:2], opts: plain, node: &listed,
		},
		{
			// --nodeport-addresses with 127.0.0.0/8: localhost node ports.
			name: "nodeport-addresses-loopback", services: kinds[2:3], slices: kindSlices[1:2], opts: defaultOpts, node: &withLoopback,
		},
		{
			// The eBPF mode's external datapath: only ports with an
			// external frontend, nothing matching a ClusterIP.
			name: "external-only", services: kinds, slices: kindSlices, opts: externalOnly, firstSync: true,
		},
		{
			// The eBPF mode's packet layer with a socket layer for the
			// node's network namespace only: the ClusterIPs as
			// every-kind has them (pods' traffic), and the external
			// frontends as external-only has them.
			name: "external-only-cluster-ips", services: kinds, slices: kindSlices, opts: withClusterIPs, firstSync: true,
		},
		{
			// Every kind of Service in IPv6, as kube-proxy's IPv6
			// proxier renders them by default: the same rules, but for
			// the jump to KUBE-NODEPORTS, which leaves out ::1/128, and
			// no KUBE-FIREWALL rule (an empty chain for kubelet's jumps).
			name: "ipv6-every-kind", services: kinds, slices: kindSlices, opts: opts6, firstSync: true, ipv6: true,
		},
		{
			// --nodeport-addresses naming ::1: no jump for it.
			name: "ipv6-nodeport-addresses-loopback", services: kinds[2:3], slices: kindSlices[1:2], opts: opts6, node: &withLoopback, ipv6: true,
		},
		{
			// The eBPF mode's IPv6 packet layer, ClusterIPs included.
			name: "ipv6-external-only-cluster-ips", services: kinds, slices: kindSlices, opts: externalOnly6, firstSync: true, ipv6: true,
		},
	}
}

func snapshotOf(t testing.TB, services []*v1.Service, slices []*discoveryv1.EndpointSlice) *model.Snapshot {
	t.Helper()
	tr := model.NewTracker(model.WithNodeName(testNode), model.WithOnSkipped(func(resource, reason string) {
		t.Fatalf("the model skipped a %s: %s", resource, reason)
	}))
	for _, s := range services {
		tr.UpsertService(s)
	}
	for _, s := range slices {
		tr.UpsertEndpointSlice(s)
	}
	return tr.Snapshot(true)
}

func renderCase(t testing.TB, c goldenCase) []byte {
	t.Helper()
	snap := snapshotOf(t, c.services, c.slices)
	node := defaultNode
	if c.node != nil {
		node = *c.node
	}
	if c.ipv6 {
		snap, node = snapshotTo6(snap), nodeTo6(node)
	}
	next := nextState(nil, snap, c.opts.noClusterIPs)
	services := flatten(next)
	in := renderInput{services: services, node: node, chains: chainsToWrite(services, c.opts.noClusterIPs, all)}
	if c.firstSync {
		in.missingJumps = jumpsFor(c.opts.externalOnly)
		in.canary = !c.opts.externalOnly
		// As Sync on a clean node: KUBE-FIREWALL is made for kubelet's
		// jumps when the localnet guard is not written.
		in.createFirewall = !c.opts.externalOnly && !c.opts.localhostNodePorts
	}
	var buf bytes.Buffer
	st := render(&buf, c.opts, in)
	// The rule counts are what was written.
	filterRules, natRules := countRules(buf.String())
	if st.filterRules != filterRules || st.natRules != natRules || st.natRulesWritten != natRules {
		t.Errorf("counted %d filter and %d (%d written) nat rules, rendered %d and %d", st.filterRules, st.natRules, st.natRulesWritten, filterRules, natRules)
	}
	// And what a partial sync that leaves every port's chains counts
	// for them, without rendering them, is the same.
	in.chains = make([]*portChains, len(services))
	var partial bytes.Buffer
	if st2 := render(&partial, c.opts, in); st2.natRules != st.natRules {
		t.Errorf("a partial sync counts %d nat rules, a full one %d", st2.natRules, st.natRules)
	}
	return buf.Bytes()
}

// countRules counts the rules of a restore input per table.
func countRules(input string) (filter, nat int) {
	table := ""
	for _, l := range strings.Split(input, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, "-A "):
			switch table {
			case "filter":
				filter++
			case "nat":
				nat++
			}
		}
	}
	return filter, nat
}

func TestRenderGolden(t *testing.T) {
	for _, c := range goldenCases() {
		t.Run(c.name, func(t *testing.T) {
			got := renderCase(t, c)
			path := filepath.Join("testdata", c.name+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("rendered rules differ from %s (go test -update rewrites it after review):\n--- got\n%s", path, got)
			}
		})
	}
}

// The cascade picks each of n endpoints with probability 1/n: endpoint i
// is reached when the i earlier matches failed and its own succeeds.
func TestProbabilityCascadeIsUniform(t *testing.T) {
	for _, n := range []int{1, 2, 3, 7, 10, 100} {
		remaining := 1.0
		for i := range n {
			p := 1.0
			if i < n-1 {
				p = parseFloat(t, probability(n-i))
			}
			if got := remaining * p; got < 1/float64(n)-1e-9 || got > 1/float64(n)+1e-9 {
				t.Errorf("n=%d: endpoint %d picked with probability %v, want %v", n, i, got, 1/float64(n))
			}
			remaining *= 1 - p
		}
	}
}

func parseFloat(t *testing.T, s string) float64 {
	t.Helper()
	var f float64
	if _, err := fmt.Sscan(s, &f); err != nil {
		t.Fatal(err)
	}
	return f
}

// Chain names are kube-proxy's: the same Service gets the same chain in
// both proxies, which lets an operator diff their rules.
func TestChainNamesMatchKubeProxy(t *testing.T) {
	name := model.ServicePortName{ServiceName: model.ServiceName{Namespace: "ns1", Name: "svc1"}, Port: "p80", Protocol: model.TCP}
	for _, c := range []struct{ got, want string }{
		// From kube-proxy's iptables proxier tests (ns1/svc1:p80, tcp;
		// endpoint 10.180.0.1:80).
		{serviceChain(name), "KUBE-SVC-XPGD46QRK7WJZT7O"},
		{endpointChain(name, model.Backend{IP: netip.MustParseAddr("10.180.0.1"), Port: 80}), "KUBE-SEP-SXIVWICOYRO3J4NJ"},
	} {
		if c.got != c.want {
			t.Errorf("chain %s, want %s", c.got, c.want)
		}
	}
}

// Above kube-proxy's large-cluster threshold the per-endpoint comments go,
// the per-service ones stay.
func TestLargeClusterDropsEndpointComments(t *testing.T) {
	svc := apitest.Service("default", "huge", "10.96.1.1", apitest.Port("", tcp, 80, 80))
	slice := apitest.Slice("default", "huge", "huge-1", []discoveryv1.EndpointPort{apitest.SlicePort("", tcp, 80)},
		apitest.ReadyRange("10.245", largeClusterEndpoints+1)...)
	out := string(renderCase(t, goldenCase{services: []*v1.Service{svc}, slices: []*discoveryv1.EndpointSlice{slice}, opts: defaultOpts}))
	if strings.Contains(out, "default/huge -> ") {
		t.Errorf("per-endpoint comments rendered above the threshold")
	}
	if !strings.Contains(out, `"default/huge cluster IP"`) {
		t.Errorf("service comment missing")
	}
	if got := strings.Count(out, "-j DNAT"); got != largeClusterEndpoints+1 {
		t.Errorf("%d DNAT rules, want %d", got, largeClusterEndpoints+1)
	}
}

// A partial sync writes only the changed services' chains, but the whole
// of KUBE-SERVICES, which lists every service.
func TestPartialRenderWritesOnlyChangedChains(t *testing.T) {
	snap := snapshotOf(t, []*v1.Service{
		apitest.Service("default", "a", "10.96.0.1", apitest.Port("", tcp, 80, 80)),
		apitest.Service("default", "b", "10.96.0.2", apitest.Port("", tcp, 80, 80)),
	}, []*discoveryv1.EndpointSlice{
		apitest.Slice("default", "a", "a-1", []discoveryv1.EndpointPort{apitest.SlicePort("", tcp, 80)}, apitest.Ready("10.244.1.1")),
		apitest.Slice("default", "b", "b-1", []discoveryv1.EndpointPort{apitest.SlicePort("", tcp, 80)}, apitest.Ready("10.244.1.2")),
	})
	services := flatten(snap.Services)
	var buf bytes.Buffer
	st := render(&buf, defaultOpts, renderInput{
		services: services,
		chains:   chainsToWrite(services, false, func(sp *model.ServicePort) bool { return sp.Name.Name == "b" }),
		stale:    []string{"KUBE-SEP-OLDOLDOLDOLDOLDO"},
	})
	out := buf.String()
	a, b := services[0], services[1]
	if strings.Contains(out, ":"+serviceChain(a.Name)) || strings.Contains(out, "-A "+serviceChain(a.Name)) {
		t.Errorf("unchanged service a's chain was written:\n%s", out)
	}
	if !strings.Contains(out, "-j "+serviceChain(a.Name)) {
		t.Errorf("KUBE-SERVICES lost unchanged service a:\n%s", out)
	}
	if !strings.Contains(out, ":"+serviceChain(b.Name)+" - [0:0]") || !strings.Contains(out, ":"+endpointChain(b.Name, b.Backends[0])) {
		t.Errorf("changed service b's chains not written:\n%s", out)
	}
	if !strings.Contains(out, ":KUBE-SEP-OLDOLDOLDOLDOLDO - [0:0]\n") || !strings.Contains(out, "-X KUBE-SEP-OLDOLDOLDOLDOLDO\n") {
		t.Errorf("stale chain not flushed and deleted:\n%s", out)
	}
	// Rules counted as kube-proxy's metrics count them: skipped ones too.
	if st.natRules <= st.natRulesWritten {
		t.Errorf("natRules %d, written %d: the skipped service's rules are not counted", st.natRules, st.natRulesWritten)
	}
}

// As kube-proxy, the health check node port of a LoadBalancer Service of
// externalTrafficPolicy Local is accepted even when no port of the Service
// is reachable from outside yet (no node ports allocated, no address in
// its status).
func TestHealthCheckNodePortWithoutExternalFrontends(t *testing.T) {
	svc := apitest.Service("default", "lb", "10.96.0.60", apitest.Port("http", tcp, 80, 8080))
	svc.Spec.Type = v1.ServiceTypeLoadBalancer
	svc.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	svc.Spec.HealthCheckNodePort = 31060
	no := false
	svc.Spec.AllocateLoadBalancerNodePorts = &no
	// The eBPF mode's packet layer too, with no chain for the port.
	externalOnly := defaultOpts
	externalOnly.externalOnly, externalOnly.noClusterIPs = true, true
	for _, opts := range []ruleOptions{defaultOpts, externalOnly} {
		got := string(renderCase(t, goldenCase{services: []*v1.Service{svc}, opts: opts}))
		want := `-A KUBE-NODEPORTS -m comment --comment "default/lb:http health check node port" -m tcp -p tcp --dport 31060 -j ACCEPT`
		if !strings.Contains(got, want) {
			t.Errorf("externalOnly %v: rules lack %q:\n%s", opts.externalOnly, want, got)
		}
		if opts.externalOnly && strings.Contains(got, "KUBE-SVC-") {
			t.Errorf("the packet layer wrote chains for a port it serves no frontend of:\n%s", got)
		}
	}
}
