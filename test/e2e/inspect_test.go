package e2e

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	cebpf "github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/inspect"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// runInspect runs `kube-bpf-proxy inspect -o json` on node as an operator
// does there: the real binary, in the node's network namespace, with a
// kubeconfig. It returns the exit status and the report.
func (e *env) runInspect(t *testing.T, node string, args ...string) (int, *inspect.Report) {
	t.Helper()
	n, err := e.c.Node(node)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args = append([]string{e.c.OneOffBinary(e.binary), "inspect", "-o", "json", "--kubeconfig=" + e.c.AdminKubeconfig,
		"--hostname-override=" + node, "--bpffs-path=" + filepath.Join(n.BPFFS, "kube-bpf-proxy")}, args...)
	out, err := e.c.NodeOutput(ctx, node, args...)
	code := 0
	if exit := (*exec.ExitError)(nil); errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var r inspect.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("inspect on %s: exit %d, %v; output %q, error %v", node, code, err, out, err)
	}
	return code, &r
}

func inspectedPort(r *inspect.Report, service string) *inspect.ServicePort {
	for i := range r.ServicePorts {
		if r.ServicePorts[i].Service == service {
			return &r.ServicePorts[i]
		}
	}
	return nil
}

// inspectNode runs inspect on a node the proxy serves: the node is
// consistent (exit 0) and its Services are shown with their endpoints;
// then a Service's ClusterIP is removed behind the proxy's back (its
// frontend map entry, or its KUBE-SERVICES rule), and inspect reports that
// frontend missing with exit status 1.
func (e *env) inspectNode(t *testing.T, ns, mode string) {
	ctx := context.Background()
	e.addWeb(t, ns, "inspected-1", "node1", "inspected")
	e.addWeb(t, ns, "inspected-2", "node2", "inspected")
	// A NodePort Service: in ebpf mode its node port is in the maps and
	// in the packet layer's rules.
	svc, err := e.c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "inspected"},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeNodePort,
			Selector: map[string]string{"app": "inspected"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP
	e.expectBackends(t, vip+":80", "inspected-1", "inspected-2")
	service := ns + "/inspected"

	var code int
	var r *inspect.Report
	if !eventually(30*time.Second, func() bool {
		code, r = e.runInspect(t, "node1")
		return code == inspect.ExitConsistent
	}) {
		t.Fatalf("inspect on a served node: exit %d, %d differences: %+v", code, r.Differences, r.ServicePorts)
	}
	if r.Mode != mode || !r.API.Compared {
		t.Errorf("inspect read mode %q (compared: %v), want %q compared with the API", r.Mode, r.API.Compared, mode)
	}
	p := inspectedPort(r, service)
	if p == nil || p.Status != inspect.StatusOK || len(p.Backends) != 2 {
		t.Fatalf("%s: %+v, want ok with two backends", service, p)
	}
	nodePorts := map[string]bool{}
	for _, f := range p.Frontends {
		if f.Kind == "NodePort" {
			nodePorts[f.Layer] = true
		}
	}
	wantLists := "cluster"
	if mode == "ebpf" {
		// Sockets on the node reach it in the maps; packets from
		// outside in the packet layer's rules.
		wantLists = "cluster,packet-cluster"
		if !nodePorts["socket"] || !nodePorts["packet"] {
			t.Errorf("%s frontends %+v, want its node port in both layers", service, p.Frontends)
		}
	} else if !nodePorts[""] {
		t.Errorf("%s frontends %+v, want its node port", service, p.Frontends)
	}
	for _, b := range p.Backends {
		if b.State != "ready" || strings.Join(b.Policies, ",") != wantLists {
			t.Errorf("%s backend %+v, want ready, in lists %s", service, b, wantLists)
		}
		if local := b.Local != nil && *b.Local; local != strings.HasPrefix(b.Address, "10.244.1.") {
			t.Errorf("%s backend %s: local %v, want it local to node1 exactly when in node1's pod range", service, b.Address, local)
		}
	}
	if kube := inspectedPort(r, "default/kubernetes"); kube == nil || kube.Status != inspect.StatusOK {
		t.Errorf("default/kubernetes: %+v, want ok", kube)
	}

	// Behind the proxy's back.
	if mode == "ebpf" {
		n, err := e.c.Node("node1")
		if err != nil {
			t.Fatal(err)
		}
		m, err := cebpf.LoadPinnedMap(filepath.Join(n.BPFFS, "kube-bpf-proxy", "kbp_services"), nil)
		if err != nil {
			t.Fatal(err)
		}
		// struct svc_key of bpf/lb.c: address and port in network order.
		key := make([]byte, 8)
		a := netip.MustParseAddr(vip).As4()
		copy(key, a[:])
		binary.BigEndian.PutUint16(key[4:], 80)
		key[6] = 6
		err = m.Delete(key)
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
	} else {
		// The source names each family's tool ("iptables-nft and
		// ip6tables-nft" on a node serving both): the IPv4 one is
		// first, and the Service is IPv4.
		tool := strings.Fields(r.Source)[0]
		if !strings.HasPrefix(tool, "iptables-") {
			t.Fatalf("inspect read the rules from %q, want iptables-<backend> first", r.Source)
		}
		rules, err := e.c.NodeOutput(ctx, "node1", tool, "-t", "nat", "-S", "KUBE-SERVICES")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(rules, "\n") {
			if !strings.Contains(line, `"`+service+`:http cluster IP"`) {
				continue
			}
			// The comment is the only quoted word; -D takes the rule
			// as -S prints it.
			before, rest, _ := strings.Cut(strings.TrimPrefix(line, "-A "), `"`)
			comment, after, _ := strings.Cut(rest, `"`)
			args := append([]string{tool, "-t", "nat", "-D"}, strings.Fields(before)...)
			args = append(append(args, comment), strings.Fields(after)...)
			if _, err := e.c.NodeOutput(ctx, "node1", args...); err != nil {
				t.Fatal(err)
			}
		}
	}
	code, r = e.runInspect(t, "node1")
	if code != inspect.ExitDifferences {
		t.Errorf("inspect with %s unprogrammed: exit %d, want %d", service, code, inspect.ExitDifferences)
	}
	// Its node port still serves: the port differs, by its ClusterIP.
	want := "frontend ClusterIP " + vip + ":80 is missing"
	if p := inspectedPort(r, service); p == nil || p.Status != inspect.StatusDiffers || len(p.Differences) != 1 || p.Differences[0] != want {
		t.Errorf("%s with its ClusterIP unprogrammed: %+v, want status differs: %s", service, p, want)
	}
	// Only that Service's port, and the other node is untouched.
	if r.Differences != 1 {
		t.Errorf("%d differences, want 1: %+v", r.Differences, r.ServicePorts)
	}
	if code, r := e.runInspect(t, "node2", service); code != inspect.ExitConsistent || len(r.ServicePorts) != 1 {
		t.Errorf("inspect %s on node2: exit %d, %+v; want 0 and that Service only", service, code, r.ServicePorts)
	}

	// Deleting the Service takes the rest of its program away.
	if err := e.c.Client.CoreV1().Services(ns).Delete(ctx, "inspected", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if !eventually(30*time.Second, func() bool {
		code, r = e.runInspect(t, "node1")
		return code == inspect.ExitConsistent
	}) {
		t.Errorf("after deleting %s: exit %d, %+v", service, code, r.ServicePorts)
	}
}

// TestInspectDualStack runs inspect on a dual-stack local cluster in each
// mode: a RequireDualStack Service has a port per family, and inspect
// compares each with its own family's maps or rules (exit 0). (A node
// whose proxy serves one family only warns instead: internal/inspect's
// family tests.)
func TestInspectDualStack(t *testing.T) {
	e := &env{c: newStackCluster(t, localcluster.DualStack)}
	ctx := context.Background()
	ns := e.namespace(t, "dual")
	e.addWeb(t, ns, "dual-1", "node1", "dual")
	policy := corev1.IPFamilyPolicyRequireDualStack
	if _, err := e.c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "dual"},
		Spec: corev1.ServiceSpec{
			Selector:       map[string]string{"app": "dual"},
			IPFamilyPolicy: &policy,
			Ports:          []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	service := ns + "/dual"
	for _, mode := range []string{"ebpf", "iptables"} {
		t.Run(mode, func(t *testing.T) {
			e.startProxiesWith(t, mode)
			defer e.stopProxies(t)
			var code int
			var r *inspect.Report
			if !eventually(60*time.Second, func() bool {
				code, r = e.runInspect(t, "node1")
				p := inspectedPort(r, service)
				return code == inspect.ExitConsistent && p != nil && p.Status == inspect.StatusOK
			}) {
				t.Fatalf("inspect on a dual-stack node: exit %d, families %v, warnings %q, ports %+v", code, r.Families, r.Warnings, r.ServicePorts)
			}
			if r.Mode != mode {
				t.Errorf("mode %q, want %q", r.Mode, mode)
			}
			byFamily := map[string]*inspect.ServicePort{}
			for i := range r.ServicePorts {
				if p := &r.ServicePorts[i]; p.Service == service {
					byFamily[p.Family] = p
				}
			}
			servesIPv6 := slices.Contains(r.Families, "IPv6")
			switch {
			case byFamily["IPv4"] == nil || byFamily["IPv4"].Status != inspect.StatusOK:
				t.Errorf("%s IPv4: %+v, want ok", service, byFamily["IPv4"])
			case servesIPv6 && (byFamily["IPv6"] == nil || byFamily["IPv6"].Status != inspect.StatusOK):
				t.Errorf("%s IPv6: %+v, want ok", service, byFamily["IPv6"])
			case !servesIPv6:
				t.Errorf("families %v: the proxy serves IPv6, want it checked", r.Families)
			}
			t.Logf("families %v, warnings %q", r.Families, r.Warnings)
		})
	}
}
