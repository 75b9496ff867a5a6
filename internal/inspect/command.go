package inspect

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apiserver"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
)

// Exit statuses of the command.
const (
	ExitConsistent  = 0 // the datapath holds what the API server says (or was not compared and is consistent in itself)
	ExitDifferences = 1 // differences found
	ExitUsage       = 2 // bad flags or arguments
	ExitFailed      = 3 // the datapath could not be read
)

const usage = `usage: kube-bpf-proxy inspect [flags] [[namespace/]name]

Shows what this node's datapath serves, per Service port: frontends,
backends and their state, session affinity, the traffic policies, and (ebpf
mode) counters. It reads the pinned BPF maps (ebpf mode) or the iptables
rules (iptables mode), whichever the node has, and compares them with the
Services and EndpointSlices of the API server when one is configured
(--kubeconfig, --master, or the in-cluster configuration); without one it
shows the datapath alone and says so. Each address family is checked
with its own maps (kbp_*, kbp6_*) or rules (iptables, ip6tables), as the
proxy runs one proxier per family; IPv6 ports are labelled IPv6.

A name shows that Service only ("name" is in --namespace, or "default").

Exit status: 0 when the datapath holds what the API server says (or, not
compared, is consistent in itself); 1 when differences were found; 2 on a
usage error; 3 when the datapath could not be read.

Flags:
`

// Main runs `kube-bpf-proxy inspect` with args (after "inspect") and
// returns its exit status. lookupEnv is os.LookupEnv outside tests.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer, lookupEnv func(string) (string, bool)) int {
	fs := flag.NewFlagSet("kube-bpf-proxy inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	var (
		mode, bpffs, backend, output, kubeconfig, master, hostname, namespace string
		timeout                                                               time.Duration
	)
	fs.StringVar(&mode, "mode", ModeAuto, "datapath to read: ebpf, iptables, or auto (ebpf if the pins are under --bpffs-path, else iptables if the nat table of iptables or ip6tables has KUBE-SERVICES)")
	fs.StringVar(&bpffs, "bpffs-path", "/sys/fs/bpf/kube-bpf-proxy", "the proxy's --bpffs-path: where its maps are pinned")
	fs.StringVar(&backend, "iptables-backend", iptables.BackendAuto, "iptables mode: nft, legacy, or auto (the one the node uses)")
	fs.StringVar(&output, "o", "table", "output format: table or json")
	fs.StringVar(&output, "output", "table", "same as -o")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file; empty: the in-cluster configuration, if any")
	fs.StringVar(&master, "master", "", "the API server's address, overriding the kubeconfig's")
	fs.StringVar(&hostname, "hostname-override", "", "this node's name, for the Local traffic policies; default $NODE_NAME, then the hostname")
	fs.StringVar(&namespace, "namespace", "", "show the Services of this namespace only")
	fs.StringVar(&namespace, "n", "", "same as --namespace")
	fs.DurationVar(&timeout, "request-timeout", 30*time.Second, "how long the API requests may take")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return ExitConsistent
		}
		return ExitUsage
	}
	usageError := func(format string, a ...any) int {
		fmt.Fprintf(stderr, format+"\n", a...)
		fmt.Fprintln(stderr, "usage: kube-bpf-proxy inspect [flags] [[namespace/]name] (--help for more)")
		return ExitUsage
	}
	switch mode {
	case ModeAuto, ModeEBPF, ModeIPTables:
	default:
		return usageError("unknown --mode %q: want ebpf, iptables or auto", mode)
	}
	switch output {
	case "table", "json":
	default:
		return usageError("unknown -o %q: want table or json", output)
	}
	switch backend {
	case iptables.BackendAuto, iptables.BackendNFT, iptables.BackendLegacy:
	default:
		return usageError("unknown --iptables-backend %q: want auto, nft or legacy", backend)
	}
	o := Options{Mode: mode, BPFFSPath: bpffs, IPTables: iptables.Config{Backend: backend}, Namespace: namespace}
	switch fs.NArg() {
	case 0:
	case 1:
		name := fs.Arg(0)
		if ns, n, ok := strings.Cut(name, "/"); ok {
			if namespace != "" && namespace != ns {
				return usageError("%q is not in --namespace %q", name, namespace)
			}
			o.Namespace, name = ns, n
		} else if o.Namespace == "" {
			o.Namespace = "default"
		}
		if name == "" || o.Namespace == "" || strings.Contains(name, "/") {
			return usageError("bad Service name %q: want [namespace/]name", fs.Arg(0))
		}
		o.Name = name
	default:
		return usageError("one Service name at most, got %q", fs.Args())
	}

	o.Node = nodeName(hostname, lookupEnv)
	cfg, server, err := clientConfig(kubeconfig, master, lookupEnv)
	if err != nil {
		o.ClientError = err
	} else {
		cfg.UserAgent = "kube-bpf-proxy-inspect"
		cfg.Timeout = timeout
		o.Server = server
		client, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			o.ClientError = fmt.Errorf("creating the Kubernetes client: %w", err)
		} else {
			o.Client = client
		}
	}

	ctx, cancel := context.WithTimeout(ctx, timeout+30*time.Second)
	defer cancel()
	return Run(ctx, o, output, stdout, stderr)
}

// Run inspects with o and writes the report in format ("table" or
// "json"); it returns the command's exit status.
func Run(ctx context.Context, o Options, format string, stdout, stderr io.Writer) int {
	r, err := Inspect(ctx, o)
	if err != nil {
		fmt.Fprintln(stderr, "kube-bpf-proxy inspect:", err)
		return ExitFailed
	}
	if format == "json" {
		err = WriteJSON(stdout, r)
	} else {
		err = WriteTable(stdout, r)
	}
	if err != nil {
		fmt.Fprintln(stderr, "kube-bpf-proxy inspect: writing the report:", err)
		return ExitFailed
	}
	if r.Differences > 0 {
		return ExitDifferences
	}
	return ExitConsistent
}

// clientConfig is the proxy's: a kubeconfig (with --master overriding its
// server), or --master alone, or the in-cluster configuration.
func clientConfig(kubeconfig, master string, lookupEnv func(string) (string, bool)) (*rest.Config, string, error) {
	if master != "" {
		cfg, err := clientcmd.BuildConfigFromFlags(master, kubeconfig)
		if err != nil {
			return nil, "", fmt.Errorf("loading the client configuration (--master %s, --kubeconfig %q): %w", master, kubeconfig, err)
		}
		return cfg, cfg.Host, nil
	}
	cfg, target, err := apiserver.Config(kubeconfig, lookupEnv)
	if err != nil {
		return nil, "", err
	}
	return cfg, target.Server, nil
}

// nodeName follows the proxy: the flag, then $NODE_NAME, then the
// hostname, lower-cased.
func nodeName(override string, lookupEnv func(string) (string, bool)) string {
	name := override
	if name == "" {
		name, _ = lookupEnv("NODE_NAME")
	}
	if name == "" {
		name, _ = os.Hostname()
	}
	return strings.ToLower(strings.TrimSpace(name))
}
