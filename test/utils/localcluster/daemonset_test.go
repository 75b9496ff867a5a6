package localcluster

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

var kubernetesService = &corev1.Service{
	ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "kubernetes"},
	Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1",
		Ports: []corev1.ServicePort{{Name: "https", Port: 443, Protocol: corev1.ProtocolTCP}}},
}

func proxyDaemonSet(env []corev1.EnvVar, envFrom ...corev1.EnvFromSource) *appsv1.DaemonSet {
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "kube-bpf-proxy"},
		Spec: appsv1.DaemonSetSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{
			EnableServiceLinks: ptr.To(true),
			HostNetwork:        true,
			Containers:         []corev1.Container{{Name: proxyContainer, Env: env, EnvFrom: envFrom}},
		}}},
	}
}

func apiServerConfigMap(host string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "kube-bpf-proxy-apiserver-abc"},
		Data:       map[string]string{"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": "6443"},
	}
}

var fromConfigMap = corev1.EnvFromSource{ConfigMapRef: &corev1.ConfigMapEnvSource{
	LocalObjectReference: corev1.LocalObjectReference{Name: "kube-bpf-proxy-apiserver-abc"}}}

var nodeNameEnv = corev1.EnvVar{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{
	FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}}

// The proxy's environment is the kubelet's: service links for
// default/kubernetes (and the pod's namespace's Services), overridden by
// what the container declares, envFrom first and env over it.
func TestPodEnv(t *testing.T) {
	dns := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "kube-dns"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", Ports: []corev1.ServicePort{
			{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}, {Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP}}},
	}
	node := NodeInfo{Name: "node2", IP: "172.30.0.12"}
	tests := []struct {
		name    string
		ds      *appsv1.DaemonSet
		objects []runtime.Object
		want    map[string]string
		absent  []string
		wantErr string
	}{
		{
			name:    "the kubelet's variables alone",
			ds:      proxyDaemonSet([]corev1.EnvVar{nodeNameEnv}),
			objects: []runtime.Object{kubernetesService, dns},
			want: map[string]string{
				"KUBERNETES_SERVICE_HOST":       "10.96.0.1",
				"KUBERNETES_SERVICE_PORT":       "443",
				"KUBERNETES_SERVICE_PORT_HTTPS": "443",
				"KUBERNETES_PORT":               "tcp://10.96.0.1:443",
				"KUBERNETES_PORT_443_TCP_ADDR":  "10.96.0.1",
				"KUBE_DNS_SERVICE_HOST":         "10.96.0.10",
				"KUBE_DNS_PORT":                 "udp://10.96.0.10:53",
				"KUBE_DNS_PORT_53_TCP":          "tcp://10.96.0.10:53",
				"NODE_NAME":                     "node2",
				"HOSTNAME":                      "node2",
				"PATH":                          imagePath,
			},
		},
		{
			name: "service links off: default/kubernetes still",
			ds: func() *appsv1.DaemonSet {
				d := proxyDaemonSet(nil)
				d.Spec.Template.Spec.EnableServiceLinks = ptr.To(false)
				return d
			}(),
			objects: []runtime.Object{kubernetesService, dns},
			want:    map[string]string{"KUBERNETES_SERVICE_HOST": "10.96.0.1"},
			absent:  []string{"KUBE_DNS_SERVICE_HOST"},
		},
		{
			name:    "the manifests' ConfigMap overrides the link's host and port only",
			ds:      proxyDaemonSet([]corev1.EnvVar{nodeNameEnv}, fromConfigMap),
			objects: []runtime.Object{kubernetesService, apiServerConfigMap("172.30.0.11")},
			want: map[string]string{
				"KUBERNETES_SERVICE_HOST": "172.30.0.11",
				"KUBERNETES_SERVICE_PORT": "6443",
				"KUBERNETES_PORT":         "tcp://10.96.0.1:443",
				"NODE_NAME":               "node2",
			},
		},
		{
			name:    "an empty value is a value",
			ds:      proxyDaemonSet(nil, fromConfigMap),
			objects: []runtime.Object{kubernetesService, apiServerConfigMap("")},
			want:    map[string]string{"KUBERNETES_SERVICE_HOST": ""},
		},
		{
			name: "env over envFrom, with references expanded",
			ds: proxyDaemonSet([]corev1.EnvVar{
				{Name: "KUBERNETES_SERVICE_HOST", Value: "192.0.2.1"},
				{Name: "ADDR", Value: "$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT) $$(NODE_NAME) $(UNKNOWN)"},
				{Name: "HOST_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.hostIP"}}},
			}, fromConfigMap),
			objects: []runtime.Object{kubernetesService, apiServerConfigMap("172.30.0.11")},
			want: map[string]string{
				"KUBERNETES_SERVICE_HOST": "192.0.2.1",
				"ADDR":                    "192.0.2.1:6443 $(NODE_NAME) $(UNKNOWN)",
				"HOST_IP":                 "172.30.0.12",
			},
		},
		{
			name:    "a missing ConfigMap keeps the container from starting",
			ds:      proxyDaemonSet(nil, fromConfigMap),
			objects: []runtime.Object{kubernetesService},
			wantErr: "ConfigMap kube-system/kube-bpf-proxy-apiserver-abc",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &Cluster{Client: fake.NewClientset(tt.objects...)}
			ctr, err := container(tt.ds)
			if err != nil {
				t.Fatal(err)
			}
			env, err := c.podEnv(context.Background(), daemonSetPod(tt.ds, ctr, node))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("podEnv() error %v, want one naming %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := envMap(env)
			for k, v := range tt.want {
				if g, ok := got[k]; !ok || g != v {
					t.Errorf("%s = %q (set: %v), want %q", k, g, ok, v)
				}
			}
			for _, k := range tt.absent {
				if _, ok := got[k]; ok {
					t.Errorf("%s is set, want it absent", k)
				}
			}
			if !slices.IsSorted(env) {
				t.Errorf("environment not sorted: %v", env)
			}
		})
	}
}

