package localcluster

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// WorkloadPod is a pod of a workload (a Deployment's or a DaemonSet's pod
// template, as the API server holds it) to run on a node as its kubelet
// would: the container's args, its environment (downward API, ConfigMaps,
// service links), its ServiceAccount's in-cluster credentials mounted where
// the kubelet mounts them, its capabilities and user, on the pod network.
type WorkloadPod struct {
	Namespace string
	// Name is the pod's name (a controller would generate it).
	Name string
	Node string
	// Template is the workload's pod template; its labels become the
	// pod's.
	Template *corev1.PodTemplateSpec
	// Container names the container to run; empty: the only one.
	Container string
	// Binary is the image's entrypoint.
	Binary string
	// ReadyLine and NotReady are as in PodSpec.
	ReadyLine string
	NotReady  bool
	// TokenTTL is the life of the ServiceAccount token (default 24 h).
	TokenTTL time.Duration
}

// AddWorkloadPod starts a pod of a workload on a node (see WorkloadPod) and
// creates its Pod object, as AddPod does.
func (c *Cluster) AddWorkloadPod(ctx context.Context, w WorkloadPod) (*Pod, error) {
	if w.Template == nil {
		return nil, fmt.Errorf("pod %s/%s: no pod template", w.Namespace, w.Name)
	}
	spec := &w.Template.Spec
	if spec.HostNetwork {
		return nil, fmt.Errorf("pod %s/%s: hostNetwork pods run as the proxy does (LaunchProxy), not on the pod network", w.Namespace, w.Name)
	}
	var ctr *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == w.Container || (w.Container == "" && len(spec.Containers) == 1) {
			ctr = &spec.Containers[i]
		}
	}
	if ctr == nil {
		return nil, fmt.Errorf("pod %s/%s: no container %q among %d (name one when there are several)", w.Namespace, w.Name, w.Container, len(spec.Containers))
	}
	n, err := c.Node(w.Node)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(c.Dir, "pods", w.Namespace+"."+w.Name)
	cmd, env, err := c.containerCommand(ctx, containerRun{
		pod:      podRef{namespace: w.Namespace, name: w.Name, spec: spec, ctr: ctr, node: n},
		binary:   w.Binary,
		tokenTTL: w.TokenTTL,
		saDir:    filepath.Join(dir, "serviceaccount"),
		staging:  filepath.Join(dir, "run"),
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s/%s: %w", w.Namespace, w.Name, err)
	}
	return c.AddPod(ctx, PodSpec{
		Namespace: w.Namespace, Name: w.Name, Node: w.Node,
		Labels: w.Template.Labels, Ports: ctr.Ports,
		Command: cmd, Env: env,
		ReadyLine: w.ReadyLine, NotReady: w.NotReady,
	})
}

// StartDeployment runs the replicas of the Deployment the API server holds
// as pods spread over the nodes in turn, as the scheduler places them under
// a topology spread constraint over hostnames with maxSkew 1 (no scheduler
// or ReplicaSet controller runs here). Pods are named NAME-NODE-I. Each
// becomes Ready once its process logs readyLine (if set).
func (c *Cluster) StartDeployment(ctx context.Context, namespace, name, binary, readyLine string) ([]*Pod, error) {
	d, err := c.Client.AppsV1().Deployments(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading Deployment %s/%s (apply its manifests first): %w", namespace, name, err)
	}
	replicas := 1
	if d.Spec.Replicas != nil {
		replicas = int(*d.Spec.Replicas)
	}
	var pods []*Pod
	for i := range replicas {
		node := c.Nodes[i%len(c.Nodes)].Name
		p, err := c.AddWorkloadPod(ctx, WorkloadPod{
			Namespace: namespace, Name: fmt.Sprintf("%s-%s-%d", name, node, i/len(c.Nodes)), Node: node,
			Template: &d.Spec.Template, Binary: binary, ReadyLine: readyLine,
		})
		if err != nil {
			return pods, err
		}
		pods = append(pods, p)
	}
	return pods, nil
}

// StartDaemonSet runs a pod of the DaemonSet the API server holds on every
// node, named NAME-NODE. It is for DaemonSets on the pod network; the
// proxy's own (hostNetwork) runs with StartProxy.
func (c *Cluster) StartDaemonSet(ctx context.Context, namespace, name, binary, readyLine string) ([]*Pod, error) {
	ds, err := c.Client.AppsV1().DaemonSets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading DaemonSet %s/%s (apply its manifests first): %w", namespace, name, err)
	}
	var pods []*Pod
	for _, n := range c.Nodes {
		p, err := c.AddWorkloadPod(ctx, WorkloadPod{
			Namespace: namespace, Name: name + "-" + n.Name, Node: n.Name,
			Template: &ds.Spec.Template, Binary: binary, ReadyLine: readyLine,
		})
		if err != nil {
			return pods, err
		}
		pods = append(pods, p)
	}
	return pods, nil
}
