package inspect

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	cebpf "github.com/cilium/ebpf"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodeinfo"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/proxy"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMain(m *testing.M) { testnet.Main(m, nil) }

const testNode = "test-node"

// nodeAddress is the node's address as the proxy under test sees it.
const nodeAddress = "192.0.2.1"

// kernelAPI is the API the kernel tests' proxy and inspect read: a
// Service with session affinity and two endpoints, one of them
// terminating; one with internalTrafficPolicy Local, an endpoint on this
// node and one elsewhere; one without endpoints; a LoadBalancer with a node
// port, external IPs (one the node's, one not) and externalTrafficPolicy
// Local; and "victim", whose program the tests remove behind the proxy's
// back.
func kernelAPI(servers []string) *fake.Clientset {
	web := apitest.Service("default", "web", "10.96.0.10", apitest.Port("http", v1.ProtocolTCP, 80, 8080))
	web.Spec.SessionAffinity = v1.ServiceAffinityClientIP
	timeout := int32(600)
	web.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: &timeout}}
	local := apitest.Service("shop", "db", "10.96.0.11", apitest.Port("", v1.ProtocolTCP, 5432, 8080))
	itp := v1.ServiceInternalTrafficPolicyLocal
	local.Spec.InternalTrafficPolicy = &itp
	onNode := apitest.Ready(servers[0])
	node := testNode
	onNode.NodeName = &node
	elsewhere := apitest.Ready(servers[1])
	other := "other-node"
	elsewhere.NodeName = &other
	edge := apitest.Service("shop", "edge", "10.96.0.14", apitest.Port("https", v1.ProtocolTCP, 443, 8080))
	edge.Spec.Type = v1.ServiceTypeLoadBalancer
	edge.Spec.Ports[0].NodePort = 30443
	edge.Spec.ExternalIPs = []string{nodeAddress, "198.51.100.7"}
	edge.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	edge.Spec.HealthCheckNodePort = 32000
	edge.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "203.0.113.5"}}
	return fake.NewClientset(
		web,
		edge,
		apitest.Slice("shop", "edge", "edge-1", []discoveryv1.EndpointPort{apitest.SlicePort("https", v1.ProtocolTCP, 8080)}, onNode, elsewhere),
		apitest.Slice("default", "web", "web-1", []discoveryv1.EndpointPort{apitest.SlicePort("http", v1.ProtocolTCP, 8080)},
			apitest.Ready(servers[0]), apitest.Terminating(servers[1])),
		local,
		apitest.Slice("shop", "db", "db-1", []discoveryv1.EndpointPort{apitest.SlicePort("", v1.ProtocolTCP, 8080)}, onNode, elsewhere),
		apitest.Service("default", "empty", "10.96.0.12", apitest.Port("dns", v1.ProtocolUDP, 53, 5353)),
		apitest.Service("default", "victim", "10.96.0.13", apitest.Port("http", v1.ProtocolTCP, 80, 8080)),
		apitest.Slice("default", "victim", "victim-1", []discoveryv1.EndpointPort{apitest.SlicePort("http", v1.ProtocolTCP, 8080)},
			apitest.Ready(servers[0]), apitest.Ready(servers[1])),
	)
}

// runProxy runs the proxy with dp against api until the test ends. The
// returned function reports the error the proxy stopped with, if it did.
func runProxy(t *testing.T, api *fake.Clientset, dp dataplane.Dataplane) func() error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- proxy.Run(ctx, api, dp, proxy.Config{
			SyncPeriod: time.Hour, NodeName: testNode,
			Node: nodeinfo.New(nodeinfo.Config{NodeName: testNode, LocalAddresses: func() ([]netip.Addr, error) {
				return []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr(nodeAddress)}, nil
			}}),
			HealthzBindAddress: testnet.FreeAddr(t), MetricsBindAddress: testnet.FreeAddr(t),
		})
	}()
	var stopped error
	t.Cleanup(func() {
		cancel()
		if stopped != nil {
			dp.Close()
			return
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("proxy.Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("the proxy did not stop within 10s")
		}
		dp.Close()
	})
	return func() error {
		if stopped != nil {
			return stopped
		}
		select {
		case err := <-done:
			stopped = fmt.Errorf("the proxy stopped: %v", err)
		default:
		}
		return stopped
	}
}

