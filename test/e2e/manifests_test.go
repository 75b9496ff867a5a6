package e2e

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/yaml"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// TestManifests renders each overlay with kubectl kustomize, has the real
// API server validate it (--dry-run=server, with admission), checks the
// DaemonSet is what docs/install.md promises, that the overlays differ exactly in
// mode, capabilities and mounts, that the API server's address comes from
// the ConfigMap a user's overlay sets, and checks the RBAC as the
// ServiceAccount itself, with a token of its own.
func TestManifests(t *testing.T) {
	c := newCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	rendered := map[string][]string{}
	daemonSets := map[string]*appsv1.DaemonSet{}
	for _, mode := range []string{"ebpf", "iptables"} {
		out, err := c.Kubectl(ctx, "kustomize", filepath.Join(manifestsDir, "overlays", mode))
		if err != nil {
			t.Fatal(err)
		}
		cmd := c.KubectlCommand(ctx, c.AdminKubeconfig, "apply", "--dry-run=server", "-f", "-")
		cmd.Stdin = strings.NewReader(out)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("overlay %s rejected by the API server: %v\n%s", mode, err, b)
		} else if !strings.Contains(string(b), "daemonset.apps/kube-bpf-proxy created (server dry run)") {
			t.Fatalf("overlay %s: unexpected dry run output:\n%s", mode, b)
		}
		rendered[mode] = strings.Split(out, "\n---\n")
		ds := daemonSetIn(t, out)
		daemonSets[mode] = ds
		args := ds.Spec.Template.Spec.Containers[0].Args
		if args[0] != "--mode="+mode {
			t.Errorf("overlay %s: first argument %q, want --mode=%s", mode, args[0], mode)
		}
		checkDaemonSet(t, mode, ds)
		// As shipped, the address is empty: the proxy refuses to start
		// until the user's overlay sets it (TestEndToEnd/FreshNodes).
		checkAPIServerConfigMap(t, mode, out, "")
	}
	checkOverlaysDiffer(t, rendered, daemonSets)
	checkABOverlay(t, c, ctx, rendered, daemonSets)

	// A user's overlay (the README's) merges the address into the same
	// ConfigMap; its new name (a hash of the data) rolls the DaemonSet.
	user := filepath.Join(c.Dir, "user-overlay")
	if err := os.MkdirAll(user, 0o755); err != nil {
		t.Fatal(err)
	}
	base, err := filepath.Abs(filepath.Join(manifestsDir, "overlays", "ebpf"))
	if err != nil {
		t.Fatal(err)
	}
	if base, err = filepath.Rel(user, base); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(user, "kustomization.yaml"), []byte(c.Overlay(base, "ebpf")), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := c.Kubectl(ctx, "kustomize", user)
	if err != nil {
		t.Fatal(err)
	}
	if name := checkAPIServerConfigMap(t, "user's", out, c.Nodes[0].IP); name == apiServerConfigMapName(t, rendered["ebpf"]) {
		t.Errorf("the user's overlay keeps the ConfigMap's name %s: changing the address would not roll the DaemonSet", name)
	}

	// RBAC, as the ServiceAccount (not impersonated): apply for real, then
	// ask with its own token.
	if _, err := c.Kubectl(ctx, "apply", "-k", filepath.Join(repoRoot, "manifests/overlays/ebpf")); err != nil {
		t.Fatal(err)
	}
	sa, err := c.ServiceAccountKubeconfig(ctx, "kube-system", "kube-bpf-proxy", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		verb, resource string
		allowed        bool
	}{
		{"list", "services", true},
		{"watch", "services", true},
		{"get", "services", true},
		{"list", "endpointslices.discovery.k8s.io", true},
		{"watch", "endpointslices.discovery.k8s.io", true},
		{"list", "servicecidrs.networking.k8s.io", true},
		{"watch", "servicecidrs.networking.k8s.io", true},
		{"create", "servicecidrs.networking.k8s.io", false},
		{"watch", "nodes", true},
		{"create", "events", true},
		{"patch", "events.events.k8s.io", true},
		{"get", "secrets", false},
		{"list", "secrets", false},
		{"create", "pods/exec", false},
		{"list", "pods", false},
		{"delete", "services", false},
		{"delete", "endpointslices.discovery.k8s.io", false},
		{"delete", "pods", false},
		{"delete", "nodes", false},
		{"delete", "events", false},
		{"update", "services", false},
		{"patch", "nodes", true}, // the mode label
		{"update", "nodes", false},
		{"create", "serviceaccounts/token", false},
	} {
		out, err := c.KubectlAs(ctx, sa, "auth", "can-i", q.verb, q.resource, "--all-namespaces")
		got := strings.TrimSpace(out)
		// can-i exits 1 for "no".
		if (got == "yes") != q.allowed || (got != "yes" && got != "no") {
			t.Errorf("can the ServiceAccount %s %s? got %q (err %v), want allowed=%v", q.verb, q.resource, got, err, q.allowed)
		}
	}
}

