package localcluster

import (
	"context"
	"fmt"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
)

// What the DaemonSet controller decides for the proxy's DaemonSets, done
// here for the simulated nodes: which DaemonSet's pod a node runs, from
// its labels, and the pod swapped when they change (overlays/ab's A/B).

// DesiredModeLabel is the Node label overlays/ab's DaemonSets select on:
// the mode an operator asks the node to run. (The proxy records the mode
// that serves it in another label, kube-bpf-proxy.io/mode.)
const DesiredModeLabel = "kube-bpf-proxy.io/desired-mode"

// ABDaemonSets names overlays/ab's DaemonSet of each mode.
var ABDaemonSets = map[string]string{"ebpf": "kube-bpf-proxy-ebpf", "iptables": "kube-bpf-proxy-iptables"}

// proxyAppSelector selects every object of the manifests (their
// kustomization labels them all).
const proxyAppSelector = "app.kubernetes.io/name=kube-bpf-proxy"

// NodeProxyOptions returns options that run binary as the pod the
// DaemonSet controller would place on node: of the kube-bpf-proxy
// DaemonSets in kube-system, the one whose nodeSelector and required node
// affinity the Node matches. None, or more than one, is an error (a node
// with two proxies, or none, is a misconfiguration the user must see).
func (c *Cluster) NodeProxyOptions(ctx context.Context, node, binary string) (ProxyOptions, error) {
	n, err := c.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return ProxyOptions{}, fmt.Errorf("reading Node %s: %w", node, err)
	}
	list, err := c.Client.AppsV1().DaemonSets("kube-system").List(ctx, metav1.ListOptions{LabelSelector: proxyAppSelector})
	if err != nil {
		return ProxyOptions{}, fmt.Errorf("listing the kube-bpf-proxy DaemonSets: %w", err)
	}
	var found []*appsv1.DaemonSet
	for i := range list.Items {
		ds := &list.Items[i]
		ok, err := NodeMatches(&ds.Spec.Template.Spec, n)
		if err != nil {
			return ProxyOptions{}, fmt.Errorf("DaemonSet %s: %w", ds.Name, err)
		}
		if ok {
			found = append(found, ds)
		}
	}
	switch len(found) {
	case 0:
		return ProxyOptions{}, fmt.Errorf("no kube-bpf-proxy DaemonSet selects node %s (labels %v): apply an overlay first", node, n.Labels)
	case 1:
		return ProxyOptions{Binary: binary, DaemonSet: found[0]}, nil
	}
	return ProxyOptions{}, fmt.Errorf("DaemonSets %s and %s both select node %s: a node runs one proxy", found[0].Name, found[1].Name, node)
}

// SyncProxy makes the node's proxy the pod of the DaemonSet that selects
// it now (NodeProxyOptions), as the DaemonSet controller and the kubelet do
// after the Node's labels changed: a running proxy of another DaemonSet
// gets SIGTERM (its pod is deleted) and is waited for, then the selected
// DaemonSet's pod starts and syncs. A proxy already of the selected
// DaemonSet is left alone. It returns the DaemonSet now running and whether
// it changed.
func (c *Cluster) SyncProxy(ctx context.Context, node, binary string, args ...string) (string, bool, error) {
	o, err := c.NodeProxyOptions(ctx, node, binary)
	if err != nil {
		return "", false, err
	}
	want := o.DaemonSet.Name
	if c.ProxyRunning(node) {
		if c.ProxyDaemonSet(node) == want {
			return want, false, nil
		}
		if _, err := c.SignalProxy(node, syscall.SIGTERM, 10*time.Second); err != nil {
			return "", false, err
		}
	}
	o.Args = args
	if err := c.StartProxy(ctx, node, o); err != nil {
		return "", false, err
	}
	return want, true, nil
}

// ProxyDaemonSet names the DaemonSet whose pod the node's proxy runs as
// (empty if none was started).
func (c *Cluster) ProxyDaemonSet(node string) string {
	p, err := c.proc(proxyName(node))
	if err != nil {
		return ""
	}
	return p.Owner
}

// NodeMatches reports whether a pod of spec may run on node, as the
// DaemonSet controller decides: its nodeSelector, and its required node
// affinity (terms ORed, the expressions and fields of a term ANDed).
// Taints are left out: the proxy tolerates every one.
func NodeMatches(spec *corev1.PodSpec, node *corev1.Node) (bool, error) {
	if !labels.SelectorFromSet(spec.NodeSelector).Matches(labels.Set(node.Labels)) {
		return false, nil
	}
	a := spec.Affinity
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return true, nil
	}
	for _, term := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
		ok, err := termMatches(term, node)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

var nodeSelectorOps = map[corev1.NodeSelectorOperator]selection.Operator{
	corev1.NodeSelectorOpIn:           selection.In,
	corev1.NodeSelectorOpNotIn:        selection.NotIn,
	corev1.NodeSelectorOpExists:       selection.Exists,
	corev1.NodeSelectorOpDoesNotExist: selection.DoesNotExist,
	corev1.NodeSelectorOpGt:           selection.GreaterThan,
	corev1.NodeSelectorOpLt:           selection.LessThan,
}

// termMatches evaluates one node selector term; an empty term matches
// nothing, as in the scheduler.
func termMatches(term corev1.NodeSelectorTerm, node *corev1.Node) (bool, error) {
	if len(term.MatchExpressions) == 0 && len(term.MatchFields) == 0 {
		return false, nil
	}
	sel := labels.NewSelector()
	for _, e := range term.MatchExpressions {
		op, ok := nodeSelectorOps[e.Operator]
		if !ok {
			return false, fmt.Errorf("node selector operator %q", e.Operator)
		}
		r, err := labels.NewRequirement(e.Key, op, e.Values)
		if err != nil {
			return false, err
		}
		sel = sel.Add(*r)
	}
	if !sel.Matches(labels.Set(node.Labels)) {
		return false, nil
	}
	for _, f := range term.MatchFields {
		if f.Key != "metadata.name" {
			return false, fmt.Errorf("node selector field %q: only metadata.name exists", f.Key)
		}
		in := false
		for _, v := range f.Values {
			in = in || v == node.Name
		}
		if (f.Operator == corev1.NodeSelectorOpIn) != in {
			return false, nil
		}
	}
	return true, nil
}
