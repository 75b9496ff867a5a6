package inspect

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

func TestParseRule(t *testing.T) {
	tests := []struct {
		name string
		line string
		want rule
	}{
		{
			"nft ClusterIP jump",
			`-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-CDGGSHYLG3RE2FKL`,
			rule{chain: "KUBE-SERVICES", comment: "default/web:http cluster IP", proto: model.TCP, dst: netip.MustParseAddr("10.96.0.10"), dport: 80, target: "KUBE-SVC-CDGGSHYLG3RE2FKL"},
		},
		{
			// iptables-legacy-save leaves a comment without spaces
			// unquoted.
			"legacy unquoted comment",
			`-A KUBE-NODEPORTS -p udp -m comment --comment shop/dns -m udp --dport 30053 -j KUBE-EXT-X`,
			rule{chain: "KUBE-NODEPORTS", comment: "shop/dns", proto: model.UDP, dport: 30053, target: "KUBE-EXT-X"},
		},
		{
			"affinity check",
			`-A KUBE-SVC-X -m comment --comment "a/b -> 10.0.0.1:80" -m recent --rcheck --seconds 600 --reap --name KUBE-SEP-Y --mask 255.255.255.255 --rsource -j KUBE-SEP-Y`,
			rule{chain: "KUBE-SVC-X", comment: "a/b -> 10.0.0.1:80", rcheck: 600, target: "KUBE-SEP-Y"},
		},
		{
			"DNAT",
			`-A KUBE-SEP-Y -p tcp -m comment --comment "a/b" -m tcp -j DNAT --to-destination 10.244.1.1:8080`,
			rule{chain: "KUBE-SEP-Y", comment: "a/b", proto: model.TCP, target: "DNAT", toDest: netip.MustParseAddrPort("10.244.1.1:8080")},
		},
		{
			"negated destination and range",
			`-A KUBE-SERVICES -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS`,
			rule{chain: "KUBE-SERVICES", dstTypeLocal: true, target: "KUBE-NODEPORTS"},
		},
		{
			"local source short circuit",
			`-A KUBE-EXT-X -m comment --comment "route LOCAL traffic for a/b external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-X`,
			rule{chain: "KUBE-EXT-X", comment: "route LOCAL traffic for a/b external destinations", srcTypeLocal: true, target: "KUBE-SVC-X"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseRule(tt.line)
			if !ok || got != tt.want {
				t.Errorf("parseRule:\n got %+v, %v\nwant %+v", got, ok, tt.want)
			}
		})
	}
}

// testdata/*.save are iptables-nft-save's dumps of the rules the iptables
// mode wrote for kernelAPI (TestKernelInspectRunningProxy).
func TestFromRules(t *testing.T) {
	nat, err := os.ReadFile("testdata/nat.save")
	if err != nil {
		t.Fatal(err)
	}
	filter, err := os.ReadFile("testdata/filter.save")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, p := range fromRules(nat, filter) {
		var b strings.Builder
		for _, f := range p.frontends {
			b.WriteString(f.kind + "=" + f.address() + " ")
		}
		for _, l := range slices.Sorted(mapKeys(p.lists)) {
			b.WriteString(l + "=[")
			for i, be := range p.lists[l] {
				if i > 0 {
					b.WriteString(",")
				}
				b.WriteString(be.String())
			}
			b.WriteString("] ")
		}
		if p.affinity > 0 {
			b.WriteString("affinity=" + seconds(p.affinity) + " ")
		}
		if p.internalLocal {
			b.WriteString("itp=Local ")
		}
		if p.externalLocal {
			b.WriteString("etp=Local ")
		}
		got[p.name.String()] = strings.TrimSpace(b.String())
	}
	want := map[string]string{
		"default/web:http/TCP":    "ClusterIP=10.96.0.10:80 cluster=[10.244.1.1:8080] affinity=600s",
		"default/victim:http/TCP": "ClusterIP=10.96.0.13:80 cluster=[10.244.1.1:8080,10.244.1.2:8080]",
		"shop/db:/TCP":            "ClusterIP=10.96.0.11:5432 local=[10.244.1.1:8080] itp=Local",
		"shop/edge:https/TCP": "ClusterIP=10.96.0.14:443 ExternalIP=192.0.2.1:443 ExternalIP=198.51.100.7:443 LoadBalancerIP=203.0.113.5:443 " +
			"NodePort=*:30443 cluster=[10.244.1.1:8080,10.244.1.2:8080] local=[10.244.1.1:8080] etp=Local",
		"default/empty:dns/UDP": "ClusterIP=10.96.0.12:53",
	}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("%s:\n got %s\nwant %s", name, got[name], w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("ports %q, want %d", slices.Sorted(mapKeys(got)), len(want))
	}
}

