package localcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// PodSpec describes a pod to add.
type PodSpec struct {
	Namespace string
	Name      string
	Node      string
	Labels    map[string]string
	// Ports are the container's ports, for Services with named target
	// ports.
	Ports []corev1.ContainerPort
	// Command is the pod's process.
	Command []string
	// Env is the process's whole environment; nil inherits this one's.
	Env []string
	// ReadyLine, if set, is a line the process prints once it serves; the
	// pod becomes Ready only then.
	ReadyLine string
	// NotReady creates the pod Running but not Ready.
	NotReady bool
}

// Pod is a pod of the local cluster.
type Pod struct {
	Namespace string
	Name      string
	Node      string
	NetNS     string
	// IP is the pod's address of the cluster's primary family (its
	// status.podIP), IPs one per family (its status.podIPs; IPOf).
	IP     netip.Addr
	IPs    []netip.Addr
	cgroup string
}

func podKey(namespace, name string) string { return namespace + "/" + name }

// AddPod creates the pod's namespace and veth, starts its process in the
// node's cgroup, creates the Pod object bound to the node and writes its
// status (Running, its IP, Ready unless spec.NotReady) through the status
// subresource, as the node's kubelet would.
func (c *Cluster) AddPod(ctx context.Context, spec PodSpec) (*Pod, error) {
	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	var p *pod
	var node *NodeInfo
	err := withState(c.Dir, func(st *state) error {
		var err error
		if node, err = st.node(spec.Node); err != nil {
			return err
		}
		key := podKey(spec.Namespace, spec.Name)
		if st.Pods[key] != nil {
			return fmt.Errorf("pod %s exists", key)
		}
		host := node.NextHost
		node.NextHost++
		if host > 250 {
			return fmt.Errorf("node %s has no pod address left", node.Name)
		}
		p = &pod{
			Namespace: spec.Namespace, Name: spec.Name, Node: node.Name,
			NetNS:  fmt.Sprintf("%s-%s-%d", st.Name, node.Name, host),
			HostIf: fmt.Sprintf("pod%d", host),
		}
		// The same host part in each of the node's pod CIDRs.
		for _, cidr := range node.AllPodCIDRs() {
			p.IPs = append(p.IPs, podAddr(cidr, host))
		}
		p.IP = p.IPs[0]
		st.Pods[key] = p
		if err := addNetNS(st, p.NetNS); err != nil {
			return err
		}
		// The node's /run/netns, where its proxy finds its pods'
		// sockets, holds this pod's namespace, and no other node's.
		if err := bindNetNS(node, p.NetNS); err != nil {
			return err
		}
		if err := runAll(podLinkCommands(node.NetNS, p)...); err != nil {
			return err
		}
		if len(spec.Command) > 0 {
			p.Proc = &proc{
				NetNS: p.NetNS, Cgroup: node.Cgroup, Args: spec.Command, Env: spec.Env,
				Log: filepath.Join(c.Dir, "logs", fmt.Sprintf("pod-%s-%s.log", spec.Namespace, spec.Name)),
			}
			if err := p.Proc.start(); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil && spec.ReadyLine != "" && p.Proc != nil {
		err = p.Proc.waitForLine(spec.ReadyLine, 30*time.Second)
	}
	if err == nil {
		err = c.createPodObject(ctx, spec, p, node)
	}
	if err != nil && p != nil {
		// Leave no half-made pod behind: the name can be used again.
		if rerr := c.removePod(spec.Namespace, spec.Name); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("pod %s/%s: %w", spec.Namespace, spec.Name, err)
	}
	return c.podFrom(p, node), nil
}

// podLinkCommands link pod p to its node: a veth, the pod's addresses on
// its end, the node's gateway address on the other (IPv4: podGateway, as
// CNI plugins that route per pod do it; IPv6: the link-local podGateway6),
// a host route to each pod address on the node, a default route per family
// in the pod. IPv6 addresses are added with nodad: usable at once.
func podLinkCommands(nodeNS string, p *pod) [][]string {
	ips := p.IPs
	if len(ips) == 0 {
		ips = []string{p.IP}
	}
	cmds := [][]string{{"ip", "-n", nodeNS, "link", "add", p.HostIf, "type", "veth", "peer", "name", "eth0", "netns", p.NetNS}}
	for _, ip := range ips {
		if familyOf(ip) == model.IPv4 {
			cmds = append(cmds, []string{"ip", "-n", nodeNS, "addr", "add", podGateway + "/32", "dev", p.HostIf})
		} else {
			cmds = append(cmds, []string{"ip", "-n", nodeNS, "addr", "add", podGateway6 + "/64", "dev", p.HostIf, "nodad"})
		}
	}
	cmds = append(cmds, []string{"ip", "-n", nodeNS, "link", "set", p.HostIf, "up"})
	for _, ip := range ips {
		f := familyOf(ip)
		cmds = append(cmds, []string{"ip", "-n", nodeNS, "route", "add", ip + hostBits(f), "dev", p.HostIf})
	}
	for _, ip := range ips {
		f := familyOf(ip)
		cmds = append(cmds, addrAdd(p.NetNS, f, ip+hostBits(f), "eth0"))
	}
	cmds = append(cmds, []string{"ip", "-n", p.NetNS, "link", "set", "eth0", "up"})
	for _, ip := range ips {
		if familyOf(ip) == model.IPv4 {
			cmds = append(cmds,
				[]string{"ip", "-n", p.NetNS, "route", "add", podGateway, "dev", "eth0", "scope", "link"},
				[]string{"ip", "-n", p.NetNS, "route", "add", "default", "via", podGateway, "dev", "eth0"})
		} else {
			// A link-local gateway needs no route to it.
			cmds = append(cmds, []string{"ip", "-n", p.NetNS, "route", "add", "default", "via", podGateway6, "dev", "eth0"})
		}
	}
	return cmds
}

// removePod stops the pod's process and removes its namespace and record.
func (c *Cluster) removePod(namespace, name string) error {
	return withState(c.Dir, func(st *state) error {
		p := st.Pods[podKey(namespace, name)]
		if p == nil {
			return nil
		}
		if p.Proc != nil {
			if err := p.Proc.stop(10 * time.Second); err != nil {
				return err
			}
		}
		if node, err := st.node(p.Node); err == nil {
			if err := unbindNetNS(node, p.NetNS); err != nil {
				return err
			}
		}
		if _, err := os.Stat(netnsPath(p.NetNS)); err == nil {
			if err := run("ip", "netns", "del", p.NetNS); err != nil {
				return err
			}
		}
		st.Namespaces = slices.DeleteFunc(st.Namespaces, func(ns string) bool { return ns == p.NetNS })
		delete(st.Pods, podKey(namespace, name))
		return nil
	})
}

// bindNetNS pins a pod's network namespace in its node's /run/netns.
func bindNetNS(node *NodeInfo, netns string) error {
	target := filepath.Join(node.NetNSDir, netns)
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o444)
	if err != nil {
		return err
	}
	f.Close()
	if err := unix.Mount(netnsPath(netns), target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("pinning %s in %s: %w", netns, node.NetNSDir, err)
	}
	return nil
}

// unbindNetNS undoes bindNetNS; the namespace goes once iproute2's pin
// goes too.
func unbindNetNS(node *NodeInfo, netns string) error {
	target := filepath.Join(node.NetNSDir, netns)
	if err := unmountAll(target); err != nil {
		return err
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (c *Cluster) podFrom(p *pod, node *NodeInfo) *Pod {
	pp := &Pod{Namespace: p.Namespace, Name: p.Name, Node: p.Node, NetNS: p.NetNS,
		IP: netip.MustParseAddr(p.IP), cgroup: node.Cgroup}
	for _, ip := range p.IPs {
		pp.IPs = append(pp.IPs, netip.MustParseAddr(ip))
	}
	if len(pp.IPs) == 0 {
		pp.IPs = []netip.Addr{pp.IP}
	}
	return pp
}

func (c *Cluster) createPodObject(ctx context.Context, spec PodSpec, p *pod, node *NodeInfo) error {
	obj := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: spec.Name, Namespace: spec.Namespace, Labels: spec.Labels},
		Spec: corev1.PodSpec{
			NodeName:                      node.Name,
			AutomountServiceAccountToken:  ptr.To(false),
			TerminationGracePeriodSeconds: ptr.To[int64](30),
			Containers: []corev1.Container{{
				Name: "app", Image: "kube-bpf-proxy.local/netns-process", Ports: spec.Ports,
			}},
		},
	}
	var created *corev1.Pod
	// Pod admission needs the namespace's default ServiceAccount, which the
	// controller manager creates shortly after the namespace.
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		created, err = c.Client.CoreV1().Pods(spec.Namespace).Create(ctx, obj, metav1.CreateOptions{})
		if err == nil {
			break
		}
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "serviceaccount") || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
	now := metav1.Now()
	// One address per family, the primary first, as a kubelet reports a
	// dual-stack pod's: the EndpointSlice controller takes each Service
	// family's address from status.podIPs.
	var hostIPs []corev1.HostIP
	for _, ip := range node.AllIPs() {
		hostIPs = append(hostIPs, corev1.HostIP{IP: ip})
	}
	var podIPs []corev1.PodIP
	for _, ip := range p.IPs {
		podIPs = append(podIPs, corev1.PodIP{IP: ip})
	}
	if len(podIPs) == 0 {
		podIPs = []corev1.PodIP{{IP: p.IP}}
	}
	created.Status = corev1.PodStatus{
		Phase:     corev1.PodRunning,
		HostIP:    node.IP,
		HostIPs:   hostIPs,
		PodIP:     p.IP,
		PodIPs:    podIPs,
		StartTime: &now,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
		ContainerStatuses: []corev1.ContainerStatus{{
			Name: "app", Image: obj.Spec.Containers[0].Image, Started: ptr.To(true),
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		}},
	}
	setReady(&created.Status, !spec.NotReady, now)
	_, err := c.Client.CoreV1().Pods(spec.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{})
	return err
}

// setReady sets the Ready and ContainersReady conditions, moving their
// lastTransitionTime only when the status changes, as the kubelet does.
func setReady(s *corev1.PodStatus, ready bool, now metav1.Time) {
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	for _, t := range []corev1.PodConditionType{corev1.ContainersReady, corev1.PodReady} {
		found := false
		for i := range s.Conditions {
			if s.Conditions[i].Type == t {
				found = true
				if s.Conditions[i].Status != status {
					s.Conditions[i].Status, s.Conditions[i].LastTransitionTime = status, now
				}
			}
		}
		if !found {
			s.Conditions = append(s.Conditions, corev1.PodCondition{Type: t, Status: status, LastTransitionTime: now})
		}
	}
	for i := range s.ContainerStatuses {
		s.ContainerStatuses[i].Ready = ready
	}
}

// SetPodReady flips a pod's readiness through the status subresource, as
// the kubelet does when a readiness probe changes its mind. The process keeps
// running either way.
func (c *Cluster) SetPodReady(ctx context.Context, namespace, name string, ready bool) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		p, err := c.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		setReady(&p.Status, ready, metav1.Now())
		_, err = c.Client.CoreV1().Pods(namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		return err
	})
}

