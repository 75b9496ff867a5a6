package inspect

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

var update = flag.Bool("update", false, "rewrite the golden reports in testdata/dualstack")

const familyNode = "node-a"

// familyService is a Service of the given families, with one TCP port and
// an EndpointSlice per family holding one endpoint on familyNode.
func familyService(name, port string, p, target int32, ips map[v1.IPFamily]string, endpoints map[v1.IPFamily]string) []runtime.Object {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.ServiceSpec{
			Type:  v1.ServiceTypeClusterIP,
			Ports: []v1.ServicePort{{Name: port, Port: p, Protocol: v1.ProtocolTCP, TargetPort: intstr.FromInt32(target)}},
		},
	}
	policy := v1.IPFamilyPolicySingleStack
	for _, f := range []v1.IPFamily{v1.IPv4Protocol, v1.IPv6Protocol} {
		if ip, ok := ips[f]; ok {
			svc.Spec.IPFamilies = append(svc.Spec.IPFamilies, f)
			svc.Spec.ClusterIPs = append(svc.Spec.ClusterIPs, ip)
		}
	}
	if len(svc.Spec.IPFamilies) == 2 {
		policy = v1.IPFamilyPolicyRequireDualStack
	}
	svc.Spec.IPFamilyPolicy = &policy
	svc.Spec.ClusterIP = svc.Spec.ClusterIPs[0]
	objs := []runtime.Object{svc}
	for f, addr := range endpoints {
		ready, node := true, familyNode
		proto := v1.ProtocolTCP
		objs = append(objs, &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name + "-" + strings.ToLower(string(f)),
				Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			AddressType: discoveryv1.AddressType(f),
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}, NodeName: &node}},
			Ports:       []discoveryv1.EndpointPort{{Name: &port, Port: &target, Protocol: &proto}},
		})
	}
	return objs
}

