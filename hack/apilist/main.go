// Command apilist measures what the content type of the proxy's API client
// costs a cold node: the time to list N Services and N EndpointSlices from a
// real kube-apiserver (test/utils/localcluster), as a plain list and as the
// proxy's informers do it, in protobuf, in JSON, and with no content type
// configured (client-go's own default). The configurations are built with
// apiserver.Connection, as the proxy builds its own. Rounds alternate the
// content types so that the machine's drift spreads over all of them.
//
//	go run ./hack/apilist --kube-bin "$(hack/kube-build.sh)" [--n 20000] [--rounds 5]
//	go run ./hack/apilist --open DIR [--rounds 5]
//
// It needs root (the cluster's network namespaces) and removes the cluster
// it started when it ends. With --open it measures, on a cluster already
// running in DIR, the objects an earlier run left in its namespace (at
// least one: a run interrupted while creating them leaves its cluster
// when killed), and leaves that cluster running (hack/cluster.sh down).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apiserver"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

const namespace = "apilist"

func main() {
	testnet.RunHelperIfRequested(nil)
	kubeBin := flag.String("kube-bin", os.Getenv("KUBE_BIN"), "directory of kube-apiserver, kube-controller-manager and kubectl (hack/kube-build.sh prints it)")
	n := flag.Int("n", 20000, "Services, and as many EndpointSlices")
	rounds := flag.Int("rounds", 5, "measurements of each content type")
	dir := flag.String("dir", "", "cluster directory (default: a new temporary one)")
	open := flag.String("open", "", "directory of a running cluster to measure instead of starting one")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	if *open != "" {
		err = measureExisting(ctx, *open, *rounds)
	} else {
		err = run(ctx, *kubeBin, *dir, *n, *rounds)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "apilist:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, kubeBin, dir string, n, rounds int) (err error) {
	if dir == "" {
		if dir, err = os.MkdirTemp("", "apilist-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	c, err := localcluster.Up(ctx, localcluster.Options{Dir: filepath.Join(dir, "cluster"), KubeBin: kubeBin,
		Progress: func(f string, a ...any) { fmt.Printf("==> "+f+"\n", a...) }})
	if err != nil {
		return fmt.Errorf("starting the cluster: %w", err)
	}
	defer func() {
		if derr := localcluster.Down(c.Dir); derr != nil && err == nil {
			err = fmt.Errorf("removing the cluster: %w", derr)
		}
	}()
	start := time.Now()
	if err := populate(ctx, c, n); err != nil {
		return err
	}
	fmt.Printf("==> created %d Services and %d EndpointSlices in %s\n", n, n, time.Since(start).Round(time.Millisecond))
	return measureAll(ctx, c, counts{n, n}, rounds)
}

// counts is how many Services and EndpointSlices there are.
type counts struct{ services, slices int }

// measureExisting measures a running cluster's objects in namespace, as
// many Services as EndpointSlices.
func measureExisting(ctx context.Context, dir string, rounds int) error {
	c, err := localcluster.Open(dir)
	if err != nil {
		return err
	}
	svcs, err := c.Client.CoreV1().Services(namespace).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		return err
	}
	eps, err := c.Client.DiscoveryV1().EndpointSlices(namespace).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		return err
	}
	if len(svcs.Items) == 0 {
		return fmt.Errorf("no Services in namespace %s", namespace)
	}
	return measureAll(ctx, c, counts{len(svcs.Items), len(eps.Items)}, rounds)
}

func measureAll(ctx context.Context, c *localcluster.Cluster, n counts, rounds int) error {
	kinds := []string{apiserver.ContentTypeProtobuf, apiserver.ContentTypeJSON, "unset"}
	results := map[string]map[string][]sample{}
	for r := range rounds {
		for i := range kinds {
			kind := kinds[(i+r)%len(kinds)]
			cfg := configFor(c.Config, kind)
			for _, how := range []string{"list", "informers"} {
				s, err := measure(ctx, cfg, how, n)
				if err != nil {
					return fmt.Errorf("%s %s: %w", how, kind, err)
				}
				if results[how] == nil {
					results[how] = map[string][]sample{}
				}
				results[how][kind] = append(results[how][kind], s)
				fmt.Printf("round %d %-9s %-36s %8s  client CPU %8s  %6.1f MiB\n", r+1, how, kind,
					s.wall.Round(time.Millisecond), s.cpu.Round(time.Millisecond), float64(s.bytes)/(1<<20))
			}
		}
	}
	fmt.Printf("\n%d Services + %d EndpointSlices, %d rounds: median (min-max)\n", n.services, n.slices, rounds)
	for _, how := range []string{"list", "informers"} {
		for _, kind := range kinds {
			ss := results[how][kind]
			fmt.Printf("%-9s %-36s wall %s  client CPU %s  %.1f MiB on the wire\n", how, kind,
				summary(ss, func(s sample) time.Duration { return s.wall }),
				summary(ss, func(s sample) time.Duration { return s.cpu }), float64(ss[0].bytes)/(1<<20))
		}
	}
	return nil
}

