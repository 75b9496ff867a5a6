package localcluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// What a user does to install the proxy, and what a kubelet does to run its
// DaemonSet's pod on a node, done here for the simulated nodes: there is no
// kubelet, so the binary runs as a process given everything the pod would
// get, taken from the DaemonSet as the API server holds it.

// APIServerConfigMap is the manifests' ConfigMap of the API server's
// address; a user's overlay merges the address into it.
const APIServerConfigMap = "kube-bpf-proxy-apiserver"

// proxyContainer is the DaemonSet's container that runs the proxy.
const proxyContainer = "kube-bpf-proxy"

// imagePath is the image's PATH (Debian's default, which the Dockerfile's
// base image sets).
const imagePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Overlay returns the kustomization.yaml a user writes to install the proxy
// in mode on this cluster (docs/install.md, "Pointing the proxy at the API
// server"):
// manifests' overlay (base is that overlay's path relative to the file's
// directory) with the API server's address merged into the manifests'
// ConfigMap, and, for the iptables mode, the pods' range. mode is an
// overlay's name: ebpf, iptables or ab (both, see ABDaemonSets).
func (c *Cluster) Overlay(base, mode string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# kube-bpf-proxy (overlay %s) for the local cluster %s: the project's overlay,
# pointed at this cluster's API server.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- %s
configMapGenerator:
- name: %s
  behavior: merge
  literals:
  - KUBERNETES_SERVICE_HOST=%s
  - KUBERNETES_SERVICE_PORT=%s
`, mode, c.Name, base, APIServerConfigMap, c.Nodes[0].IP, apiServerPort)
	// The iptables mode's DaemonSet: overlays/ab renames it.
	if ds := map[string]string{"iptables": "kube-bpf-proxy", "ab": ABDaemonSets["iptables"]}[mode]; ds != "" && c.ProxyClusterCIDR() != "" {
		fmt.Fprintf(&b, `patches:
- target:
    kind: DaemonSet
    name: %s
  patch: |-
    - op: add
      path: /spec/template/spec/containers/0/args/-
      value: --cluster-cidr=%s
`, ds, c.ProxyClusterCIDR())
	}
	return b.String()
}

// ProxyClusterCIDR is the --cluster-cidr Overlay gives the iptables mode:
// the cluster CIDR of each family, the primary first (that mode serves
// both families).
func (c *Cluster) ProxyClusterCIDR() string {
	return strings.Join(c.Stack.ClusterCIDRs(), ",")
}

// ApplyOverlay writes Overlay for manifestsDir/overlays/mode into the
// cluster directory and applies it with kubectl, as a user installs the
// proxy. It returns the overlay's directory.
func (c *Cluster) ApplyOverlay(ctx context.Context, manifestsDir, mode string) (string, error) {
	dir := filepath.Join(c.Dir, "overlays", mode)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	abs, err := filepath.Abs(filepath.Join(manifestsDir, "overlays", mode))
	if err != nil {
		return "", err
	}
	// kustomize takes no absolute path to a base.
	base, err := filepath.Rel(dir, abs)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(c.Overlay(base, mode)), 0o644); err != nil {
		return "", err
	}
	if _, err := c.Kubectl(ctx, "apply", "-k", dir); err != nil {
		return "", fmt.Errorf("applying %s: %w", dir, err)
	}
	return dir, nil
}

// DaemonSetProxyOptions returns options that run binary as a pod of the
// kube-bpf-proxy DaemonSet the API server holds (ApplyOverlay applies it).
func (c *Cluster) DaemonSetProxyOptions(ctx context.Context, binary string) (ProxyOptions, error) {
	ds, err := c.Client.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-bpf-proxy", metav1.GetOptions{})
	if err != nil {
		return ProxyOptions{}, fmt.Errorf("reading the kube-bpf-proxy DaemonSet (apply an overlay first): %w", err)
	}
	return ProxyOptions{Binary: binary, DaemonSet: ds}, nil
}

// container returns the DaemonSet's proxy container: the one named as
// ours, or the only one (kubeadm's kube-proxy DaemonSet names it
// kube-proxy).
func container(ds *appsv1.DaemonSet) (*corev1.Container, error) {
	if ctrs := ds.Spec.Template.Spec.Containers; len(ctrs) == 1 {
		return &ctrs[0], nil
	}
	for i, ctr := range ds.Spec.Template.Spec.Containers {
		if ctr.Name == proxyContainer {
			return &ds.Spec.Template.Spec.Containers[i], nil
		}
	}
	return nil, fmt.Errorf("DaemonSet %s/%s has no container %q", ds.Namespace, ds.Name, proxyContainer)
}

// Mode returns the datapath mode the options' DaemonSet runs.
func (o ProxyOptions) Mode() string {
	ctr, err := container(o.DaemonSet)
	if err != nil {
		return ""
	}
	mode := "ebpf" // the binary's default
	for _, a := range ctr.Args {
		if m, ok := strings.CutPrefix(a, "--mode="); ok {
			mode = m
		}
	}
	return mode
}

// podRef is a pod whose container the kubelet is about to start: the
// workload's pod template, the pod's name and its node.
type podRef struct {
	namespace, name string
	spec            *corev1.PodSpec
	ctr             *corev1.Container
	node            NodeInfo
}

// daemonSetPod is the DaemonSet's pod on node n, named as the proxy's.
func daemonSetPod(ds *appsv1.DaemonSet, ctr *corev1.Container, n NodeInfo) podRef {
	return podRef{namespace: ds.Namespace, name: proxyName(n.Name), spec: &ds.Spec.Template.Spec, ctr: ctr, node: n}
}

// podEnv is what the kubelet computes for the container: its envFrom, its
// env (downward API and ConfigMap references resolved), the service links,
// and the image's and runtime's few variables. kubelet's
// makeEnvironmentVariables is the model: envFrom first, env over it, and a
// service link only where the container declares no variable of that name.
func (c *Cluster) podEnv(ctx context.Context, pr podRef) ([]string, error) {
	ns, spec, ctr, n := pr.namespace, pr.spec, pr.ctr, pr.node
	services, err := c.serviceLinkServices(ctx, ns, spec.EnableServiceLinks == nil || *spec.EnableServiceLinks)
	if err != nil {
		return nil, err
	}
	links := serviceLinks(services)
	configMaps := map[string]*corev1.ConfigMap{}
	configMap := func(name string, optional *bool) (*corev1.ConfigMap, error) {
		if cm, ok := configMaps[name]; ok {
			return cm, nil
		}
		cm, err := c.Client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			if optional != nil && *optional {
				return nil, nil
			}
			// The kubelet does not start the container: CreateContainerConfigError.
			return nil, fmt.Errorf("ConfigMap %s/%s of the container's environment: %w", ns, name, err)
		}
		configMaps[name] = cm
		return cm, nil
	}
	declared := map[string]string{}
	for _, from := range ctr.EnvFrom {
		if from.ConfigMapRef == nil {
			return nil, fmt.Errorf("envFrom %+v: only ConfigMap references are simulated", from)
		}
		cm, err := configMap(from.ConfigMapRef.Name, from.ConfigMapRef.Optional)
		if err != nil {
			return nil, err
		}
		if cm == nil {
			continue
		}
		for k, v := range cm.Data {
			declared[from.Prefix+k] = v
		}
	}
	for _, e := range ctr.Env {
		switch {
		case e.ValueFrom == nil:
			declared[e.Name] = expand(e.Value, declared, links)
		case e.ValueFrom.FieldRef != nil:
			v, err := fieldValue(e.ValueFrom.FieldRef.FieldPath, pr)
			if err != nil {
				return nil, fmt.Errorf("env %s: %w", e.Name, err)
			}
			declared[e.Name] = v
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			cm, err := configMap(ref.Name, ref.Optional)
			if err != nil {
				return nil, err
			}
			v, ok := "", false
			if cm != nil {
				v, ok = cm.Data[ref.Key]
			}
			if !ok {
				if ref.Optional != nil && *ref.Optional {
					continue
				}
				return nil, fmt.Errorf("env %s: no key %s in ConfigMap %s/%s", e.Name, ref.Key, ns, ref.Name)
			}
			declared[e.Name] = v
		default:
			return nil, fmt.Errorf("env %s: only values, fieldRef and configMapKeyRef are simulated", e.Name)
		}
	}
	// The image's PATH and HOME, and the runtime's HOSTNAME (the node's,
	// with hostNetwork, else the pod's), under what the pod declares.
	hostname := pr.name
	if spec.HostNetwork {
		hostname = n.Name
	}
	all := map[string]string{"PATH": imagePath, "HOME": "/root", "HOSTNAME": hostname}
	for k, v := range links {
		all[k] = v
	}
	for k, v := range declared {
		all[k] = v
	}
	env := make([]string, 0, len(all))
	for k, v := range all {
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	return env, nil
}

// serviceLinkServices lists the Services the kubelet makes link variables
// of: default/kubernetes always, and the pod's namespace's own when
// enableServiceLinks is on (the default).
func (c *Cluster) serviceLinkServices(ctx context.Context, ns string, enableServiceLinks bool) ([]corev1.Service, error) {
	kubernetes, err := c.Client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading Service default/kubernetes: %w", err)
	}
	services := []corev1.Service{*kubernetes}
	if enableServiceLinks && ns != "default" {
		list, err := c.Client.CoreV1().Services(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		services = append(services, list.Items...)
	}
	return services, nil
}

// serviceLinks returns the variables the kubelet derives from Services
// (pkg/kubelet/envvars): NAME_SERVICE_HOST and _PORT, one _PORT_<NAME> per
// named port, and Docker's link variables.
func serviceLinks(services []corev1.Service) map[string]string {
	env := map[string]string{}
	for _, svc := range services {
		ip := svc.Spec.ClusterIP
		if ip == "" || ip == corev1.ClusterIPNone || len(svc.Spec.Ports) == 0 {
			continue
		}
		prefix := strings.ToUpper(strings.ReplaceAll(svc.Name, "-", "_"))
		env[prefix+"_SERVICE_HOST"] = ip
		env[prefix+"_SERVICE_PORT"] = strconv.Itoa(int(svc.Spec.Ports[0].Port))
		for i, p := range svc.Spec.Ports {
			port := strconv.Itoa(int(p.Port))
			if p.Name != "" {
				env[prefix+"_SERVICE_PORT_"+strings.ToUpper(strings.ReplaceAll(p.Name, "-", "_"))] = port
			}
			proto := string(p.Protocol)
			if proto == "" {
				proto = string(corev1.ProtocolTCP)
			}
			url := strings.ToLower(proto) + "://" + net.JoinHostPort(ip, port)
			if i == 0 {
				env[prefix+"_PORT"] = url
			}
			pp := prefix + "_PORT_" + port + "_" + strings.ToUpper(proto)
			env[pp] = url
			env[pp+"_PROTO"] = strings.ToLower(proto)
			env[pp+"_PORT"] = port
			env[pp+"_ADDR"] = ip
		}
	}
	return env
}

// fieldValue resolves a downward-API field of the pod.
func fieldValue(path string, pr podRef) (string, error) {
	switch path {
	case "spec.nodeName":
		return pr.node.Name, nil
	case "metadata.namespace":
		return pr.namespace, nil
	case "metadata.name":
		return pr.name, nil
	case "spec.serviceAccountName":
		return serviceAccountName(pr.spec), nil
	case "status.hostIP":
		return pr.node.IP, nil
	case "status.podIP":
		if pr.spec.HostNetwork { // the pod has the node's address
			return pr.node.IP, nil
		}
	}
	return "", fmt.Errorf("field %s is not simulated", path)
}

func serviceAccountName(spec *corev1.PodSpec) string {
	if spec.ServiceAccountName == "" {
		return "default"
	}
	return spec.ServiceAccountName
}

// expand replaces $(NAME) with the variable's value, as the kubelet does in
// env values and args: the container's own variables first, then the
// service links; $$ is a literal $, and an unknown reference stays as it is.
func expand(s string, vars ...map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch next := s[i+1]; {
		case next == '$':
			b.WriteByte('$')
			i++
		case next == '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			value, found := "", false
			for _, m := range vars {
				if v, ok := m[name]; ok {
					value, found = v, true
					break
				}
			}
			if found {
				b.WriteString(value)
			} else {
				b.WriteString(s[i : i+3+end])
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

// envMap turns KEY=VALUE lines into a map.
func envMap(env []string) map[string]string {
	m := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

// serviceAccountVolume writes what the kubelet projects into
// /var/run/secrets/kubernetes.io/serviceaccount into dir: a TokenRequest
// token of the pod's ServiceAccount, the cluster's CA from the namespace's
// kube-root-ca.crt ConfigMap, and the namespace.
func (c *Cluster) serviceAccountVolume(ctx context.Context, pr podRef, dir string, ttl time.Duration) error {
	ns, sa := pr.namespace, serviceAccountName(pr.spec)
	token, err := c.requestToken(ctx, ns, sa, ttl)
	if err != nil {
		return err
	}
	rootCA, err := c.Client.CoreV1().ConfigMaps(ns).Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading ConfigMap %s/kube-root-ca.crt: %w", ns, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for name, content := range map[string]string{"token": token, "ca.crt": rootCA.Data["ca.crt"], "namespace": ns} {
		// Written whole and renamed, as the kubelet's atomic writer does:
		// a running process re-reads the token.
		tmp := filepath.Join(dir, "."+name+".tmp")
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	return nil
}

// mount is one bind mount of the container's private mount namespace.
type mount struct {
	source, target string
	readOnly       bool
	// hostToContainer: mounts made later on the node show inside.
	hostToContainer bool
	// createTarget: a target missing on this machine is made in an
	// overlay of its nearest existing parent (podMounts).
	createTarget bool
}

// nodePath maps a hostPath on a real node onto the simulated node: its
// cgroup2 root, its bpffs, its /run/netns (its own pods' namespaces) and
// its /run/xtables.lock are the node's own; everything else is the
// machine's (its kernel modules). The manifests keep mounting
// /run/xtables.lock, which on a real node is that node's lock, shared with
// its kubelet and CNI plugins; here the simulated nodes share one machine,
// and one lock file would make one node's restore hold every other node's
// off, as upstream kube-proxy's would (xtablesLockEnv).
func (n NodeInfo) nodePath(p string) string {
	if p == xtablesLockPath && n.XtablesLock != "" {
		return n.XtablesLock
	}
	for root, node := range map[string]string{"/sys/fs/cgroup": n.Cgroup, "/sys/fs/bpf": n.BPFFS, "/run/netns": n.NetNSDir} {
		if rest, ok := strings.CutPrefix(p, root); ok && (rest == "" || rest[0] == '/') {
			return node + rest
		}
	}
	return p
}

// podMounts returns the container's hostPath mounts for node n as binds of
// the private mount namespace, and how args must change for the mount
// points that cannot be made there: a target that does not exist on this
// machine outside /run (the DaemonSet's /host/sys/fs/cgroup) would have to
// be created in the machine's own file system, so the args name the node's
// path instead.
//
// configMaps holds the directories configMapVolumes wrote, by volume name:
// they are mounted read-only, as the kubelet mounts them, and a target
// missing on this machine (kubeadm's /var/lib/kube-proxy) is made in an
// overlay of its nearest existing parent, private to the container's mount
// namespace: files the proxy reads name their paths there (the config
// file's kubeconfig), so no argument rewrite would do.
func podMounts(pr podRef, configMaps map[string]string) (mounts []mount, rewrite map[string]string, err error) {
	return podMountsIn(pr, configMaps, false)
}

// podMountsIn is podMounts; inImage says the container runs in an image's
// root filesystem (Cluster.Image), where every mount point can be made, so
// nothing is rewritten.
func podMountsIn(pr podRef, configMaps map[string]string, inImage bool) (mounts []mount, rewrite map[string]string, err error) {
	ctr, n := pr.ctr, pr.node
	volumes := map[string]corev1.Volume{}
	for _, v := range pr.spec.Volumes {
		volumes[v.Name] = v
	}
	rewrite = map[string]string{}
	for _, vm := range ctr.VolumeMounts {
		v, ok := volumes[vm.Name]
		if dir, isConfigMap := configMaps[vm.Name]; ok && isConfigMap {
			mounts = append(mounts, mount{source: dir, target: vm.MountPath, readOnly: true, createTarget: true})
			continue
		}
		if !ok || v.HostPath == nil {
			return nil, nil, fmt.Errorf("volume %q: only hostPath and configMap volumes are simulated", vm.Name)
		}
		m := mount{
			source:          n.nodePath(v.HostPath.Path),
			target:          vm.MountPath,
			readOnly:        vm.ReadOnly,
			hostToContainer: vm.MountPropagation != nil && *vm.MountPropagation == corev1.MountPropagationHostToContainer,
		}
		if _, err := os.Stat(m.source); os.IsNotExist(err) {
			if inImage && !orCreate(v.HostPath.Type) {
				// Missing on this machine (/lib/modules in a VM
				// without modules): the proxy sees nothing there.
				continue
			}
			if _, terr := os.Stat(m.target); !inImage && os.IsNotExist(terr) && !underRun(m.target) {
				// Missing on this machine at both ends (/lib/modules in
				// a container): the proxy sees the same nothing there.
				continue
			}
			if err := createHostPath(m.source, v.HostPath.Type); err != nil {
				return nil, nil, fmt.Errorf("volume %q: %w", vm.Name, err)
			}
		} else if err != nil {
			return nil, nil, fmt.Errorf("volume %q: %w", vm.Name, err)
		}
		if !inImage && !underRun(m.target) {
			if _, err := os.Stat(m.target); err != nil {
				rewrite[m.target] = m.source
				continue
			}
		}
		mounts = append(mounts, m)
	}
	return mounts, rewrite, nil
}

// createHostPath creates a missing hostPath as the kubelet does for the
// *OrCreate types (iptables and iproute2 create /run/xtables.lock and
// /run/netns in the same way); other types fail, as the pod would.
func createHostPath(path string, t *corev1.HostPathType) error {
	switch {
	case t != nil && *t == corev1.HostPathDirectoryOrCreate:
		return os.MkdirAll(path, 0o755)
	case t != nil && *t == corev1.HostPathFileOrCreate:
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o644)
		if err != nil {
			return err
		}
		return f.Close()
	}
	return fmt.Errorf("hostPath %s does not exist", path)
}

func orCreate(t *corev1.HostPathType) bool {
	return t != nil && (*t == corev1.HostPathDirectoryOrCreate || *t == corev1.HostPathFileOrCreate)
}

func underRun(p string) bool { return p == "/run" || strings.HasPrefix(p, "/run/") }

// rewriteArgs points arguments that name a path under a mount point in
// rewrite ("--cgroup-path=/host/sys/fs/cgroup") at the node's path instead.
func rewriteArgs(args []string, rewrite map[string]string) []string {
	out := slices.Clone(args)
	for i, a := range out {
		flag, value, isFlag := strings.Cut(a, "=")
		if !isFlag {
			flag, value = "", a
		}
		for target, source := range rewrite {
			if rest, ok := strings.CutPrefix(value, target); ok && (rest == "" || rest[0] == '/') {
				value = source + rest
				if isFlag {
					out[i] = flag + "=" + value
				} else {
					out[i] = value
				}
				break
			}
		}
	}
	return out
}

// serviceAccountMount is where the kubelet mounts the ServiceAccount volume.
// The machine's /var/run is a link to /run, which the proxy's mount
// namespace replaces.
const serviceAccountMount = "/run/secrets/kubernetes.io/serviceaccount"

// mountScript is the shell program that assembles the proxy's private
// mount namespace and then execs its arguments: a tmpfs is made at staging
// (a directory of the cluster's), given the ServiceAccount volume (if
// saDir is set) and the mounts under /run, and moved over /run; the other
// mounts are bound over their targets. It runs in a namespace `unshare
// --mount --propagation slave` made, so nothing reaches the machine's own
// mounts, while mounts the machine makes later reach the slave copies
// (HostToContainer).
func mountScript(staging, saDir string, mounts []mount) string {
	q := shellQuote
	lines := []string{
		"set -e",
		// -n: the machine's /run/mount/utab is none of this namespace's
		// business (and is gone once /run is replaced).
		"mount -n -t tmpfs -o mode=0755 tmpfs " + q(staging),
	}
	bind := func(source, target string, m mount) {
		lines = append(lines, "mount -n --rbind "+q(source)+" "+q(target))
		if m.readOnly {
			lines = append(lines, "mount -n -o remount,bind,ro "+q(target))
		}
		if m.hostToContainer {
			lines = append(lines, "mount -n --make-rslave "+q(target))
		}
	}
	if saDir != "" {
		target := filepath.Join(staging, strings.TrimPrefix(serviceAccountMount, "/run/"))
		lines = append(lines, "mkdir -p "+q(target))
		bind(saDir, target, mount{readOnly: true})
	}
	overlays := 0
	for _, m := range mounts {
		target := m.target
		if _, err := os.Stat(target); m.createTarget && err != nil && !underRun(target) {
			// The overlay's upper and work directories live on the
			// staging tmpfs, under a name /run never shows.
			parent := filepath.Dir(target)
			for {
				if _, err := os.Stat(parent); err == nil {
					break
				}
				parent = filepath.Dir(parent)
			}
			layer := filepath.Join(staging, fmt.Sprintf(".overlay-%d", overlays))
			overlays++
			lines = append(lines,
				"mkdir -p "+q(layer+"/upper")+" "+q(layer+"/work"),
				"mount -n -t overlay overlay -o "+q("lowerdir="+parent+",upperdir="+layer+"/upper,workdir="+layer+"/work")+" "+q(parent),
				"mkdir -p "+q(target))
		}
		if underRun(target) {
			target = filepath.Join(staging, strings.TrimPrefix(strings.TrimPrefix(target, "/run"), "/"))
			if st, err := os.Stat(m.source); err == nil && !st.IsDir() {
				lines = append(lines, "mkdir -p "+q(filepath.Dir(target)), "touch "+q(target))
			} else {
				lines = append(lines, "mkdir -p "+q(target))
			}
		}
		bind(m.source, target, m)
	}
	lines = append(lines, "mount -n --move "+q(staging)+" /run",
		// A container starts in / with no PWD of the shell's.
		`cd /`, `exec env -u PWD -u OLDPWD "$@"`)
	return strings.Join(lines, "\n")
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// capabilityPrefix runs what follows with only the container's
// capabilities, as a runtime does for root with "drop: [ALL], add: [...]":
// the bounding set is exactly the added ones, and allowPrivilegeEscalation:
// false sets no_new_privs; a runAsUser other than root runs it as that user
// (and runAsGroup, by default the user's id: the image has no passwd entry
// to take a group from), with no supplementary groups.
func capabilityPrefix(ctr *corev1.Container) []string {
	sc := ctr.SecurityContext
	if sc == nil || (sc.Privileged != nil && *sc.Privileged) {
		return nil
	}
	var prefix []string
	if sc.Capabilities != nil && slices.Contains(sc.Capabilities.Drop, "ALL") {
		set := "-all"
		for _, c := range sc.Capabilities.Add {
			set += ",+" + strings.ToLower(strings.TrimPrefix(string(c), "CAP_"))
		}
		prefix = append(prefix, "--bounding-set="+set, "--inh-caps=-all")
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		prefix = append(prefix, "--no-new-privs")
	}
	if uid, gid, ok := runAs(ctr); ok {
		prefix = append(prefix, fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", gid), "--clear-groups")
	}
	if len(prefix) == 0 {
		return nil
	}
	return append(append([]string{"setpriv"}, prefix...), "--")
}

// runAs returns the user and group a container's securityContext runs it
// as, when that is not root. Only the container's own securityContext is
// read: the pod-level one is not simulated.
func runAs(ctr *corev1.Container) (uid, gid int64, ok bool) {
	sc := ctr.SecurityContext
	if sc == nil || sc.RunAsUser == nil || *sc.RunAsUser == 0 {
		return 0, 0, false
	}
	uid, gid = *sc.RunAsUser, *sc.RunAsUser
	if sc.RunAsGroup != nil {
		gid = *sc.RunAsGroup
	}
	return uid, gid, true
}
