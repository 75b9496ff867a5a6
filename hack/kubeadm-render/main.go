//go:build ignore

// Command kubeadm-render prints kubeadm's kube-proxy addon (ServiceAccount,
// RBAC, ConfigMap and DaemonSet) as kubeadm's own code renders it, as
// `kubeadm init --pod-network-cidr=10.244.0.0/16` would install it on a
// control plane advertised at 192.168.0.10:6443. It imports
// k8s.io/kubernetes, which this module does not require:
// hack/kubeadm-render.sh runs it in a wrapper module, as hack/kube-build.sh
// builds Kubernetes.
package main

import (
	"fmt"
	"os"

	kubeadmapi "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm"
	kubeadmscheme "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/scheme"
	kubeadmapiv1 "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/v1beta4"
	"k8s.io/kubernetes/cmd/kubeadm/app/componentconfigs"
	"k8s.io/kubernetes/cmd/kubeadm/app/phases/addons/proxy"
)

func main() {
	initCfg := &kubeadmapiv1.InitConfiguration{
		LocalAPIEndpoint: kubeadmapiv1.APIEndpoint{AdvertiseAddress: "192.168.0.10", BindPort: 6443},
		NodeRegistration: kubeadmapiv1.NodeRegistrationOptions{CRISocket: "unix:///var/run/containerd/containerd.sock", Name: "node"},
	}
	clusterCfg := &kubeadmapiv1.ClusterConfiguration{KubernetesVersion: "v1.36.3"}
	clusterCfg.Networking.PodSubnet = "10.244.0.0/16"
	internal := &kubeadmapi.InitConfiguration{}
	kubeadmscheme.Scheme.Default(initCfg)
	if err := kubeadmscheme.Scheme.Convert(initCfg, internal, nil); err != nil {
		panic(err)
	}
	kubeadmscheme.Scheme.Default(clusterCfg)
	if err := kubeadmscheme.Scheme.Convert(clusterCfg, &internal.ClusterConfiguration, nil); err != nil {
		panic(err)
	}
	componentconfigs.Default(&internal.ClusterConfiguration, &internal.LocalAPIEndpoint, &internal.NodeRegistration)
	if err := proxy.EnsureProxyAddon(&internal.ClusterConfiguration, &internal.LocalAPIEndpoint, nil, os.Stdout, true); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