// configFor is the cluster's admin configuration with kind applied as the
// proxy applies --kube-api-content-type, or as it was ("unset"), and no
// rate limit. Each call gets its own transport: no connection is reused
// from an earlier measurement.
func configFor(base *rest.Config, kind string) *rest.Config {
	cfg := rest.CopyConfig(base)
	if kind != "unset" {
		apiserver.Connection{ContentType: kind, QPS: -1}.Apply(cfg)
	} else {
		cfg.QPS = -1
	}
	cfg.Timeout = 5 * time.Minute
	return cfg
}

type sample struct {
	wall, cpu time.Duration
	bytes     int64
}

// measure lists every Service and EndpointSlice with a fresh client, as a
// plain list from the watch cache (resourceVersion 0, as the reflector's
// first list) or through the informers the proxy uses, and returns the
// wall time, this process's CPU time and the bytes read.
func measure(ctx context.Context, cfg *rest.Config, how string, n counts) (sample, error) {
	var read atomic.Int64
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return countingTransport{rt, &read} })
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return sample{}, err
	}
	runtime.GC()
	cpu0 := cpuTime()
	t0 := time.Now()
	switch how {
	case "list":
		opts := metav1.ListOptions{ResourceVersion: "0"}
		svcs, err := client.CoreV1().Services(namespace).List(ctx, opts)
		if err != nil {
			return sample{}, err
		}
		eps, err := client.DiscoveryV1().EndpointSlices(namespace).List(ctx, opts)
		if err != nil {
			return sample{}, err
		}
		if len(svcs.Items) != n.services || len(eps.Items) != n.slices {
			return sample{}, fmt.Errorf("listed %d Services and %d EndpointSlices, want %+v", len(svcs.Items), len(eps.Items), n)
		}
	case "informers":
		ictx, cancel := context.WithCancel(ctx)
		defer cancel()
		f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(namespace))
		svc := f.Core().V1().Services().Informer()
		eps := f.Discovery().V1().EndpointSlices().Informer()
		f.Start(ictx.Done())
		if !cache.WaitForCacheSync(ictx.Done(), svc.HasSynced, eps.HasSynced) {
			return sample{}, fmt.Errorf("informers did not sync")
		}
		wall, cpu := time.Since(t0), cpuTime()-cpu0
		if len(svc.GetStore().ListKeys()) != n.services || len(eps.GetStore().ListKeys()) != n.slices {
			return sample{}, fmt.Errorf("informers hold %d Services and %d EndpointSlices, want %+v",
				len(svc.GetStore().ListKeys()), len(eps.GetStore().ListKeys()), n)
		}
		cancel()
		f.Shutdown()
		return sample{wall, cpu, read.Load()}, nil
	}
	return sample{time.Since(t0), cpuTime() - cpu0, read.Load()}, nil
}

// cpuTime is the user and system CPU time this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// countingTransport counts the bytes of response bodies read.
type countingTransport struct {
	rt http.RoundTripper
	n  *atomic.Int64
}

func (t countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(r)
	if err == nil {
		resp.Body = countingBody{resp.Body, t.n}
	}
	return resp, err
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b countingBody) Read(p []byte) (int, error) {
	k, err := b.ReadCloser.Read(p)
	b.n.Add(int64(k))
	return k, err
}

func summary(ss []sample, f func(sample) time.Duration) string {
	ds := make([]time.Duration, len(ss))
	for i, s := range ss {
		ds[i] = f(s)
	}
	slices.Sort(ds)
	r := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
	return fmt.Sprintf("%s (%s-%s)", r(ds[len(ds)/2]), r(ds[0]), r(ds[len(ds)-1]))
}

// populate creates n Services without selectors (so no controller touches
// them) and, for each, an EndpointSlice of three ready endpoints, as a
// background load of the benchmark looks.
func populate(ctx context.Context, c *localcluster.Cluster, n int) error {
	cfg := rest.CopyConfig(c.Config)
	cfg.QPS = -1
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating namespace %s: %w", namespace, err)
	}
	work := make(chan int)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	for range 48 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := createPair(ctx, client, i); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	var err2 error
loop:
	for i := range n {
		select {
		case work <- i:
		case err2 = <-errs:
			break loop
		case <-ctx.Done():
			err2 = ctx.Err()
			break loop
		}
	}
	close(work)
	wg.Wait()
	if err2 == nil {
		select {
		case err2 = <-errs:
		default:
		}
	}
	return err2
}

func createPair(ctx context.Context, client kubernetes.Interface, i int) error {
	name := fmt.Sprintf("svc-%05d", i)
	port := int32(80)
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "apilist"}},
		Spec:       v1.ServiceSpec{Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: port}}},
	}
	if _, err := client.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating Service %s: %w", name, err)
	}
	proto, pname, target, ready := v1.ProtocolTCP, "http", int32(8080), true
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Protocol: &proto, Port: &target}},
	}
	for j := range 3 {
		node := fmt.Sprintf("node%d", j%2+1)
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("10.%d.%d.%d", 128+j, i/250, i%250+1)},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName:   &node,
		})
	}
	if _, err := client.DiscoveryV1().EndpointSlices(namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating EndpointSlice %s: %w", slice.Name, err)
	}
	return nil
}
