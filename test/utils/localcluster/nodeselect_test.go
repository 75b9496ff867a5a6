package localcluster

import (
	"context"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
)

// abDaemonSet is one of overlays/ab's DaemonSets: its required node
// affinity on the desired-mode label (In for iptables, NotIn for ebpf).
func abDaemonSet(mode string, op corev1.NodeSelectorOperator) *appsv1.DaemonSet {
	ds := proxyDaemonSet(nil)
	ds.Name = ABDaemonSets[mode]
	ds.Labels = map[string]string{"app.kubernetes.io/name": "kube-bpf-proxy"}
	ds.Spec.Template.Spec.NodeSelector = map[string]string{"kubernetes.io/os": "linux"}
	ds.Spec.Template.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
		RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
			MatchExpressions: []corev1.NodeSelectorRequirement{{Key: DesiredModeLabel, Operator: op, Values: []string{"iptables"}}},
		}}},
	}}
	return ds
}

func labelledNode(name string, l map[string]string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}}
}

// Each node runs the DaemonSet its desired-mode label selects; unlabelled
// nodes run the ebpf one; a node no DaemonSet selects, or two do, is an
// error.
func TestNodeProxyOptions(t *testing.T) {
	linux := map[string]string{"kubernetes.io/os": "linux"}
	with := func(k, v string) map[string]string {
		m := map[string]string{k: v}
		for k, v := range linux {
			m[k] = v
		}
		return m
	}
	objects := []runtime.Object{
		abDaemonSet("ebpf", corev1.NodeSelectorOpNotIn),
		abDaemonSet("iptables", corev1.NodeSelectorOpIn),
		labelledNode("plain", linux),
		labelledNode("asks-ebpf", with(DesiredModeLabel, "ebpf")),
		labelledNode("asks-iptables", with(DesiredModeLabel, "iptables")),
		labelledNode("windows", map[string]string{"kubernetes.io/os": "windows"}),
	}
	c := &Cluster{Client: fake.NewClientset(objects...)}
	for node, want := range map[string]string{
		"plain":         "kube-bpf-proxy-ebpf",
		"asks-ebpf":     "kube-bpf-proxy-ebpf",
		"asks-iptables": "kube-bpf-proxy-iptables",
		"windows":       "error: no kube-bpf-proxy DaemonSet selects",
	} {
		o, err := c.NodeProxyOptions(context.Background(), node, "/bin/kbp")
		got := ""
		if err != nil {
			got = "error: " + err.Error()
		} else {
			got = o.DaemonSet.Name
		}
		if !strings.HasPrefix(got, want) {
			t.Errorf("node %s: %s, want %s", node, got, want)
		}
	}
	// Two DaemonSets selecting one node.
	both := abDaemonSet("iptables", corev1.NodeSelectorOpNotIn)
	both.Name = "kube-bpf-proxy-other"
	c = &Cluster{Client: fake.NewClientset(abDaemonSet("ebpf", corev1.NodeSelectorOpNotIn), both, labelledNode("plain", linux))}
	if _, err := c.NodeProxyOptions(context.Background(), "plain", "/bin/kbp"); err == nil || !strings.Contains(err.Error(), "both select") {
		t.Errorf("two DaemonSets on one node: err %v", err)
	}
}

func TestNodeMatches(t *testing.T) {
	node := labelledNode("n1", map[string]string{"zone": "a", "size": "4"})
	term := func(exprs []corev1.NodeSelectorRequirement, fields ...corev1.NodeSelectorRequirement) corev1.NodeSelectorTerm {
		return corev1.NodeSelectorTerm{MatchExpressions: exprs, MatchFields: fields}
	}
	req := func(k string, op corev1.NodeSelectorOperator, v ...string) corev1.NodeSelectorRequirement {
		return corev1.NodeSelectorRequirement{Key: k, Operator: op, Values: v}
	}
	for _, c := range []struct {
		name     string
		selector map[string]string
		terms    []corev1.NodeSelectorTerm
		want     bool
	}{
		{"nothing asked", nil, nil, true},
		{"nodeSelector matches", map[string]string{"zone": "a"}, nil, true},
		{"nodeSelector does not", map[string]string{"zone": "b"}, nil, false},
		{"In", nil, []corev1.NodeSelectorTerm{term([]corev1.NodeSelectorRequirement{req("zone", corev1.NodeSelectorOpIn, "a", "b")})}, true},
		{"NotIn", nil, []corev1.NodeSelectorTerm{term([]corev1.NodeSelectorRequirement{req("zone", corev1.NodeSelectorOpNotIn, "a")})}, false},
		{"NotIn, label absent", nil, []corev1.NodeSelectorTerm{term([]corev1.NodeSelectorRequirement{req("mode", corev1.NodeSelectorOpNotIn, "x")})}, true},
		{"DoesNotExist", nil, []corev1.NodeSelectorTerm{term([]corev1.NodeSelectorRequirement{req("zone", corev1.NodeSelectorOpDoesNotExist)})}, false},
		{"Gt", nil, []corev1.NodeSelectorTerm{term([]corev1.NodeSelectorRequirement{req("size", corev1.NodeSelectorOpGt, "2")})}, true},
		{"terms ORed", nil, []corev1.NodeSelectorTerm{
			term([]corev1.NodeSelectorRequirement{req("zone", corev1.NodeSelectorOpIn, "b")}),
			term(nil, req("metadata.name", corev1.NodeSelectorOpIn, "n1")),
		}, true},
		{"expressions ANDed", nil, []corev1.NodeSelectorTerm{term([]corev1.NodeSelectorRequirement{
			req("zone", corev1.NodeSelectorOpIn, "a"), req("size", corev1.NodeSelectorOpIn, "8")})}, false},
		{"empty term matches nothing", nil, []corev1.NodeSelectorTerm{{}}, false},
	} {
		spec := &corev1.PodSpec{NodeSelector: c.selector}
		if c.terms != nil {
			spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
				RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: c.terms}}}
		}
		got, err := NodeMatches(spec, node)
		if err != nil || got != c.want {
			t.Errorf("%s: %v, %v; want %v", c.name, got, err, c.want)
		}
	}
}

// The user's overlay of overlays/ab gives the iptables DaemonSet, by its
// new name, the pods' range (kube-proxy's clusterCIDR); the single-mode
// overlays keep theirs.
func TestOverlayTargets(t *testing.T) {
	c := &Cluster{Name: "kbptest", Nodes: []NodeInfo{{Name: "node1", IP: "172.30.0.11"}}}
	for mode, want := range map[string]string{
		"ebpf":     "",
		"iptables": "name: kube-bpf-proxy\n",
		"ab":       "name: " + ABDaemonSets["iptables"] + "\n",
	} {
		got := c.Overlay("../../../manifests/overlays/"+mode, mode)
		if !strings.Contains(got, "KUBERNETES_SERVICE_HOST=172.30.0.11") {
			t.Errorf("overlay %s does not set the API server's address:\n%s", mode, got)
		}
		hasCIDR := strings.Contains(got, "--cluster-cidr="+ClusterCIDR)
		if hasCIDR != (want != "") || (want != "" && !strings.Contains(got, want)) {
			t.Errorf("overlay %s: --cluster-cidr patch %v, want one targeting %q:\n%s", mode, hasCIDR, want, got)
		}
	}
}