// inspectUntil runs inspect until done accepts its report (the proxy syncs
// when it will), and returns that report; it fails the test after 30s.
func inspectUntil(t *testing.T, o Options, proxyFailed func() error, what string, done func(*Report) bool) *Report {
	t.Helper()
	var last bytes.Buffer
	for range 300 {
		if err := proxyFailed(); err != nil {
			t.Fatal(err)
		}
		r, err := Inspect(context.Background(), o)
		if errors.Is(err, ErrNoDatapath) {
			// Nothing programmed yet.
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if err != nil {
			t.Fatalf("inspect: %v", err)
		}
		if done(r) {
			return r
		}
		last.Reset()
		_ = WriteTable(&last, r)
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: never; last report:\n%s", what, last.String())
	return nil
}

func port(r *Report, service, name string) *ServicePort {
	for i := range r.ServicePorts {
		if r.ServicePorts[i].Service == service && r.ServicePorts[i].Port == name {
			return &r.ServicePorts[i]
		}
	}
	return nil
}

func backendSummary(sp *ServicePort) []string {
	var out []string
	for _, b := range sp.Backends {
		out = append(out, b.Address+" "+b.State+" "+strings.Join(b.Policies, ","))
	}
	return out
}

// runInspect runs the command's body, as `kube-bpf-proxy inspect -o
// json` would with this client, and returns its exit status and report.
func runInspect(t *testing.T, o Options) (int, *Report) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Run(context.Background(), o, "json", &out, &errOut)
	var r Report
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("inspect -o json: %v; output %q, stderr %q", err, out.String(), errOut.String())
	}
	return code, &r
}

