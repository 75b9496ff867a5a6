// Command cluster drives the local cluster of test/utils/localcluster: a real
// kube-apiserver, etcd and kube-controller-manager with two simulated nodes
// in network namespaces of their own (hack/cluster.sh builds and runs it).
//
//	cluster up [--stack ipv4|dual-stack|ipv6]   start it (IPv4 unless --stack says otherwise); print
//	                                             the kubeconfig
//	cluster down                                 remove everything it made
//	cluster add-pod NAME --node N [--labels k=v,..] [--namespace NS]
//	                                             a pod serving its name on tcp:80, tcp:8080, udp:5353
//	                                             (and over IPv6 too on a dual-stack or IPv6 cluster)
//	cluster ready NAME true|false [--namespace NS]
//	cluster delete-pod NAME [--namespace NS] [--drain 2s]
//	cluster exec POD [--namespace NS] -- CMD...  a client command in the pod (in its node's cgroup)
//	cluster kubectl ARGS...                      kubectl as admin, in the API server's namespace
//	cluster prometheus                           start Prometheus in node1's namespace (on 127.0.0.1:9090
//	                                             there), scraping both proxies as job kube-proxy
//	cluster forward [--listen 127.0.0.1:9090] [--to 127.0.0.1:9090] [--node node1]
//	                                             forward connections to --listen on this machine's loopback
//	                                             to --to inside the node's namespace, until interrupted
//	cluster proxy start|sync|stop|cleanup --node N [--mode ebpf|iptables]
//	                                             start applies an overlay of manifests/overlays/MODE that
//	                                             sets the API server's address (in DIR/overlays/MODE), then
//	                                             runs the proxy as that DaemonSet's pod on node N; sync runs
//	                                             the pod of the DaemonSet the Node's labels select (overlays/ab:
//	                                             label kube-bpf-proxy.io/desired-mode), swapping the running one
//
// --dir DIR, before the command, picks the cluster directory (default
// $KBP_CLUSTER_DIR, then _output/cluster).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func main() {
	testnet.RunHelperIfRequested(nil)
	args := os.Args[1:]
	dir := os.Getenv("KBP_CLUSTER_DIR")
	if dir == "" {
		dir = "_output/cluster"
	}
	if len(args) > 0 && strings.HasPrefix(args[0], "--dir=") {
		dir, args = strings.TrimPrefix(args[0], "--dir="), args[1:]
	} else if len(args) > 1 && args[0] == "--dir" {
		dir, args = args[1], args[2:]
	}
	if len(args) < 1 {
		fmt.Fprintln(os.Stderr, "usage: cluster up|down|add-pod|ready|delete-pod|exec|kubectl|prometheus|forward|proxy ... (see hack/cluster/main.go)")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := runCommand(ctx, dir, args[0], args[1:]); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			os.Exit(exit.ExitCode())
		}
		fmt.Fprintln(os.Stderr, "cluster:", err)
		os.Exit(1)
	}
}