func daemonSetIn(t *testing.T, docs string) *appsv1.DaemonSet {
	t.Helper()
	for _, doc := range strings.Split(docs, "\n---\n") {
		if !strings.Contains(doc, "kind: DaemonSet") {
			continue
		}
		ds := &appsv1.DaemonSet{}
		if err := yaml.NewYAMLOrJSONDecoder(strings.NewReader(doc), 4096).Decode(ds); err != nil {
			t.Fatal(err)
		}
		return ds
	}
	t.Fatal("no DaemonSet rendered")
	return nil
}

// checkDaemonSet checks what replacing kube-proxy on every node needs.
func checkDaemonSet(t *testing.T, mode string, ds *appsv1.DaemonSet) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	ctr := spec.Containers[0]
	fail := func(what string) { t.Errorf("overlay %s: DaemonSet %s", mode, what) }
	if ds.Namespace != "kube-system" {
		fail("not in kube-system")
	}
	if !spec.HostNetwork {
		fail("without hostNetwork")
	}
	if spec.PriorityClassName != "system-node-critical" {
		fail("not system-node-critical")
	}
	// Cluster DNS is a Service: the proxy must resolve the API server's
	// name without it.
	if spec.DNSPolicy != corev1.DNSDefault {
		fail("resolving names with dnsPolicy " + string(spec.DNSPolicy) + ", not the node's resolver (Default)")
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		fail("does not tolerate every taint")
	}
	if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType ||
		u.RollingUpdate == nil || u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		fail("not rolling with maxUnavailable 1")
	}
	nodeName := false
	for _, e := range ctr.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeName = true
		}
	}
	if !nodeName {
		fail("without NODE_NAME from spec.nodeName")
	}
	if p := ctr.LivenessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/livez" || p.HTTPGet.Port.IntValue() != 10256 {
		fail("without a liveness probe on :10256/livez")
	}
	sc := ctr.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil ||
		len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		fail("privileged, or not dropping ALL capabilities")
	}
	mounts := map[string]string{}
	for _, m := range ctr.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	paths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			paths[v.Name] = v.HostPath.Path
		}
	}
	for host, inside := range map[string]string{"/sys/fs/bpf": "/sys/fs/bpf", "/sys/fs/cgroup": "/host/sys/fs/cgroup", "/run/xtables.lock": "/run/xtables.lock"} {
		found := false
		for name, p := range paths {
			if p == host && mounts[name] == inside {
				found = true
			}
		}
		if !found {
			fail("does not mount the node's " + host + " at " + inside)
		}
	}
	// /metrics where a kube-proxy scrape job looks (docs/metrics.md, "Who can
	// read the metrics").
	metricsPort := false
	for _, p := range ctr.Ports {
		metricsPort = metricsPort || (p.Name == "metrics" && p.ContainerPort == 10249)
	}
	if !metricsPort {
		fail("without the metrics port 10249")
	}
	for _, a := range []string{"--cgroup-path=/host/sys/fs/cgroup", "--bpffs-path=/sys/fs/bpf/kube-bpf-proxy", "--metrics-bind-address=0.0.0.0:10249"} {
		if !strings.Contains(strings.Join(ctr.Args, " "), a) {
			fail("without " + a)
		}
	}
}

// checkAPIServerConfigMap checks the rendered manifests carry the API
// server's ConfigMap in kube-system with the address host and a port, and
// that the proxy container takes its environment from it, with nothing
// declared in env to override it. It returns the ConfigMap's name.
func checkAPIServerConfigMap(t *testing.T, overlay, rendered, host string) string {
	t.Helper()
	var cm *corev1.ConfigMap
	for _, doc := range strings.Split(rendered, "\n---\n") {
		if !strings.Contains(doc, "kind: ConfigMap") {
			continue
		}
		m := &corev1.ConfigMap{}
		if err := yaml.NewYAMLOrJSONDecoder(strings.NewReader(doc), 4096).Decode(m); err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(m.Name, localcluster.APIServerConfigMap+"-") {
			cm = m
		}
	}
	if cm == nil {
		t.Errorf("overlay %s: no ConfigMap %s", overlay, localcluster.APIServerConfigMap)
		return ""
	}
	want := map[string]string{"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": "6443"}
	if cm.Namespace != "kube-system" || !reflect.DeepEqual(cm.Data, want) {
		t.Errorf("overlay %s: ConfigMap %s/%s holds %v, want %v in kube-system", overlay, cm.Namespace, cm.Name, cm.Data, want)
	}
	ctr := daemonSetIn(t, rendered).Spec.Template.Spec.Containers[0]
	if len(ctr.EnvFrom) != 1 || ctr.EnvFrom[0].ConfigMapRef == nil || ctr.EnvFrom[0].ConfigMapRef.Name != cm.Name ||
		ctr.EnvFrom[0].Prefix != "" || (ctr.EnvFrom[0].ConfigMapRef.Optional != nil && *ctr.EnvFrom[0].ConfigMapRef.Optional) {
		t.Errorf("overlay %s: the container's envFrom %+v is not exactly ConfigMap %s, required", overlay, ctr.EnvFrom, cm.Name)
	}
	for _, e := range ctr.Env {
		if _, ok := want[e.Name]; ok {
			t.Errorf("overlay %s: env declares %s, overriding the ConfigMap", overlay, e.Name)
		}
	}
	return cm.Name
}

