package localcluster

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
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