func runCommand(ctx context.Context, dirFlag, name string, args []string) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	dir := &dirFlag
	kubeBin := fs.String("kube-bin", os.Getenv("KUBE_BIN"), "directory of kube-apiserver, kube-controller-manager and kubectl (hack/kube-build.sh)")
	node := fs.String("node", "node1", "node")
	namespace := fs.String("namespace", "default", "Kubernetes namespace")
	labels := fs.String("labels", "", "pod labels, k=v,k=v")
	drain := fs.Duration("drain", 2*time.Second, "how long a deleted pod keeps serving")
	mode := fs.String("mode", "ebpf", "proxy mode")
	binary := fs.String("binary", "_output/kube-bpf-proxy", "kube-bpf-proxy binary")
	listen := fs.String("listen", "127.0.0.1:9090", "forward: address to listen on, in this machine's network namespace")
	to := fs.String("to", localcluster.PrometheusAddr, "forward: address to connect to, inside the node's namespace")
	stack := fs.String("stack", "ipv4", "up: the cluster's IP families: ipv4, dual-stack or ipv6")
	// kubectl and exec pass everything on.
	if name == "kubectl" {
		c, err := localcluster.Open(*dir)
		if err != nil {
			return err
		}
		cmd := c.KubectlCommand(ctx, c.AdminKubeconfig, args...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		return cmd.Run()
	}
	var rest []string
	if i := indexOf(args, "--"); i >= 0 {
		args, rest = args[:i], args[i+1:]
	}
	if err := fs.Parse(reorder(args)); err != nil {
		return err
	}
	pos := fs.Args()

	if name == "up" {
		st, err := localcluster.ParseStack(*stack)
		if err != nil {
			return err
		}
		c, err := localcluster.Up(ctx, localcluster.Options{Dir: *dir, KubeBin: *kubeBin, Stack: st,
			Progress: func(f string, a ...any) { fmt.Printf("==> "+f+"\n", a...) }})
		if err != nil {
			return err
		}
		fmt.Printf("cluster %s is up.\n  kubeconfig: %s (the API server is at %s, inside network namespace %s)\n",
			c.Name, c.AdminKubeconfig, c.Server, c.Nodes[0].NetNS)
		fmt.Printf("  try:        hack/cluster.sh kubectl get nodes -o wide\n")
		return nil
	}
	if name == "down" {
		return localcluster.Down(*dir)
	}
	c, err := localcluster.Open(*dir)
	if err != nil {
		return err
	}
	need := func(n int) error {
		if len(pos) < n {
			return fmt.Errorf("%s: missing arguments", name)
		}
		return nil
	}
	switch name {
	case "add-pod":
		if err := need(1); err != nil {
			return err
		}
		p, err := c.AddPod(ctx, localcluster.PodSpec{
			Namespace: *namespace, Name: pos[0], Node: *node, Labels: parseLabels(*labels),
			Command:   c.Stack.ServeArgs(pos[0], "tcp:80", "tcp:8080", "udp:5353"),
			ReadyLine: "ready",
		})
		if err != nil {
			return err
		}
		fmt.Printf("pod %s/%s on %s at %s\n", p.Namespace, p.Name, p.Node, p.IP)
		return nil
	case "ready":
		if err := need(2); err != nil {
			return err
		}
		return c.SetPodReady(ctx, *namespace, pos[0], pos[1] == "true")
	case "delete-pod":
		if err := need(1); err != nil {
			return err
		}
		return c.DeletePod(ctx, *namespace, pos[0], *drain)
	case "exec":
		if err := need(1); err != nil {
			return err
		}
		p, err := c.Pod(*namespace, pos[0])
		if err != nil {
			return err
		}
		cmd, done, err := p.Command(ctx, rest...)
		if err != nil {
			return err
		}
		defer done()
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		return cmd.Run()
	case "prometheus":
		if err := c.StartPrometheus(ctx, localcluster.PrometheusOptions{
			RuleFiles: []string{"manifests/monitoring/prometheus/kube-bpf-proxy-rules.yaml"},
		}); err != nil {
			return err
		}
		fmt.Printf("Prometheus listens on %s in %s; from this machine: cluster forward --listen 127.0.0.1:9090\n",
			localcluster.PrometheusAddr, c.Nodes[0].NetNS)
		return nil
	case "forward":
		return c.Forward(ctx, *listen, *node, *to)
	case "proxy":
		if err := need(1); err != nil {
			return err
		}
		bin, err := filepath.Abs(*binary)
		if err != nil {
			return err
		}
		switch pos[0] {
		case "start":
			// As a user installs it: an overlay of the mode's with the
			// API server's address, applied; then the DaemonSet's pod.
			overlay, err := c.ApplyOverlay(ctx, "manifests", *mode)
			if err != nil {
				return err
			}
			fmt.Printf("applied %s\n", filepath.Join(overlay, "kustomization.yaml"))
			o, err := c.DaemonSetProxyOptions(ctx, bin)
			if err != nil {
				return err
			}
			return c.StartProxy(ctx, *node, o)
		case "sync":
			// As the DaemonSet controller and the kubelet do after the
			// Node's labels changed (overlays/ab's desired-mode label):
			// the pod of the DaemonSet that selects the node, swapped in
			// if another one runs there.
			ds, changed, err := c.SyncProxy(ctx, *node, bin)
			if err != nil {
				return err
			}
			fmt.Printf("%s runs %s (changed: %v)\n", *node, ds, changed)
			return nil
		case "stop":
			_, err := c.SignalProxy(*node, syscall.SIGTERM, 10*time.Second)
			return err
		case "cleanup":
			return c.CleanupProxy(ctx, *node, bin)
		}
		return fmt.Errorf("proxy %s: want start, sync, stop or cleanup", pos[0])
	}
	return fmt.Errorf("unknown command %q", name)
}

func parseLabels(s string) map[string]string {
	m := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

func indexOf(args []string, s string) int {
	for i, a := range args {
		if a == s {
			return i
		}
	}
	return -1
}

// reorder puts flags before positional arguments, so `add-pod web-1 --node
// node2` parses as users write it.
func reorder(args []string) []string {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case strings.HasPrefix(a, "-") && strings.Contains(a, "="):
			flags = append(flags, a)
		case strings.HasPrefix(a, "-") && i+1 < len(args):
			flags = append(flags, a, args[i+1])
			i++
		default:
			pos = append(pos, a)
		}
	}
	return append(flags, pos...)
}