func apiServerConfigMapName(t *testing.T, docs []string) string {
	t.Helper()
	for _, doc := range docs {
		for _, line := range strings.Split(doc, "\n") {
			if name, ok := strings.CutPrefix(strings.TrimSpace(line), "name: "+localcluster.APIServerConfigMap+"-"); ok && strings.Contains(doc, "kind: ConfigMap") {
				return localcluster.APIServerConfigMap + "-" + name
			}
		}
	}
	t.Fatal("no API server ConfigMap rendered")
	return ""
}

// checkOverlaysDiffer checks the two overlays render the same objects but
// for the DaemonSet's mode, capabilities, args and mounts, and those
// exactly: the ebpf mode adds SYS_ADMIN, --netns-dir=/run/netns and the
// node's /run/netns (read-only, HostToContainer), for closing UDP sockets
// inside pods' namespaces. Both modes have NET_RAW, which iptables-legacy
// needs: the ebpf mode writes the rules for traffic from outside.
func checkOverlaysDiffer(t *testing.T, rendered map[string][]string, ds map[string]*appsv1.DaemonSet) {
	t.Helper()
	for _, mode := range []string{"ebpf", "iptables"} {
		if len(rendered[mode]) != len(rendered["ebpf"]) {
			t.Fatalf("overlay %s renders %d objects, ebpf %d", mode, len(rendered[mode]), len(rendered["ebpf"]))
		}
	}
	for i, doc := range rendered["ebpf"] {
		if !strings.Contains(doc, "kind: DaemonSet") && doc != rendered["iptables"][i] {
			t.Errorf("the overlays differ outside the DaemonSet:\n%s\n---- and ----\n%s", doc, rendered["iptables"][i])
		}
	}
	caps := map[string][]corev1.Capability{
		"ebpf":     {"BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_ADMIN"},
		"iptables": {"BPF", "NET_ADMIN", "NET_RAW", "PERFMON"},
	}
	normal := map[string]*appsv1.DaemonSet{}
	for mode, d := range ds {
		d = d.DeepCopy()
		spec := &d.Spec.Template.Spec
		ctr := &spec.Containers[0]
		if got := slices.Sorted(slices.Values(ctr.SecurityContext.Capabilities.Add)); !slices.Equal(got, caps[mode]) {
			t.Errorf("overlay %s adds capabilities %v, want %v", mode, got, caps[mode])
		}
		var netns []corev1.VolumeMount
		ctr.VolumeMounts = slices.DeleteFunc(ctr.VolumeMounts, func(m corev1.VolumeMount) bool {
			if m.MountPath == "/run/netns" {
				netns = append(netns, m)
			}
			return m.MountPath == "/run/netns"
		})
		var netnsVolumes []corev1.Volume
		spec.Volumes = slices.DeleteFunc(spec.Volumes, func(v corev1.Volume) bool {
			if v.HostPath != nil && v.HostPath.Path == "/run/netns" {
				netnsVolumes = append(netnsVolumes, v)
				return true
			}
			return false
		})
		switch mode {
		case "ebpf":
			if len(netns) != 1 || !netns[0].ReadOnly || netns[0].MountPropagation == nil ||
				*netns[0].MountPropagation != corev1.MountPropagationHostToContainer ||
				len(netnsVolumes) != 1 || netnsVolumes[0].Name != netns[0].Name {
				t.Errorf("overlay ebpf: /run/netns mounts %+v of volumes %+v, want the node's /run/netns once, read-only, HostToContainer", netns, netnsVolumes)
			}
		default:
			if len(netns)+len(netnsVolumes) > 0 {
				t.Errorf("overlay %s mounts /run/netns, which only the ebpf mode needs", mode)
			}
		}
		var netnsArgs []string
		ctr.Args = slices.DeleteFunc(ctr.Args, func(a string) bool {
			if strings.HasPrefix(a, "--netns-dir") {
				netnsArgs = append(netnsArgs, a)
				return true
			}
			return false
		})
		if want := map[string][]string{"ebpf": {"--netns-dir=/run/netns"}}[mode]; !slices.Equal(netnsArgs, want) {
			t.Errorf("overlay %s: --netns-dir args %q, want %q", mode, netnsArgs, want)
		}
		ctr.Args[0] = ""
		ctr.SecurityContext.Capabilities.Add = nil
		normal[mode] = d
	}
	if !reflect.DeepEqual(normal["ebpf"], normal["iptables"]) {
		t.Errorf("the overlays' DaemonSets differ in more than mode, capabilities and mounts:\nebpf:     %+v\niptables: %+v",
			normal["ebpf"].Spec.Template.Spec, normal["iptables"].Spec.Template.Spec)
	}
}

