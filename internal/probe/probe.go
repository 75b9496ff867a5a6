// Package probe is the node-to-node latency probe: `kube-bpf-proxy probe
// server` answers behind a Service, `kube-bpf-proxy probe client` (one per
// node) measures round trips through each of the Service's ClusterIPs (one
// per IP family: both of a dual-stack Service), each over a new connection
// so that each crosses the node's Service datapath, and exports them as
// Prometheus histograms labelled with the client's node, the server's node,
// the proxy mode of the client's node and the ClusterIP's family.
package probe

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"k8s.io/klog/v2"
)

const usageLine = "usage: kube-bpf-proxy probe server|client [flags]"

// Main runs `kube-bpf-proxy probe ARGS` until ctx ends: 0 on success, 1 on
// failure, 2 on a usage error. lookupEnv is os.LookupEnv outside tests.
func Main(ctx context.Context, args []string, stderr io.Writer, lookupEnv func(string) (string, bool)) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usageLine)
		return 2
	}
	role := args[0]
	fs := flag.NewFlagSet("kube-bpf-proxy probe "+role, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var so serverOptions
	var co clientOptions
	switch role {
	case "server":
		serverFlags(&so, fs)
	case "client":
		clientFlags(&co, fs)
	case "-h", "-help", "--help":
		fmt.Fprintln(stderr, usageLine)
		return 0
	default:
		fmt.Fprintf(stderr, "unknown probe role %q\n%s\n", role, usageLine)
		return 2
	}
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: kube-bpf-proxy probe %s [flags]\n", role)
		fs.PrintDefaults()
	}
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	for _, name := range []string{"v", "vmodule", "logtostderr"} {
		fs.Var(klogFlags.Lookup(name).Value, name, klogFlags.Lookup(name).Usage)
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	}
	if role == "client" {
		if err := co.validate(); err != nil {
			fmt.Fprintln(stderr, err)
			fs.Usage()
			return 2
		}
	}
	id, err := identityFromEnv(lookupEnv)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	switch role {
	case "server":
		err = runServer(ctx, so, id)
	case "client":
		err = runClient(ctx, co, id)
	}
	if err != nil {
		klog.ErrorS(err, "Probe failed", "role", role)
		return 1
	}
	return 0
}

// identity is the pod's, from the downward API.
type identity struct {
	pod, namespace, node string
}

// Downward API variables the manifests set.
const (
	EnvPodName      = "POD_NAME"
	EnvPodNamespace = "POD_NAMESPACE"
	EnvNodeName     = "NODE_NAME"
)

// identityFromEnv reads the pod's names; each one missing is named in the
// error, with where it comes from.
func identityFromEnv(lookupEnv func(string) (string, bool)) (identity, error) {
	var missing []string
	get := func(name string) string {
		v, _ := lookupEnv(name)
		v = strings.TrimSpace(v)
		if v == "" {
			missing = append(missing, name)
		}
		return v
	}
	id := identity{pod: get(EnvPodName), namespace: get(EnvPodNamespace), node: get(EnvNodeName)}
	if len(missing) > 0 {
		return identity{}, fmt.Errorf("%s not set: the probe needs them from the downward API (env valueFrom fieldRef metadata.name, metadata.namespace and spec.nodeName, as manifests/probe sets them)",
			strings.Join(missing, ", "))
	}
	return id, nil
}