func mapKeys[K comparable, V any](m map[K]V) func(func(K) bool) {
	return func(yield func(K) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func backend(s string) model.Backend {
	ap := netip.MustParseAddrPort(s)
	return model.Backend{IP: ap.Addr(), Port: ap.Port()}
}

func spn(svc, port string) model.ServicePortName {
	ns, name, _ := strings.Cut(svc, "/")
	return model.ServicePortName{ServiceName: model.ServiceName{Namespace: ns, Name: name}, Port: port, Protocol: model.TCP}
}

// A datapath still sending new connections to a terminating endpoint
// while a ready one exists, and missing a new endpoint, differs: each
// backend is named with its state.
func TestCompareBackendStates(t *testing.T) {
	ready, terminating, fresh := backend("10.244.0.1:80"), backend("10.244.0.2:80"), backend("10.244.0.3:80")
	name := spn("default/web", "http")
	exp := &expected{
		ports: []model.ServicePort{{
			Name: name, ClusterIP: model.Frontend{IP: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: model.TCP},
			Backends: []model.Backend{ready, fresh}, Serving: []model.Backend{ready, terminating, fresh}, HasEndpoints: true,
			Affinity: 10 * time.Second,
		}},
		states: map[endpointKey]endpointState{
			{name, ready}:       {ready: true, serving: true},
			{name, terminating}: {serving: true, terminating: true},
			{name, fresh}:       {ready: true, serving: true},
		},
	}
	for _, mode := range []string{ModeEBPF, ModeIPTables} {
		t.Run(mode, func(t *testing.T) {
			dp := &dpPort{proto: model.TCP, lists: map[string][]model.Backend{}}
			list := listInternal
			if mode == ModeIPTables {
				list, dp.name, dp.named = listCluster, name, true
			}
			dp.lists[list] = []model.Backend{ready, terminating}
			dp.frontends = []dpFrontend{{kind: kindClusterIP, addr: netip.MustParseAddr("10.96.0.10"), port: 80, proto: model.TCP}}
			ports := compare(mode, []*dpPort{dp}, nil, exp, filter{})
			if len(ports) != 1 {
				t.Fatalf("ports %+v", ports)
			}
			p := ports[0]
			want := []string{
				"backend 10.244.0.3:80 (ready) is missing from the cluster endpoints",
				"backend 10.244.0.2:80 (terminating) should not be among the cluster endpoints",
				"session affinity timeout is none, should be 10s",
			}
			if p.Status != StatusDiffers || !slices.Equal(p.Differences, want) {
				t.Errorf("status %s, differences:\n%s\nwant:\n%s", p.Status, strings.Join(p.Differences, "\n"), strings.Join(want, "\n"))
			}
			var states []string
			for _, b := range p.Backends {
				states = append(states, b.Address+" "+b.State+" "+strings.Join(b.Policies, ","))
			}
			wantStates := []string{"10.244.0.1:80 ready cluster", "10.244.0.2:80 terminating cluster", "10.244.0.3:80 ready "}
			if !slices.Equal(states, wantStates) {
				t.Errorf("backends %q, want %q", states, wantStates)
			}
		})
	}
}

// Under internalTrafficPolicy Local with a node port, the BPF maps hold
// two service ids for the port, named nowhere: matching joins them by
// their frontends, and the ClusterIP's endpoints are the Local ones.
func TestCompareJoinsServiceIDs(t *testing.T) {
	local, remote := backend("10.244.0.1:80"), backend("10.244.1.1:80")
	name := spn("shop/db", "")
	vip := netip.MustParseAddr("10.96.0.11")
	exp := &expected{
		ports: []model.ServicePort{{
			Name: name, ClusterIP: model.Frontend{IP: vip, Port: 5432, Protocol: model.TCP},
			Backends: []model.Backend{local}, Cluster: []model.Backend{local, remote}, Local: []model.Backend{local},
			Serving: []model.Backend{local, remote}, HasEndpoints: true, InternalLocal: true,
			External: model.External{NodePort: 30432},
		}},
		states: map[endpointKey]endpointState{
			{name, local}:  {ready: true, serving: true, local: true},
			{name, remote}: {ready: true, serving: true},
		},
	}
	pinned := &ebpf.Pinned{Groups: []ebpf.PinnedGroup{
		{ID: 1, Frontends: []ebpf.PinnedFrontend{{Frontend: model.Frontend{IP: vip, Port: 5432, Protocol: model.TCP}, Kind: ebpf.KindClusterIP, Count: 1}},
			Backends: []ebpf.PinnedBackend{{ID: 1, Backend: local, Protocol: model.TCP, Slots: 1}}, Counters: &ebpf.PinnedCounters{Connections: 3}},
		{ID: 2, Frontends: []ebpf.PinnedFrontend{{Frontend: model.Frontend{IP: netip.MustParseAddr("192.0.2.1"), Port: 30432, Protocol: model.TCP}, Kind: ebpf.KindNodePort, Count: 2}},
			Backends: []ebpf.PinnedBackend{{ID: 1, Backend: local, Protocol: model.TCP, Slots: 1}, {ID: 2, Backend: remote, Protocol: model.TCP, Slots: 1}},
			Counters: &ebpf.PinnedCounters{Connections: 4, Refused: 1}},
	}}
	ports := compare(ModeEBPF, fromPinned(pinned), nil, exp, filter{})
	if len(ports) != 1 {
		t.Fatalf("%d ports, want the two ids joined in one: %+v", len(ports), ports)
	}
	p := ports[0]
	if p.Status != StatusOK {
		t.Errorf("status %s: %q", p.Status, p.Differences)
	}
	if p.Counters == nil || p.Counters.Connections != 7 || p.Counters.Refused != 1 {
		t.Errorf("counters %+v, want the two ids' summed", p.Counters)
	}
	var states []string
	for _, b := range p.Backends {
		states = append(states, b.Address+" "+strings.Join(b.Policies, ","))
	}
	if want := []string{"10.244.0.1:80 cluster,local", "10.244.1.1:80 cluster"}; !slices.Equal(states, want) {
		t.Errorf("backends %q, want %q", states, want)
	}
}

func TestFilter(t *testing.T) {
	mk := func(svc string) *dpPort {
		n := spn(svc, "http")
		return &dpPort{name: n, named: true, proto: model.TCP, lists: map[string][]model.Backend{}}
	}
	dps := []*dpPort{mk("default/web"), mk("default/db"), mk("shop/web")}
	for _, tt := range []struct {
		f    filter
		want []string
	}{
		{filter{}, []string{"default/web", "default/db", "shop/web"}},
		{filter{namespace: "default"}, []string{"default/web", "default/db"}},
		{filter{namespace: "shop", name: "web"}, []string{"shop/web"}},
	} {
		ports, _ := datapathOnly(ModeIPTables, dps, nil, tt.f)
		var got []string
		for _, p := range ports {
			got = append(got, p.Service)
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("filter %+v: %q, want %q", tt.f, got, tt.want)
		}
	}
}

func TestUsage(t *testing.T) {
	env := func(string) (string, bool) { return "", false }
	for _, tt := range []struct {
		args    []string
		code    int
		wantErr string
	}{
		{[]string{"--bogus"}, ExitUsage, "usage: kube-bpf-proxy inspect"},
		{[]string{"-o", "yaml"}, ExitUsage, `unknown -o "yaml"`},
		{[]string{"--mode", "ipvs"}, ExitUsage, `unknown --mode "ipvs"`},
		{[]string{"a", "b"}, ExitUsage, "one Service name at most"},
		{[]string{"--namespace", "x", "y/web"}, ExitUsage, `"y/web" is not in --namespace "x"`},
		{[]string{"default/"}, ExitUsage, "bad Service name"},
		{[]string{"--help"}, ExitConsistent, "Exit status: 0 when"},
		// Nothing there to read: the datapath cannot be read.
		{[]string{"--mode=ebpf", "--bpffs-path=/nonexistent"}, ExitFailed, "reading the eBPF datapath"},
	} {
		var out, errOut bytes.Buffer
		code := Main(context.Background(), tt.args, &out, &errOut, env)
		if code != tt.code || !strings.Contains(errOut.String(), tt.wantErr) {
			t.Errorf("inspect %q: exit %d, stderr %q; want %d and %q", tt.args, code, errOut.String(), tt.code, tt.wantErr)
		}
	}
}

// A service id whose live slots lack an entry, or name a backend the
// backend map does not hold, refuses some connections: inspect reports it
// even without the API server.
func TestPinnedInconsistencies(t *testing.T) {
	vip := netip.MustParseAddr("10.96.0.10")
	pinned := &ebpf.Pinned{Groups: []ebpf.PinnedGroup{{
		ID:           7,
		Frontends:    []ebpf.PinnedFrontend{{Frontend: model.Frontend{IP: vip, Port: 80, Protocol: model.TCP}, Kind: ebpf.KindClusterIP, Count: 3}},
		Backends:     []ebpf.PinnedBackend{{ID: 1, Backend: backend("10.244.0.1:80"), Protocol: model.TCP, Slots: 1}, {ID: 9, Missing: true, Slots: 1}},
		MissingSlots: 1,
	}}}
	ports, _ := datapathOnly(ModeEBPF, fromPinned(pinned), nil, filter{})
	want := []string{
		"service id 7: a slot names backend id 9, which the backend map does not hold",
		"service id 7: 1 of its live slots have no entry",
	}
	if len(ports) != 1 || ports[0].Status != StatusUnchecked || !slices.Equal(ports[0].Differences, want) {
		t.Fatalf("ports %+v, want one unchecked with differences %q", ports, want)
	}
	if got := ports[0].Backends; len(got) != 1 || got[0].Address != "10.244.0.1:80" || got[0].State != "active" || got[0].Weight != 1 {
		t.Errorf("backends %+v, want 10.244.0.1:80 active with weight 1", got)
	}
}

// A port whose ClusterIP entry is gone while its node port's remains
// differs by that frontend alone: the ClusterIP's backend list goes with
// its entry, and is not reported again backend by backend.
func TestCompareMissingClusterIPOnly(t *testing.T) {
	b1, b2 := backend("10.244.1.11:80"), backend("10.244.2.11:80")
	name := spn("ebpf/inspected", "http")
	vip := netip.MustParseAddr("10.96.101.195")
	exp := &expected{ports: []model.ServicePort{{
		Name: name, ClusterIP: model.Frontend{IP: vip, Port: 80, Protocol: model.TCP},
		Backends: []model.Backend{b1, b2}, Serving: []model.Backend{b1, b2}, HasEndpoints: true,
		External: model.External{NodePort: 32177},
	}}}
	pinned := &ebpf.Pinned{Groups: []ebpf.PinnedGroup{{
		ID: 1,
		Frontends: []ebpf.PinnedFrontend{{Frontend: model.Frontend{IP: netip.MustParseAddr("172.30.0.11"), Port: 32177, Protocol: model.TCP},
			Kind: ebpf.KindNodePort, Count: 2}},
		Backends: []ebpf.PinnedBackend{{ID: 1, Backend: b1, Protocol: model.TCP, Slots: 1}, {ID: 2, Backend: b2, Protocol: model.TCP, Slots: 1}},
	}}}
	ports := compare(ModeEBPF, fromPinned(pinned), nil, exp, filter{})
	want := []string{"frontend ClusterIP 10.96.101.195:80 is missing"}
	if len(ports) != 1 || ports[0].Status != StatusDiffers || !slices.Equal(ports[0].Differences, want) {
		t.Fatalf("ports %+v, want one differing by %q", ports, want)
	}
}