// checkABOverlay checks overlays/ab: the API server accepts it; it renders
// the ebpf overlay's objects once, with its DaemonSet renamed, plus the
// iptables overlay's DaemonSet renamed; each DaemonSet is its overlay's
// but for the name, a selector and pod label of its own, and a required
// node affinity on the desired-mode label that gives every node exactly
// one of them (unlabelled nodes ebpf); both read the one API server
// ConfigMap.
func checkABOverlay(t *testing.T, c *localcluster.Cluster, ctx context.Context, rendered map[string][]string, single map[string]*appsv1.DaemonSet) {
	t.Helper()
	out, err := c.Kubectl(ctx, "kustomize", filepath.Join(manifestsDir, "overlays", "ab"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := c.KubectlCommand(ctx, c.AdminKubeconfig, "apply", "--dry-run=server", "-f", "-")
	cmd.Stdin = strings.NewReader(out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("overlay ab rejected by the API server: %v\n%s", err, b)
	}
	docs := strings.Split(out, "\n---\n")
	if len(docs) != len(rendered["ebpf"])+1 {
		t.Fatalf("overlay ab renders %d objects, want overlay ebpf's %d and one DaemonSet", len(docs), len(rendered["ebpf"]))
	}
	cm := apiServerConfigMapName(t, rendered["ebpf"])
	var nonDS []string
	got := map[string]*appsv1.DaemonSet{}
	for _, doc := range docs {
		if !strings.Contains(doc, "kind: DaemonSet") {
			nonDS = append(nonDS, doc)
			continue
		}
		ds := daemonSetIn(t, doc)
		got[ds.Name] = ds
	}
	var want []string
	for _, doc := range rendered["ebpf"] {
		if !strings.Contains(doc, "kind: DaemonSet") {
			want = append(want, doc)
		}
	}
	if !slices.Equal(nonDS, want) {
		t.Errorf("overlay ab's objects besides the DaemonSets differ from overlay ebpf's:\n%s", strings.Join(nonDS, "\n---\n"))
	}
	node := func(l map[string]string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n", Labels: l}}
	}
	for mode, name := range localcluster.ABDaemonSets {
		ds := got[name]
		if ds == nil {
			t.Errorf("overlay ab has no DaemonSet %s among %v", name, slices.Sorted(maps.Keys(got)))
			continue
		}
		if ds.Spec.Selector.MatchLabels["kube-bpf-proxy.io/mode"] != mode || ds.Spec.Template.Labels["kube-bpf-proxy.io/mode"] != mode ||
			ds.Spec.Template.Labels["k8s-app"] != "kube-bpf-proxy" {
			t.Errorf("DaemonSet %s: selector %v, pod labels %v; want kube-bpf-proxy.io/mode=%s in both, and k8s-app for the PodMonitor",
				name, ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels, mode)
		}
		if ref := ds.Spec.Template.Spec.Containers[0].EnvFrom[0].ConfigMapRef.Name; ref != cm {
			t.Errorf("DaemonSet %s reads ConfigMap %s, want the one rendered, %s", name, ref, cm)
		}
		for _, n := range []struct {
			desired, runs string // "": no desired-mode label
		}{{"", "ebpf"}, {"ebpf", "ebpf"}, {"iptables", "iptables"}} {
			l := map[string]string{"kubernetes.io/os": "linux"}
			if n.desired != "" {
				l[localcluster.DesiredModeLabel] = n.desired
			}
			ok, err := localcluster.NodeMatches(&ds.Spec.Template.Spec, node(l))
			if err != nil || ok != (mode == n.runs) {
				t.Errorf("DaemonSet %s on a node labelled %v: runs %v (err %v), want %v", name, l, ok, err, mode == n.runs)
			}
		}
		// The rest is the single overlay's DaemonSet.
		norm := ds.DeepCopy()
		norm.Name = single[mode].Name
		norm.Spec.Selector = single[mode].Spec.Selector
		norm.Spec.Template.Labels = single[mode].Spec.Template.Labels
		norm.Spec.Template.Spec.Affinity = nil
		if !reflect.DeepEqual(norm, single[mode]) {
			t.Errorf("DaemonSet %s differs from overlay %s's in more than its name, selector, pod labels and node affinity", name, mode)
		}
	}
}