func TestRewriteArgs(t *testing.T) {
	rewrite := map[string]string{"/host/sys/fs/cgroup": "/sys/fs/cgroup/unified/kbp1/node1"}
	got := rewriteArgs([]string{"--mode=ebpf", "--cgroup-path=/host/sys/fs/cgroup", "--x=/host/sys/fs/cgroup/sub",
		"--y=/host/sys/fs/cgroupfoo", "/host/sys/fs/cgroup"}, rewrite)
	want := []string{"--mode=ebpf", "--cgroup-path=/sys/fs/cgroup/unified/kbp1/node1", "--x=/sys/fs/cgroup/unified/kbp1/node1/sub",
		"--y=/host/sys/fs/cgroupfoo", "/sys/fs/cgroup/unified/kbp1/node1"}
	if !slices.Equal(got, want) {
		t.Errorf("rewriteArgs() = %q, want %q", got, want)
	}
}

func TestNodePath(t *testing.T) {
	n := NodeInfo{Cgroup: "/cg/kbp/node1", BPFFS: "/c/node1/bpffs", NetNSDir: "/c/node1/netns", XtablesLock: "/c/node1/xtables.lock"}
	for in, want := range map[string]string{
		"/sys/fs/cgroup":      "/cg/kbp/node1",
		"/sys/fs/bpf":         "/c/node1/bpffs",
		"/sys/fs/bpf/kbp":     "/c/node1/bpffs/kbp",
		"/sys/fs/bpfx":        "/sys/fs/bpfx",
		"/run/xtables.lock":   "/c/node1/xtables.lock",
		"/run/xtables.lockx":  "/run/xtables.lockx",
		"/run/netns":          "/c/node1/netns",
		"/run/netns/x":        "/c/node1/netns/x",
		"/lib/modules":        "/lib/modules",
		"/sys/fs/cgroup/misc": "/cg/kbp/node1/misc",
	} {
		if got := n.nodePath(in); got != want {
			t.Errorf("nodePath(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestCapabilityPrefix(t *testing.T) {
	ctr := &corev1.Container{SecurityContext: &corev1.SecurityContext{
		Privileged:               ptr.To(false),
		AllowPrivilegeEscalation: ptr.To(false),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}, Add: []corev1.Capability{"BPF", "NET_ADMIN", "CAP_SYS_ADMIN"}},
	}}
	want := []string{"setpriv", "--bounding-set=-all,+bpf,+net_admin,+sys_admin", "--inh-caps=-all", "--no-new-privs", "--"}
	if got := capabilityPrefix(ctr); !slices.Equal(got, want) {
		t.Errorf("capabilityPrefix() = %q, want %q", got, want)
	}
	ctr.SecurityContext.RunAsUser = ptr.To[int64](65534)
	want = append(want[:len(want)-1], "--reuid=65534", "--regid=65534", "--clear-groups", "--")
	if got := capabilityPrefix(ctr); !slices.Equal(got, want) {
		t.Errorf("runAsUser: capabilityPrefix() = %q, want %q", got, want)
	}
	ctr.SecurityContext.RunAsGroup = ptr.To[int64](1000)
	want[len(want)-3] = "--regid=1000"
	if got := capabilityPrefix(ctr); !slices.Equal(got, want) {
		t.Errorf("runAsGroup: capabilityPrefix() = %q, want %q", got, want)
	}
	ctr.SecurityContext.Privileged = ptr.To(true)
	if got := capabilityPrefix(ctr); got != nil {
		t.Errorf("privileged: capabilityPrefix() = %q, want nothing", got)
	}
}

// A workload's pod on the pod network: the downward API names the pod, not
// the proxy, HOSTNAME is the pod's name, and its address is not known when
// its environment is computed.
func TestPodEnvWorkloadPod(t *testing.T) {
	c := &Cluster{Client: fake.NewClientset(kubernetesService)}
	field := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
	}
	spec := &corev1.PodSpec{ServiceAccountName: "probe-client", Containers: []corev1.Container{{Name: "probe",
		Env: []corev1.EnvVar{field("POD_NAME", "metadata.name"), field("POD_NAMESPACE", "metadata.namespace"),
			field("NODE_NAME", "spec.nodeName"), field("SA", "spec.serviceAccountName")}}}}
	pr := podRef{namespace: "probe", name: "probe-client-node1", spec: spec, ctr: &spec.Containers[0], node: NodeInfo{Name: "node1", IP: "172.30.0.11"}}
	env, err := c.podEnv(context.Background(), pr)
	if err != nil {
		t.Fatal(err)
	}
	got := envMap(env)
	for k, v := range map[string]string{"POD_NAME": "probe-client-node1", "POD_NAMESPACE": "probe", "NODE_NAME": "node1",
		"SA": "probe-client", "HOSTNAME": "probe-client-node1", "KUBERNETES_SERVICE_HOST": "10.96.0.1"} {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	spec.Containers[0].Env = append(spec.Containers[0].Env, field("IP", "status.podIP"))
	if _, err := c.podEnv(context.Background(), pr); err == nil || !strings.Contains(err.Error(), "status.podIP") {
		t.Errorf("status.podIP of a pod-network pod: err %v, want one naming the field", err)
	}
}

// Each simulated node has an xtables lock of its own, as each real node
// does: kube-bpf-proxy's DaemonSet mounts its /run/xtables.lock from the
// node's file, the same file the node's upstream kube-proxy is given, while
// the manifest itself still mounts the real node's /run/xtables.lock.
func TestXtablesLockPerNode(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "manifests", "base", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(raw, &ds); err != nil {
		t.Fatal(err)
	}
	ctr, err := container(&ds)
	if err != nil {
		t.Fatal(err)
	}
	var volume string
	for _, vm := range ctr.VolumeMounts {
		if vm.MountPath == xtablesLockPath {
			volume = vm.Name
		}
	}
	if volume == "" {
		t.Fatalf("the DaemonSet's container mounts nothing at %s: %+v", xtablesLockPath, ctr.VolumeMounts)
	}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == volume && (v.HostPath == nil || v.HostPath.Path != xtablesLockPath) {
			t.Errorf("volume %s = %+v, want the node's hostPath %s", volume, v.VolumeSource, xtablesLockPath)
		}
	}

	dir := t.TempDir()
	lockOf := map[string]string{}
	for _, name := range []string{"node1", "node2"} {
		n := NodeInfo{Name: name,
			Cgroup:      filepath.Join(dir, name, "cgroup"),
			BPFFS:       filepath.Join(dir, name, "bpffs"),
			NetNSDir:    filepath.Join(dir, name, "netns"),
			XtablesLock: filepath.Join(dir, name, "xtables.lock"),
		}
		if err := os.MkdirAll(n.Cgroup, 0o755); err != nil {
			t.Fatal(err)
		}
		mounts, _, err := podMounts(daemonSetPod(&ds, ctr, n), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range mounts {
			if m.target == xtablesLockPath {
				lockOf[name] = m.source
			}
		}
		if lockOf[name] != n.XtablesLock {
			t.Errorf("%s: %s is mounted from %q, want the node's own %s", name, xtablesLockPath, lockOf[name], n.XtablesLock)
		}
		if _, err := os.Stat(n.XtablesLock); err != nil {
			t.Errorf("%s: the lock file was not created as FileOrCreate creates it: %v", name, err)
		}
		if got, want := xtablesLockEnv(n), "XTABLES_LOCKFILE="+n.XtablesLock; got != want {
			t.Errorf("%s: kube-proxy's %s, want %s", name, got, want)
		}
	}
	if lockOf["node1"] == lockOf["node2"] {
		t.Errorf("both nodes lock %s", lockOf["node1"])
	}
}

// Upstream kube-proxy's iptables mode runs the backend asked for: its PATH
// starts with a directory whose iptables commands are that backend's.
func TestKubeProxyPathBackend(t *testing.T) {
	c := &Cluster{Dir: t.TempDir()}
	for backend, multi := range map[string]string{"": "xtables-legacy-multi", IptablesLegacy: "xtables-legacy-multi", IptablesNFT: "xtables-nft-multi"} {
		want, err := exec.LookPath(multi)
		if err != nil {
			t.Skipf("%s: %v", multi, err)
		}
		path, err := c.kubeProxyPath(KubeProxyIptables, backend)
		if err != nil {
			t.Fatal(err)
		}
		first, _, _ := strings.Cut(path, ":")
		for _, cmd := range []string{"iptables", "iptables-restore", "ip6tables-save"} {
			if got, err := os.Readlink(filepath.Join(first, cmd)); err != nil || got != want {
				t.Errorf("backend %q: %s in %s is %q (%v), want %s", backend, cmd, first, got, err, want)
			}
		}
	}
	if path, err := c.kubeProxyPath(KubeProxyNFTables, ""); err != nil || path != imagePath {
		t.Errorf("nftables mode's PATH %q (%v), want the image's", path, err)
	}
}

// In an image's root filesystem every mount point can be made, so the
// DaemonSet's mounts are made where it says, /host/sys/fs/cgroup
// included, and no argument is rewritten to name the node's path; and the
// container runs chrooted into the image, from its entrypoint.
func TestImageMounts(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "manifests", "base", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(raw, &ds); err != nil {
		t.Fatal(err)
	}
	ctr, err := container(&ds)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	n := NodeInfo{Name: "node1",
		Cgroup:      filepath.Join(dir, "cgroup"),
		BPFFS:       filepath.Join(dir, "bpffs"),
		NetNSDir:    filepath.Join(dir, "netns"),
		XtablesLock: filepath.Join(dir, "xtables.lock"),
	}
	if err := os.MkdirAll(n.Cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	pr := daemonSetPod(&ds, ctr, n)
	mounts, rewrite, err := podMountsIn(pr, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(rewrite) != 0 {
		t.Errorf("rewrites %v in an image", rewrite)
	}
	targets := map[string]string{}
	for _, m := range mounts {
		targets[m.target] = m.source
	}
	if targets["/host/sys/fs/cgroup"] != n.Cgroup {
		t.Errorf("/host/sys/fs/cgroup mounted from %q, want the node's cgroup %s (mounts %v)", targets["/host/sys/fs/cgroup"], n.Cgroup, targets)
	}

	c := &Cluster{Dir: dir, Image: &Image{Root: "/images/kbp", Entrypoint: []string{"/usr/local/bin/kube-bpf-proxy"}}}
	cmd, _, err := c.imageCommand(containerRun{pod: pr, extraArgs: []string{"--v=2"}, staging: filepath.Join(dir, "run")},
		[]string{"PATH=" + imagePath}, filepath.Join(dir, "sa"), mounts)
	if err != nil {
		t.Fatal(err)
	}
	script := cmd[7]
	for _, want := range []string{
		"lowerdir='/images/kbp'",
		`mount -n --rbind '` + n.Cgroup + `' "$r"'/host/sys/fs/cgroup'`,
		`mount -n --rbind '` + filepath.Join(dir, "sa") + `' "$r"'` + serviceAccountMount + `'`,
		`exec env -u PWD -u OLDPWD chroot "$r" "$@"`,
	} {
		if !strings.Contains(script, want) {
			t.Errorf("the container's script lacks %q:\n%s", want, script)
		}
	}
	rest := strings.Join(cmd[9:], " ")
	if !strings.HasPrefix(rest, "setpriv ") || !strings.Contains(rest, " -- /usr/local/bin/kube-bpf-proxy --mode=ebpf") || !strings.HasSuffix(rest, " --v=2") {
		t.Errorf("runs %q, want setpriv, the image's entrypoint, the container's args and the extra ones", rest)
	}
}
