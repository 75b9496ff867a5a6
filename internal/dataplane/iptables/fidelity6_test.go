package iptables

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The IPv6 and dual-stack fidelity test: upstream kube-proxy v1.36.3 and
// this mode render every kind of Service (kindsOfServices), once as
// single-stack IPv6 Services (their addresses mapped into IPv6 by to6)
// and once as dual-stack ones (both families' addresses, an EndpointSlice
// per family); their ip6tables-save outputs, and in dual-stack their
// iptables-save outputs too, must be the same but for allowedDifferences.
// kube-proxy runs dual-stack (one proxier per family, as wherever ip6tables
// works) and reads the objects from a minimal read-only API server this
// test serves inside kube-proxy's namespace (list and watch of the node,
// Services, EndpointSlices and ServiceCIDRs; Events accepted and dropped),
// since the local control plane has no IPv6 Service range: every address
// and port in the objects is set by the test, so no allocation is needed.
// This mode runs a datapath per family in one namespace, as kube-proxy's
// proxiers: the IPv4 one fed the model's snapshot of the IPv4 objects, the
// IPv6 one that snapshot mapped by snapshotTo6, as the model on this
// branch makes IPv4 snapshots alone (with an IPv6 Tracker it can be fed
// the objects themselves).
func TestKernelFidelityIPv6(t *testing.T) {
	if testing.Short() {
		t.Skip("runs upstream kube-proxy")
	}
	testnet.Require(t)
	kubeProxy := upstreamKubeProxy(t)
	svcs, eps := kindsOfServices()
	svcs6, eps6 := objectsTo6(svcs, eps)
	svcsDual, epsDual := dualStack(svcs, eps, svcs6, eps6)
	clusterCIDR6 := prefixTo6(netip.MustParsePrefix("10.244.0.0/16"))
	node6 := netip.MustParseAddr("fd00:172:29::2")

	for _, c := range []struct {
		name string
		svcs []corev1.Service
		eps  []discoveryv1.EndpointSlice
		dual bool
	}{{"ipv6", svcs6, eps6, false}, {"dual-stack", svcsDual, epsDual, true}} {
		for _, b := range backends {
			t.Run(c.name+"/"+b, func(t *testing.T) {
				upstream, upstream6 := upstreamRules6(t, kubeProxy, b, c.svcs, c.eps, clusterCIDR6, node6, c.dual)

				ns := fidelityNetNS(t, "kbp"+randomHex()+"-ours6", "")
				snap4 := snapshotOf(t, svcs, eps)
				snap6 := snapshotTo6(snap4)
				snap4.Node = fidelityVariants()[0].node
				snap6.Node = model.NodeInfo{AllLocalAddresses: true, NodePortAddresses: []netip.Addr{node6},
					LocalAddresses: []netip.Addr{netip.IPv6Loopback(), node6}}
				lock := filepath.Join(t.TempDir(), "xtables.lock")
				for _, fam := range []struct {
					cfg  Config
					snap *model.Snapshot
				}{
					{Config{Family: model.IPv4, ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16")}, snap4},
					{Config{Family: model.IPv6, ClusterCIDR: clusterCIDR6}, snap6},
				} {
					if fam.cfg.Family == model.IPv4 && !c.dual {
						// kube-proxy's IPv4 proxier has no Service then.
						fam.snap = &model.Snapshot{Full: true, Node: snap4.Node}
					}
					fam.cfg.Backend, fam.cfg.NetNS, fam.cfg.LockFile = b, ns, lock
					d, err := New(context.Background(), fam.cfg)
					if err != nil {
						t.Fatal(err)
					}
					for range 2 {
						if err := d.Sync(context.Background(), fam.snap); err != nil {
							t.Fatal(err)
						}
					}
					d.Close()
				}
				ours, ours6 := iptablesSave(t, ns, b), ip6tablesSave(t, ns, b)
				if diff := lineDiff(normalised(upstream6), normalised(ours6)); diff != "" {
					t.Errorf("our IPv6 rules differ from kube-proxy's beyond the allowed differences (- kube-proxy, + ours):\n%s", diff)
					t.Logf("kube-proxy's ip6tables-save:\n%s\nours:\n%s", upstream6, ours6)
				}
				if diff := lineDiff(normalised(upstream), normalised(ours)); diff != "" {
					t.Errorf("our IPv4 rules differ from kube-proxy's beyond the allowed differences (- kube-proxy, + ours):\n%s", diff)
					t.Logf("kube-proxy's iptables-save:\n%s\nours:\n%s", upstream, ours)
				}
			})
		}
	}
}

// dualStack merges each IPv4 Service with its IPv6 twin (ClusterIPs,
// external IPs, source ranges and load balancer ingress of both families,
// IPv4 first, RequireDualStack) and lists both families' EndpointSlices,
// the IPv6 ones renamed, as the EndpointSlice controller makes a slice per
// family.
func dualStack(svcs4 []*corev1.Service, eps4 []*discoveryv1.EndpointSlice, svcs6 []corev1.Service, eps6 []discoveryv1.EndpointSlice) ([]corev1.Service, []discoveryv1.EndpointSlice) {
	var outS []corev1.Service
	for i, s4 := range svcs4 {
		c := *s4.DeepCopy()
		s6 := svcs6[i]
		c.Spec.ClusterIPs = []string{c.Spec.ClusterIP, s6.Spec.ClusterIP}
		c.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}
		policy := corev1.IPFamilyPolicyRequireDualStack
		c.Spec.IPFamilyPolicy = &policy
		c.Spec.ExternalIPs = append(c.Spec.ExternalIPs, s6.Spec.ExternalIPs...)
		c.Spec.LoadBalancerSourceRanges = append(c.Spec.LoadBalancerSourceRanges, s6.Spec.LoadBalancerSourceRanges...)
		c.Status.LoadBalancer.Ingress = append(c.Status.LoadBalancer.Ingress, s6.Status.LoadBalancer.Ingress...)
		outS = append(outS, c)
	}
	var outE []discoveryv1.EndpointSlice
	for _, e := range eps4 {
		outE = append(outE, *e.DeepCopy())
	}
	for _, e := range eps6 {
		e.Name += "-v6"
		outE = append(outE, e)
	}
	return outS, outE
}

func randomHex() string {
	b := make([]byte, 3)
	f, err := os.Open("/dev/urandom")
	if err == nil {
		_, _ = f.Read(b)
		f.Close()
	}
	return fmt.Sprintf("%x", b)
}

// upstreamKubeProxy is the cached upstream kube-proxy binary ($KUBE_BIN,
// else what hack/kube-build.sh builds or has built).
func upstreamKubeProxy(t *testing.T) string {
	t.Helper()
	kubeBin := os.Getenv("KUBE_BIN")
	if kubeBin == "" {
		out, err := exec.Command("../../../hack/kube-build.sh").Output()
		if err != nil {
			t.Fatalf("hack/kube-build.sh: %v", err)
		}
		kubeBin = strings.TrimSpace(string(out))
	}
	p := filepath.Join(kubeBin, "kube-proxy")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("upstream kube-proxy: %v (hack/kube-build.sh builds it)", err)
	}
	return p
}