// TestKernelInspectRunningProxy runs the proxy in both modes against the
// same API, checks that inspect shows what it programmed and finds it
// consistent (exit 0), then removes one Service's program behind the
// proxy's back and checks that inspect reports that port missing (exit
// 1), and that both modes show the same Services. The iptables mode runs
// on each backend, which inspect detects.
func TestKernelInspectRunningProxy(t *testing.T) {
	seen := map[string][]string{}
	for _, tc := range []struct{ name, mode, backend string }{
		{ModeEBPF, ModeEBPF, ""},
		{"iptables-nft", ModeIPTables, iptables.BackendNFT},
		{"iptables-legacy", ModeIPTables, iptables.BackendLegacy},
	} {
		mode := tc.mode
		t.Run(tc.name, func(t *testing.T) {
			n := testnet.New(t)
			client := n.AddPod("client", "10.244.0.100")
			var servers []string
			for _, p := range n.AddServers(2) {
				servers = append(servers, p.IP.String())
			}
			api := kernelAPI(servers)
			o := Options{Mode: ModeAuto, Node: testNode, Client: api,
				IPTables: iptables.Config{Backend: iptables.BackendAuto, NetNS: "/run/netns/" + n.Node}}
			var dp dataplane.Dataplane
			var err error
			if mode == ModeEBPF {
				cfg := ebpf.Config{BPFFSPath: testnet.BPFFS(t), CgroupPath: n.Cgroup, MaxServices: 64, MaxBackends: 256,
					MaxSockets: 256, NodeNetNS: "/run/netns/" + n.Node}
				t.Cleanup(func() { _ = ebpf.Cleanup(cfg.BPFFSPath) })
				o.BPFFSPath = cfg.BPFFSPath
				// As the binary runs it: the socket layer, and the
				// packet layer's rules for packets from outside.
				var sockets *ebpf.Dataplane
				if sockets, err = ebpf.New(cfg); err != nil {
					t.Fatal(err)
				}
				var packets *iptables.Dataplane
				packets, err = iptables.New(context.Background(), iptables.Config{Backend: iptables.BackendNFT, NetNS: o.IPTables.NetNS,
					ExternalOnly: true, LockFile: filepath.Join(t.TempDir(), "xtables.lock")})
				if err != nil {
					sockets.Close()
					t.Fatal(err)
				}
				dp = &dataplane.Layered{Primary: sockets, Packets: packets}
			} else {
				// No pins there: auto-detection must find the rules,
				// and the backend holding them.
				o.BPFFSPath = filepath.Join(t.TempDir(), "no-pins")
				dp, err = iptables.New(context.Background(), iptables.Config{Backend: tc.backend, NetNS: o.IPTables.NetNS,
					LockFile: filepath.Join(t.TempDir(), "xtables.lock")})
			}
			if err != nil {
				t.Fatal(err)
			}
			proxyFailed := runProxy(t, api, dp)

			r := inspectUntil(t, o, proxyFailed, "all five Services programmed", func(r *Report) bool {
				return r.Differences == 0 && len(r.ServicePorts) == 5
			})
			if r.Mode != mode || !r.API.Compared {
				t.Errorf("mode %q, compared %v; want %q, true", r.Mode, r.API.Compared, mode)
			}
			if mode == ModeIPTables && r.Source != "iptables-"+tc.backend {
				t.Errorf("read %s, want iptables-%s", r.Source, tc.backend)
			}
			// Three connections to web: the eBPF counters count them.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			out, err := client.Output(ctx, testnet.Helper("tcp", "10.96.0.10:80", "3")...)
			cancel()
			if err != nil || strings.Count(out, "ok pod-") != 3 {
				t.Fatalf("connecting to default/web: %v: %s", err, out)
			}
			r, err = Inspect(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			web := port(r, "default/web", "http")
			if web == nil || web.Status != StatusOK || web.AffinitySeconds != 600 {
				t.Fatalf("default/web:http = %+v, want status ok with a 600s affinity", web)
			}
			// The terminating endpoint is not used while a ready one
			// is: listed, in no backend list.
			if got, want := backendSummary(web), []string{servers[0] + ":8080 ready cluster", servers[1] + ":8080 terminating "}; !slices.Equal(got, want) {
				t.Errorf("default/web backends %q, want %q", got, want)
			}
			if len(web.Frontends) != 1 || web.Frontends[0].Address != "10.96.0.10:80" || web.Frontends[0].Kind != kindClusterIP {
				t.Errorf("default/web frontends %+v, want the ClusterIP", web.Frontends)
			}
			if mode == ModeEBPF && (web.Counters == nil || web.Counters.Connections != 3) {
				t.Errorf("default/web counters %+v in ebpf mode, want 3 connections", web.Counters)
			}
			db := port(r, "shop/db", "")
			if db == nil || db.InternalTrafficPolicy != "Local" {
				t.Fatalf("shop/db = %+v, want internalTrafficPolicy Local", db)
			}
			if got, want := backendSummary(db), []string{servers[0] + ":8080 ready local", servers[1] + ":8080 ready "}; !slices.Equal(got, want) {
				t.Errorf("shop/db backends %q, want %q (the local endpoint only)", got, want)
			}
			if b := db.Backends[0]; b.Local == nil || !*b.Local {
				t.Errorf("shop/db's endpoint on this node is not shown local: %+v", b)
			}
			if empty := port(r, "default/empty", "dns"); empty == nil || empty.Status != StatusOK || len(empty.Backends) != 0 {
				t.Errorf("default/empty:dns = %+v, want ok without backends", empty)
			}
			edge := port(r, "shop/edge", "https")
			if edge == nil || edge.ExternalTrafficPolicy != "Local" {
				t.Fatalf("shop/edge = %+v, want externalTrafficPolicy Local", edge)
			}
			var fes []string
			for _, f := range edge.Frontends {
				fes = append(fes, strings.TrimSpace(f.Kind+" "+f.Address+" "+f.Layer))
			}
			// The socket layer serves the node port on the node's
			// address, the external IP that is the node's own and the
			// load balancer IP; the packet layer every external
			// frontend, for packets from outside. The iptables mode's
			// rules serve them all.
			want := []string{"ClusterIP 10.96.0.14:443 socket", "NodePort " + nodeAddress + ":30443 socket", "ExternalIP " + nodeAddress + ":443 socket",
				"LoadBalancerIP 203.0.113.5:443 socket", "NodePort *:30443 packet", "ExternalIP " + nodeAddress + ":443 packet",
				"ExternalIP 198.51.100.7:443 packet", "LoadBalancerIP 203.0.113.5:443 packet"}
			if mode == ModeIPTables {
				want = []string{"ClusterIP 10.96.0.14:443", "NodePort *:30443", "ExternalIP " + nodeAddress + ":443", "ExternalIP 198.51.100.7:443", "LoadBalancerIP 203.0.113.5:443"}
			}
			if !slices.Equal(fes, want) {
				t.Errorf("shop/edge frontends %q, want %q", fes, want)
			}
			// From sockets on the node, every endpoint (kube-proxy's short
			// circuit); the rules for traffic from outside hold the local
			// one only.
			wantBackends := []string{servers[0] + ":8080 ready cluster,packet-cluster,packet-local", servers[1] + ":8080 ready cluster,packet-cluster"}
			if mode == ModeIPTables {
				wantBackends[1] = servers[1] + ":8080 ready cluster"
				wantBackends[0] = servers[0] + ":8080 ready cluster,local"
			}
			if got := backendSummary(edge); !slices.Equal(got, wantBackends) {
				t.Errorf("shop/edge backends %q, want %q", got, wantBackends)
			}
			if code, _ := runInspect(t, o); code != ExitConsistent {
				t.Errorf("exit status %d on a consistent node, want %d", code, ExitConsistent)
			}
			var names []string
			for _, sp := range r.ServicePorts {
				names = append(names, sp.Service+":"+sp.Port+"/"+sp.Protocol)
			}
			seen[tc.name] = names

			// The victim's program goes, behind the proxy's back.
			if mode == ModeEBPF {
				unprogramFrontend(t, o.BPFFSPath, "10.96.0.13", 80)
			} else {
				unprogramRules(t, n, tc.backend, "default/victim:http")
			}
			code, r := runInspect(t, o)
			if code != ExitDifferences {
				t.Errorf("exit status %d with a Service unprogrammed, want %d", code, ExitDifferences)
			}
			victim := port(r, "default/victim", "http")
			if victim == nil || victim.Status != StatusMissing {
				t.Fatalf("default/victim:http = %+v, want status missing", victim)
			}
			if len(victim.Frontends) != 1 || victim.Frontends[0].InDatapath {
				t.Errorf("default/victim frontends %+v, want its ClusterIP, not in the datapath", victim.Frontends)
			}
			if r.Differences != 1 {
				t.Errorf("%d differences, want 1 (the victim); report %+v", r.Differences, r.ServicePorts)
			}
			var table bytes.Buffer
			if err := WriteTable(&table, r); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(table.String(), "default/victim:http/TCP") || !strings.Contains(table.String(), "MISSING") {
				t.Errorf("the table does not show the victim missing:\n%s", table.String())
			}
			t.Logf("%s mode:\n%s", mode, table.String())

			if mode == ModeEBPF {
				// The packet layer loses the edge's external IP and
				// load balancer IP rules.
				unprogramRules(t, n, iptables.BackendNFT, "shop/edge:https")
				code, r := runInspect(t, o)
				edge := port(r, "shop/edge", "https")
				want := []string{
					"frontend ExternalIP 192.0.2.1:443 is missing from the packet layer",
					"frontend ExternalIP 198.51.100.7:443 is missing from the packet layer",
					"frontend LoadBalancerIP 203.0.113.5:443 is missing from the packet layer",
				}
				if code != ExitDifferences || edge == nil || edge.Status != StatusDiffers || !slices.Equal(edge.Differences, want) {
					t.Errorf("the packet layer without shop/edge's rules: exit %d, %+v; want 1, differences %q", code, edge, want)
				}
			}

			// Without the API: the datapath alone, consistent in itself.
			o.Client, o.ClientError = nil, context.DeadlineExceeded
			code, r = runInspect(t, o)
			if code != ExitConsistent || r.API.Compared || r.API.Error == "" {
				t.Errorf("without the API: exit %d, api %+v; want 0, not compared, with the reason", code, r.API)
			}
			// ebpf: the four service ids left, which the maps do not
			// name, and the packet layer's shop/edge.
			if want := map[string]int{ModeEBPF: 5, ModeIPTables: 4}[mode]; len(r.ServicePorts) != want {
				t.Errorf("without the API: %d ports shown, want %d", len(r.ServicePorts), want)
			}
		})
	}
	for _, name := range []string{"iptables-nft", "iptables-legacy"} {
		if !slices.Equal(seen[ModeEBPF], seen[name]) {
			t.Errorf("the modes show other Services: ebpf %q, %s %q", seen[ModeEBPF], name, seen[name])
		}
	}
}

// unprogramFrontend deletes a ClusterIP's entry from the pinned frontend
// map, as a stray tool or a bug might: struct svc_key of bpf/lb.c, the
// address and port in network byte order.
func unprogramFrontend(t *testing.T, dir, ip string, p uint16) {
	t.Helper()
	m, err := cebpf.LoadPinnedMap(filepath.Join(dir, "kbp_services"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	key := make([]byte, 8)
	a := netip.MustParseAddr(ip).As4()
	copy(key, a[:])
	binary.BigEndian.PutUint16(key[4:], p)
	key[6] = 6 // TCP
	if err := m.Delete(key); err != nil {
		t.Fatalf("deleting the frontend of %s:%d: %v", ip, p, err)
	}
}

// unprogramRules deletes every nat rule of KUBE-SERVICES naming a service
// port, in the test's node namespace.
func unprogramRules(t *testing.T, n *testnet.Net, backend, name string) {
	t.Helper()
	ctx := context.Background()
	out, err := n.NodeCommand(ctx, "iptables-"+backend, "-t", "nat", "-S", "KUBE-SERVICES").Output()
	if err != nil {
		t.Fatal(err)
	}
	deleted := 0
	for _, line := range strings.Split(string(out), "\n") {
		if !strings.Contains(line, `"`+name+` `) {
			continue
		}
		args := append([]string{"iptables-" + backend, "-t", "nat", "-D"}, splitRule(strings.TrimPrefix(line, "-A "))...)
		if out, err := n.NodeCommand(ctx, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
		deleted++
	}
	if deleted == 0 {
		t.Fatalf("no KUBE-SERVICES rule of %s:\n%s", name, out)
	}
}