// dualStackAPI has default/web, dual-stack, and default/v6only, IPv6 only.
func dualStackAPI() []runtime.Object {
	objs := familyService("web", "http", 80, 8080,
		map[v1.IPFamily]string{v1.IPv4Protocol: "10.96.0.10", v1.IPv6Protocol: "fd00:10:96::10"},
		map[v1.IPFamily]string{v1.IPv4Protocol: "10.244.1.1", v1.IPv6Protocol: "fd00:10:244:1::1"})
	return append(objs, familyService("v6only", "dns", 53, 5353,
		map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:96::53"},
		map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:244:1::2"})...)
}

// group is a pinned service id with a ClusterIP and one backend.
func group(f model.IPFamily, id uint32, vip string, p uint16, be string) ebpf.PinnedGroup {
	return ebpf.PinnedGroup{Family: f, ID: id,
		Frontends: []ebpf.PinnedFrontend{{Frontend: model.Frontend{IP: netip.MustParseAddr(vip), Port: p, Protocol: model.TCP}, Kind: ebpf.KindClusterIP, Count: 1}},
		Backends:  []ebpf.PinnedBackend{{ID: 1, Backend: backend(be), Protocol: model.TCP, Slots: 1}},
		Counters:  &ebpf.PinnedCounters{Connections: uint64(id)},
	}
}

var (
	webV4    = group(model.IPv4, 1, "10.96.0.10", 80, "10.244.1.1:8080")
	webV6    = group(model.IPv6, 1, "fd00:10:96::10", 80, "[fd00:10:244:1::1]:8080")
	v6onlyV6 = group(model.IPv6, 2, "fd00:10:96::53", 53, "[fd00:10:244:1::2]:5353")
)

func readSave(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "dualstack", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestFamilies compares golden datapaths of dual-stack and IPv6-only nodes
// with an API server's dual-stack and IPv6 Services, as Inspect does after
// reading them: each family with its own Tracker and its own maps (kbp6_*)
// or rules (ip6tables-save). The reports are golden too.
func TestFamilies(t *testing.T) {
	api := dualStackAPI()
	ipv4Only := familyService("web", "http", 80, 8080,
		map[v1.IPFamily]string{v1.IPv4Protocol: "10.96.0.10"}, map[v1.IPFamily]string{v1.IPv4Protocol: "10.244.1.1"})
	v6Only := familyService("v6only", "dns", 53, 5353,
		map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:96::53"}, map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:244:1::2"})
	webV6Only := familyService("web", "http", 80, 8080,
		map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:96::10"}, map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:244:1::1"})
	rules := func(f model.IPFamily, nat string) *familyState {
		return rulesState(f, &iptables.SavedRules{Backend: "nft", NAT: readSave(t, nat), Filter: readSave(t, "filter.save")}, nil)
	}
	noRules := func(f model.IPFamily) *familyState {
		return rulesState(f, &iptables.SavedRules{Backend: "nft", NAT: []byte("*nat\nCOMMIT\n"), Filter: readSave(t, "filter.save")}, nil)
	}
	for _, tt := range []struct {
		name   string
		mode   string
		api    []runtime.Object
		states []*familyState
		// exit is the command's status; want are lines the table
		// holds.
		exit     int
		families []string
		want     []string
	}{
		{
			name: "ebpf-dual-stack-in-sync", mode: ModeEBPF, api: api,
			states:   pinnedStates(&ebpf.Pinned{Groups: []ebpf.PinnedGroup{webV4, webV6, v6onlyV6}}),
			exit:     ExitConsistent,
			families: []string{"IPv4", "IPv6"},
			want:     []string{"ebpf mode (IPv4, IPv6)", "no differences", "default/web:http/TCP IPv6", "[fd00:10:96::10]:80"},
		},
		{
			name: "ebpf-dual-stack-ipv6-port-missing", mode: ModeEBPF, api: api,
			states:   pinnedStates(&ebpf.Pinned{Groups: []ebpf.PinnedGroup{webV4, v6onlyV6}}),
			exit:     ExitDifferences,
			families: []string{"IPv4", "IPv6"},
			want:     []string{"1 difference", "default/web:http/TCP IPv6: the datapath holds nothing of this port: it is not programmed"},
		},
		{
			name: "ebpf-ipv6-only", mode: ModeEBPF, api: v6Only,
			states:   pinnedStates(&ebpf.Pinned{Groups: []ebpf.PinnedGroup{v6onlyV6}}),
			exit:     ExitConsistent,
			families: []string{"IPv6"},
			want:     []string{"ebpf mode (IPv6)", "no differences", "default/v6only:dns/TCP IPv6"},
		},
		{
			// An IPv4-only node's report is as before: no family
			// in the header or the labels.
			name: "ebpf-ipv4-only", mode: ModeEBPF, api: ipv4Only,
			states:   pinnedStates(&ebpf.Pinned{Groups: []ebpf.PinnedGroup{webV4}}),
			exit:     ExitConsistent,
			families: []string{"IPv4"},
			want:     []string{"Node node-a, ebpf mode, read from", "default/web:http/TCP  "},
		},
		{
			// The node's proxy serves IPv4 only: the IPv6 ports
			// are one warning, not differences.
			name: "ebpf-ipv4-node-dual-stack-services", mode: ModeEBPF, api: api,
			states:   pinnedStates(&ebpf.Pinned{Groups: []ebpf.PinnedGroup{webV4}}),
			exit:     ExitConsistent,
			families: []string{"IPv4"},
			want:     []string{"Warning: the API server's Services have 2 IPv6 service ports, but this node's datapath holds no IPv6: not compared"},
		},
		{
			name: "iptables-dual-stack-in-sync", mode: ModeIPTables, api: api,
			states:   []*familyState{rules(model.IPv4, "nat4.save"), rules(model.IPv6, "nat6.save")},
			exit:     ExitConsistent,
			families: []string{"IPv4", "IPv6"},
			want:     []string{"iptables mode (IPv4, IPv6), read from iptables-nft and ip6tables-nft", "no differences", "default/v6only:dns/TCP IPv6"},
		},
		{
			// ip6tables-save holds web's IPv6 ClusterIP, but the
			// API server says IPv4 only: it is extra.
			name: "iptables-ipv6-extra", mode: ModeIPTables, api: append(ipv4Only, v6Only...),
			states:   []*familyState{rules(model.IPv4, "nat4.save"), rules(model.IPv6, "nat6.save")},
			exit:     ExitDifferences,
			families: []string{"IPv4", "IPv6"},
			want:     []string{"default/web:http/TCP IPv6: the API server has no such port"},
		},
		{
			name: "iptables-ipv6-only", mode: ModeIPTables, api: append(webV6Only, v6Only...),
			states:   []*familyState{noRules(model.IPv4), rules(model.IPv6, "nat6.save")},
			exit:     ExitConsistent,
			families: []string{"IPv6"},
			want:     []string{"iptables mode (IPv6), read from ip6tables-nft.", "no differences", "default/web:http/TCP IPv6"},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			client := fake.NewClientset(tt.api...)
			exp, err := listExpected(context.Background(), client, familyNode)
			if err != nil {
				t.Fatal(err)
			}
			r := &Report{Node: familyNode, Mode: tt.mode, Source: "/sys/fs/bpf/kube-bpf-proxy", API: APIStatus{Compared: true}}
			report(r, tt.states, exp, filter{})
			var out bytes.Buffer
			if err := WriteTable(&out, r); err != nil {
				t.Fatal(err)
			}
			exit := ExitConsistent
			if r.Differences > 0 {
				exit = ExitDifferences
			}
			if exit != tt.exit {
				t.Errorf("exit %d, want %d:\n%s", exit, tt.exit, out.String())
			}
			if strings.Join(r.Families, ",") != strings.Join(tt.families, ",") {
				t.Errorf("families %q, want %q", r.Families, tt.families)
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("the report lacks %q:\n%s", w, out.String())
				}
			}
			for _, sp := range r.ServicePorts {
				if want := familyOfPort(sp); sp.Family != want {
					t.Errorf("%s: family %q, its frontends are %s", portLabel(sp), sp.Family, want)
				}
			}
			var js bytes.Buffer
			if err := WriteJSON(&js, r); err != nil {
				t.Fatal(err)
			}
			var back struct {
				Families     []string `json:"families"`
				ServicePorts []struct {
					Family string `json:"ipFamily"`
				} `json:"servicePorts"`
			}
			if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.ServicePorts) != len(r.ServicePorts) {
				t.Fatalf("JSON %s: %v", js.String(), err)
			}
			for i, sp := range back.ServicePorts {
				if sp.Family != r.ServicePorts[i].Family {
					t.Errorf("JSON port %d has ipFamily %q, want %q", i, sp.Family, r.ServicePorts[i].Family)
				}
			}
			golden := filepath.Join("testdata", "dualstack", tt.name+".golden")
			if *update {
				if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			if out.String() != string(want) {
				t.Errorf("report differs from %s (go test -run TestFamilies -update):\n%s", golden, out.String())
			}
		})
	}
}