// objectsTo6 maps the objects' addresses into IPv6 as to6 does: single-stack
// IPv6 Services and IPv6 EndpointSlices.
func objectsTo6(svcs []*corev1.Service, eps []*discoveryv1.EndpointSlice) ([]corev1.Service, []discoveryv1.EndpointSlice) {
	s6 := func(s string) string { return to6(netip.MustParseAddr(s)).String() }
	var outS []corev1.Service
	for _, s := range svcs {
		c := *s.DeepCopy()
		c.Spec.ClusterIP = s6(c.Spec.ClusterIP)
		c.Spec.ClusterIPs = []string{c.Spec.ClusterIP}
		c.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol}
		single := corev1.IPFamilyPolicySingleStack
		c.Spec.IPFamilyPolicy = &single
		for i, ip := range c.Spec.ExternalIPs {
			c.Spec.ExternalIPs[i] = s6(ip)
		}
		for i, r := range c.Spec.LoadBalancerSourceRanges {
			c.Spec.LoadBalancerSourceRanges[i] = prefixTo6(netip.MustParsePrefix(r)).String()
		}
		for i, ing := range c.Status.LoadBalancer.Ingress {
			if ing.IP != "" {
				c.Status.LoadBalancer.Ingress[i].IP = s6(ing.IP)
			}
		}
		outS = append(outS, c)
	}
	var outE []discoveryv1.EndpointSlice
	for _, e := range eps {
		c := *e.DeepCopy()
		c.AddressType = discoveryv1.AddressTypeIPv6
		for i := range c.Endpoints {
			for j, a := range c.Endpoints[i].Addresses {
				c.Endpoints[i].Addresses[j] = s6(a)
			}
		}
		outE = append(outE, c)
	}
	return outS, outE
}

// fakeAPIServer serves a fixed set of objects read-only, as much of the
// API as kube-proxy's informers use: a list (or a watch with
// sendInitialEvents, client-go's watch-list) per resource, then watches
// that stay open and quiet.
type fakeAPIServer struct {
	t       *testing.T
	objects map[string]listOf // by path
	mu      sync.Mutex
	unknown []string
}

type listOf struct {
	kind, apiVersion string
	items            []any
}

