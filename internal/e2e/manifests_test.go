package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/yaml"
)

// TestManifests renders each overlay with kubectl kustomize, has the real
// API server validate it (--dry-run=server, with admission), checks the
// DaemonSet is what the README promises, and checks the RBAC as the
// ServiceAccount itself, with a token of its own.
func TestManifests(t *testing.T) {
	c := newCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	rendered := map[string]string{}
	for _, mode := range []string{"ebpf", "iptables"} {
		out, err := c.Kubectl(ctx, "kustomize", filepath.Join(repoRoot, "manifests/overlays", mode))
		if err != nil {
			t.Fatal(err)
		}
		rendered[mode] = out
		cmd := c.KubectlCommand(ctx, c.AdminKubeconfig, "apply", "--dry-run=server", "-f", "-")
		cmd.Stdin = strings.NewReader(out)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("overlay %s rejected by the API server: %v\n%s", mode, err, b)
		} else if !strings.Contains(string(b), "daemonset.apps/kube-bpf-proxy created (server dry run)") {
			t.Fatalf("overlay %s: unexpected dry run output:\n%s", mode, b)
		}
		ds := daemonSetIn(t, out)
		args := ds.Spec.Template.Spec.Containers[0].Args
		if args[0] != "--mode="+mode {
			t.Errorf("overlay %s: first argument %q, want --mode=%s", mode, args[0], mode)
		}
		checkDaemonSet(t, mode, ds)
	}
	if strings.ReplaceAll(rendered["ebpf"], "--mode=ebpf", "--mode=iptables") != rendered["iptables"] {
		t.Errorf("the overlays differ in more than --mode")
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
		{"patch", "nodes", false},
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
	if p := ctr.LivenessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" || p.HTTPGet.Port.IntValue() != 10256 {
		fail("without a liveness probe on :10256/healthz")
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
	for _, a := range []string{"--cgroup-path=/host/sys/fs/cgroup", "--bpffs-path=/sys/fs/bpf/kube-bpf-proxy"} {
		if !strings.Contains(strings.Join(ctr.Args, " "), a) {
			fail("without " + a)
		}
	}
}
