// Command kube-bpf-proxy replaces kube-proxy on a Kubernetes node: it watches
// Services and EndpointSlices and load-balances them in the kernel, with eBPF
// programs at socket level (--mode=ebpf, the default) or with kube-proxy-style
// iptables rules (--mode=iptables).
//
// The command is split as kube-proxy's is: options.go holds the flags and
// their validation, config.go kube-proxy's config file (--config), server.go
// the wiring that runs the proxy.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	klog.Flush()
	os.Exit(code)
}