func (f *fakeAPIServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/events") {
		// The birth cry and other Events: taken and dropped.
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		var body map[string]any
		_ = json.NewDecoder(r.Body).Decode(&body)
		_ = json.NewEncoder(w).Encode(body)
		return
	}
	l, ok := f.objects[r.URL.Path]
	if !ok || r.Method != http.MethodGet {
		f.mu.Lock()
		f.unknown = append(f.unknown, r.Method+" "+r.URL.String())
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}`)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	q := r.URL.Query()
	if q.Get("watch") != "true" && q.Get("watch") != "1" {
		_ = json.NewEncoder(w).Encode(map[string]any{"kind": l.kind + "List", "apiVersion": l.apiVersion,
			"metadata": map[string]any{"resourceVersion": "1"}, "items": l.items})
		return
	}
	flusher, _ := w.(http.Flusher)
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	if q.Get("sendInitialEvents") == "true" {
		for _, it := range l.items {
			_ = enc.Encode(map[string]any{"type": "ADDED", "object": it})
		}
		_ = enc.Encode(map[string]any{"type": "BOOKMARK", "object": map[string]any{"kind": l.kind, "apiVersion": l.apiVersion,
			"metadata": map[string]any{"resourceVersion": "1", "annotations": map[string]string{"k8s.io/initial-events-end": "true"}}}})
	}
	if flusher != nil {
		flusher.Flush()
	}
	<-r.Context().Done()
}

// typed gives an object its kind and apiVersion, as the API server
// returns them in watch events.
func typed(kind, apiVersion string, obj any) any {
	b, _ := json.Marshal(obj)
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	m["kind"], m["apiVersion"] = kind, apiVersion
	md, _ := m["metadata"].(map[string]any)
	if md == nil {
		md = map[string]any{}
		m["metadata"] = md
	}
	md["resourceVersion"] = "1"
	if md["uid"] == nil {
		md["uid"] = fmt.Sprintf("uid-%s-%v-%v", kind, md["namespace"], md["name"])
	}
	return m
}

// upstreamRules6 runs kube-proxy in a namespace of its own, reading svcs
// and eps from a fake API server there, until its IPv6 proxier (and with
// dual, its IPv4 one) has synced every Service, and returns its
// iptables-save and ip6tables-save.
func upstreamRules6(t *testing.T, kubeProxy, backend string, svcs []corev1.Service, eps []discoveryv1.EndpointSlice,
	clusterCIDR6 netip.Prefix, node6 netip.Addr, dual bool) (string, string) {
	t.Helper()
	ns := fidelityNetNS(t, "kbp"+randomHex()+"-kp6", "")
	node := corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode, Labels: map[string]string{"kubernetes.io/hostname": testNode}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fidNodeIP},
			{Type: corev1.NodeInternalIP, Address: node6.String()}, {Type: corev1.NodeHostName, Address: testNode}}}}
	f := &fakeAPIServer{t: t, objects: map[string]listOf{
		"/api/v1/nodes":    {"Node", "v1", []any{typed("Node", "v1", node)}},
		"/api/v1/services": {"Service", "v1", nil},
		"/apis/discovery.k8s.io/v1/endpointslices": {"EndpointSlice", "discovery.k8s.io/v1", nil},
		"/apis/networking.k8s.io/v1/servicecidrs":  {"ServiceCIDR", "networking.k8s.io/v1", nil},
	}}
	for _, s := range svcs {
		l := f.objects["/api/v1/services"]
		l.items = append(l.items, typed("Service", "v1", s))
		f.objects["/api/v1/services"] = l
	}
	for _, e := range eps {
		l := f.objects["/apis/discovery.k8s.io/v1/endpointslices"]
		l.items = append(l.items, typed("EndpointSlice", "discovery.k8s.io/v1", e))
		f.objects["/apis/discovery.k8s.io/v1/endpointslices"] = l
	}
	var ln net.Listener
	if err := netnsenter.Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: f}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: fake, cluster: {server: "http://%s"}}]
users: [{name: fake, user: {}}]
contexts: [{name: fake, context: {cluster: fake, user: fake}}]
current-context: fake
`, ln.Addr())), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "kube-proxy.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command("nsenter", "--net="+ns, "--", kubeProxy,
		"--kubeconfig="+kubeconfig,
		"--hostname-override="+testNode,
		"--proxy-mode=iptables",
		"--cluster-cidr=10.244.0.0/16,"+clusterCIDR6.String(),
		"--conntrack-max-per-core=0",
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=127.0.0.1:10256",
		"--v=2")
	cmd.Env = []string{"PATH=" + backendPath(t, backend), "HOME=/root", "XTABLES_LOCKFILE=" + filepath.Join(dir, "xtables.lock")}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	names := servicePortNames(svcs)
	return awaitUpstream(t, cmd, ns, backend, logPath, 90*time.Second, func(save, save6 string) bool {
		return containsAll(save6, names) && (!dual || containsAll(save, names)) && strings.Contains(save, chainNodePorts)
	}, func() string {
		f.mu.Lock()
		defer f.mu.Unlock()
		return fmt.Sprintf("requests not served: %v", f.unknown)
	})
}