// familyOfPort is the family of a port's first frontend with an address.
func familyOfPort(sp ServicePort) string {
	for _, fe := range sp.Frontends {
		if ap, err := netip.ParseAddrPort(fe.Address); err == nil {
			return model.FamilyOf(ap.Addr()).String()
		}
	}
	return sp.Family
}

// syncRules writes family f's iptables rules for api's Services in the
// node namespace netns, as that family's proxier would: the real
// ip6tables-nft-restore (iptables-nft-restore for IPv4).
func syncRules(t *testing.T, netns string, f model.IPFamily, objs []runtime.Object) {
	t.Helper()
	ctx := context.Background()
	dp, err := iptables.New(ctx, iptables.Config{Backend: iptables.BackendNFT, NetNS: netns, Family: f,
		LockFile: filepath.Join(t.TempDir(), "xtables.lock")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	tracker := model.NewTracker(model.WithNodeName(familyNode), model.WithFamily(f))
	for _, o := range objs {
		switch o := o.(type) {
		case *v1.Service:
			tracker.UpsertService(o)
		case *discoveryv1.EndpointSlice:
			tracker.UpsertEndpointSlice(o)
		}
	}
	if err := dp.Sync(ctx, tracker.Snapshot(true)); err != nil {
		t.Fatal(err)
	}
}

// On a real node namespace: the IPv6 proxier's ip6tables rules alone (an
// IPv6-only node's; auto-detection finds the iptables mode there), then
// with the IPv4 proxier's (a dual-stack node's), read back with
// ip6tables-nft-save and compared with a dual-stack API.
func TestKernelInspectIPv6Rules(t *testing.T) {
	n := testnet.New(t)
	netns := "/run/netns/" + n.Node
	api := dualStackAPI()
	o := Options{Mode: ModeAuto, Node: familyNode, Client: fake.NewClientset(api...),
		BPFFSPath: filepath.Join(t.TempDir(), "no-pins"), IPTables: iptables.Config{Backend: iptables.BackendAuto, NetNS: netns}}

	syncRules(t, netns, model.IPv6, api)
	r, err := Inspect(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	_ = WriteTable(&out, r)
	if r.Mode != ModeIPTables || r.Source != "ip6tables-nft" || strings.Join(r.Families, ",") != "IPv6" || r.Differences != 0 ||
		len(r.ServicePorts) != 2 || len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], "1 IPv4 service port, but this node's datapath holds no IPv4") {
		t.Errorf("IPv6 rules alone: want iptables mode from ip6tables-nft, IPv6 only, 2 ports in sync and a warning for the IPv4 one:\n%s", out.String())
	}

	syncRules(t, netns, model.IPv4, api)
	if r, err = Inspect(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	_ = WriteTable(&out, r)
	if r.Source != "iptables-nft and ip6tables-nft" || strings.Join(r.Families, ",") != "IPv4,IPv6" || r.Differences != 0 ||
		len(r.ServicePorts) != 3 || len(r.Warnings) != 0 {
		t.Errorf("dual-stack rules: want both families' 3 ports in sync, no warning:\n%s", out.String())
	}
	for _, sp := range r.ServicePorts {
		if sp.Family == "IPv6" && (len(sp.Backends) != 1 || !strings.HasPrefix(sp.Backends[0].Address, "[fd00:10:244:1::")) {
			t.Errorf("%s: backends %+v, want its IPv6 endpoint", portLabel(sp), sp.Backends)
		}
	}
	t.Logf("\n%s", out.String())
}

// The eBPF datapath of a dual-stack node, written by both families'
// proxiers (the IPv4 Dataplane and its IPv6 view, kbp6_* maps) and read
// back from the pins: in sync, then with the IPv6 ClusterIP of web gone,
// which inspect names as IPv6.
func TestKernelInspectIPv6Pins(t *testing.T) {
	n := testnet.New(t)
	cfg := ebpf.Config{BPFFSPath: testnet.BPFFS(t), CgroupPath: n.Cgroup, MaxServices: 64, MaxBackends: 256,
		MaxSockets: 256, NodeNetNS: "/run/netns/" + n.Node}
	t.Cleanup(func() { _ = ebpf.Cleanup(cfg.BPFFSPath) })
	sockets, err := ebpf.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sockets.Close() })
	v6, err := sockets.IPv6()
	if err != nil {
		t.Fatal(err)
	}
	api := dualStackAPI()
	sync := func(dp interface {
		Sync(context.Context, *model.Snapshot) error
	}, f model.IPFamily, objs []runtime.Object) {
		t.Helper()
		tracker := model.NewTracker(model.WithNodeName(familyNode), model.WithFamily(f))
		for _, o := range objs {
			switch o := o.(type) {
			case *v1.Service:
				tracker.UpsertService(o)
			case *discoveryv1.EndpointSlice:
				tracker.UpsertEndpointSlice(o)
			}
		}
		if err := dp.Sync(context.Background(), tracker.Snapshot(true)); err != nil {
			t.Fatal(err)
		}
	}
	sync(sockets, model.IPv4, api)
	sync(v6, model.IPv6, api)
	o := Options{Mode: ModeAuto, Node: familyNode, Client: fake.NewClientset(api...), BPFFSPath: cfg.BPFFSPath,
		IPTables: iptables.Config{Backend: iptables.BackendNFT, NetNS: "/run/netns/" + n.Node}}
	r, err := Inspect(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	_ = WriteTable(&out, r)
	if r.Mode != ModeEBPF || strings.Join(r.Families, ",") != "IPv4,IPv6" || r.Differences != 0 || len(r.ServicePorts) != 3 {
		t.Fatalf("dual-stack pins: want both families' 3 ports in sync:\n%s", out.String())
	}

	// web's IPv6 ClusterIP is gone from the IPv6 proxier's view.
	sync(v6, model.IPv6, append(familyService("web", "http", 80, 8080,
		map[v1.IPFamily]string{v1.IPv4Protocol: "10.96.0.10"}, map[v1.IPFamily]string{v1.IPv4Protocol: "10.244.1.1"}),
		familyService("v6only", "dns", 53, 5353,
			map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:96::53"}, map[v1.IPFamily]string{v1.IPv6Protocol: "fd00:10:244:1::2"})...))
	if r, err = Inspect(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	_ = WriteTable(&out, r)
	if r.Differences != 1 || !strings.Contains(out.String(), "default/web:http/TCP IPv6: the datapath holds nothing of this port") {
		t.Errorf("web's IPv6 port unprogrammed: want one difference naming it IPv6:\n%s", out.String())
	}
	t.Logf("\n%s", out.String())
}