// DeletePod deletes a pod as the API and a kubelet together do: a graceful
// delete marks it terminating (its endpoint turns terminating in the
// slices); the process keeps serving for drain, as an application with a
// pre-stop delay does; then it gets SIGTERM, the object is removed and the
// namespace goes.
func (c *Cluster) DeletePod(ctx context.Context, namespace, name string, drain time.Duration) error {
	obj, err := c.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if err := c.Client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(drain):
	}
	if err := c.removePod(namespace, name); err != nil {
		return err
	}
	err = c.Client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      &metav1.Preconditions{UID: ptr.To(types.UID(obj.UID))},
	})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// Pod returns a pod added to the cluster.
func (c *Cluster) Pod(namespace, name string) (*Pod, error) {
	st, err := readState(c.Dir)
	if err != nil {
		return nil, err
	}
	p := st.Pods[podKey(namespace, name)]
	if p == nil {
		return nil, fmt.Errorf("no pod %s/%s", namespace, name)
	}
	node, err := st.node(p.Node)
	if err != nil {
		return nil, err
	}
	return c.podFrom(p, node), nil
}

// Command prepares a client command in the pod: its network namespace and
// its node's cgroup (so the node's socket programs see it, as they see
// every pod on a real node).
func (p *Pod) Command(ctx context.Context, args ...string) (*exec.Cmd, func(), error) {
	fd, err := unix.Open(p.cgroup, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("opening cgroup %s: %w", p.cgroup, err)
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath(p.NetNS), "--"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	cmd.WaitDelay = 5 * time.Second
	return cmd, func() { unix.Close(fd) }, nil
}

// Output runs a client command in the pod and returns its output; a failure
// carries stderr.
func (p *Pod) Output(ctx context.Context, args ...string) (string, error) {
	cmd, done, err := p.Command(ctx, args...)
	if err != nil {
		return "", err
	}
	defer done()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s in pod %s: %w: %s", strings.Join(args, " "), p.Name, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}
