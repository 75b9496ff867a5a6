package bench

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// The benchmark's Services: selectorless, each with one EndpointSlice the
// harness writes itself (no controller has to keep up), so that creating
// tens of thousands takes the API server's time and not a controller's.

const (
	// scaleSetLabel tells the background Services (and their slices) from
	// a batch's, for listing.
	scaleSetLabel = "bench.kube-bpf-proxy.io/set"
	setBackground = "background"
	setBatch      = "batch"
	// sliceManager marks the slices as not the EndpointSlice controllers'
	// (the mirroring controller leaves slices of other managers alone).
	sliceManager = "bench.kube-bpf-proxy.io"

	backgroundPrefix = "bg-"
	batchPrefix      = "batch-"
)

// BulkClient returns a client for creating many objects fast: cfg's
// connection (localcluster's Config dials inside node1's namespace) with
// protobuf instead of JSON and a rate limit far above what the API server
// on 2 cores can take, so the API server is the only limit.
func BulkClient(cfg *rest.Config) (kubernetes.Interface, error) {
	bulk := rest.CopyConfig(cfg)
	bulk.ContentType = "application/vnd.kubernetes.protobuf"
	bulk.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	bulk.QPS, bulk.Burst = 1000, 2000
	cs, err := kubernetes.NewForConfig(bulk)
	if err != nil {
		return nil, fmt.Errorf("making the bulk API client: %w", err)
	}
	return cs, nil
}

// serviceShape is what every benchmark Service has in common.
type serviceShape struct {
	ns        string
	set       string
	endpoints int
	addrs     []netip.Addr
	port      int32
}

func (s serviceShape) check() error {
	if s.endpoints < 1 {
		return fmt.Errorf("%d endpoints per Service: want at least 1", s.endpoints)
	}
	if s.endpoints > len(s.addrs) {
		// Round robin would repeat an address within one slice.
		return fmt.Errorf("%d endpoints per Service but only %d addresses", s.endpoints, len(s.addrs))
	}
	if s.port < 1 || s.port > 65535 {
		return fmt.Errorf("port %d out of range", s.port)
	}
	for _, a := range s.addrs {
		if a.Is6() != s.addrs[0].Is6() {
			return fmt.Errorf("endpoint addresses %s and %s: want one family", s.addrs[0], a)
		}
	}
	return nil
}

// family is the Services' IP family: their endpoints'. IPv6 endpoints
// make SingleStack IPv6 Services with IPv6 slices (the bench's IPv6
// rows, Config.Family); IPv4 ones leave the family to the API server's
// default, the cluster's primary family (IPv4 on every stack the bench
// runs).
func (s serviceShape) family() model.IPFamily {
	if len(s.addrs) > 0 && s.addrs[0].Is6() {
		return model.IPv6
	}
	return model.IPv4
}

// Populate makes the cluster hold exactly n background Services in
// namespace ns (created if missing), creating or deleting the difference:
// bg-00000 to bg-<n-1> (five digits: n below 100000 keeps name order and
// number order the same), each selectorless with one TCP port (port, to
// the same target port) and one EndpointSlice of `endpoints` ready
// endpoints whose addresses are taken round robin from addrs, continuing
// from one Service to the next. workers clients create in parallel;
// progress, if set, is called after each Service created or deleted (from
// one goroutine at a time). It returns the ClusterIP:port of the last one
// by name ("" for n = 0).
//
// With direct set, the Services to create are written into etcd
// (etcdload.go) rather than created through the API, except bg-00000 (the
// template) and any whose fixed ClusterIP something else holds; Populate
// then waits until the API server lists them all. Deletions always go
// through the API.
func Populate(ctx context.Context, c kubernetes.Interface, direct *EtcdStore, ns string, n, endpoints int, addrs []netip.Addr, port int32, workers int, progress func(done, total int)) (last string, err error) {
	shape := serviceShape{ns: ns, set: setBackground, endpoints: endpoints, addrs: addrs, port: port}
	if err := shape.check(); err != nil {
		return "", fmt.Errorf("populating %s: %w", ns, err)
	}
	if n < 0 {
		return "", fmt.Errorf("populating %s: %d Services", ns, n)
	}
	if err := ensureNamespace(ctx, c, ns); err != nil {
		return "", err
	}
	services, err := listSet(ctx, c, ns, setBackground, false)
	if err != nil {
		return "", err
	}
	slices, err := listSet(ctx, c, ns, setBackground, true)
	if err != nil {
		return "", err
	}
	// Services to create (with their slice), slices alone (a Service made
	// by an earlier run that failed before its slice), names to delete.
	var create, createSlice []int
	var remove []string
	for i := range n {
		name := backgroundName(i)
		switch {
		case !services[name]:
			create = append(create, i)
		case !slices[name]:
			createSlice = append(createSlice, i)
		}
	}
	for name := range services {
		if i, ok := backgroundIndex(name); !ok || i >= n {
			remove = append(remove, name)
		}
	}
	for name := range slices {
		if i, ok := backgroundIndex(name); (!ok || i >= n) && !services[name] {
			remove = append(remove, name)
		}
	}
	total := len(create) + len(createSlice) + len(remove)
	report := progressCounter(total, progress)
	// The direct loader takes the Services to create but bg-00000, its
	// template, created through the API with the rest of the API's work
	// first.
	var viaEtcd []int
	if direct != nil && len(create) > 0 {
		if create[0] == 0 {
			viaEtcd, create = create[1:], create[:1]
		} else {
			viaEtcd, create = create, nil
		}
	}
	jobs := make([]func(context.Context) error, 0, total)
	for _, i := range create {
		jobs = append(jobs, func(ctx context.Context) error {
			_, err := shape.create(ctx, c, backgroundName(i), i)
			report()
			return err
		})
	}
	for _, i := range createSlice {
		jobs = append(jobs, func(ctx context.Context) error {
			err := shape.createSlice(ctx, c, backgroundName(i), i)
			report()
			return err
		})
	}
	for _, name := range remove {
		jobs = append(jobs, func(ctx context.Context) error {
			err := deleteService(ctx, c, ns, name)
			report()
			return err
		})
	}
	if err := runParallel(ctx, workers, jobs); err != nil {
		return "", fmt.Errorf("populating %s with %d Services: %w", ns, n, err)
	}
	if len(viaEtcd) > 0 {
		if err := populateDirect(ctx, c, direct, shape, n, viaEtcd, workers, report); err != nil {
			return "", fmt.Errorf("populating %s with %d Services: %w", ns, n, err)
		}
		start := time.Now()
		if err := waitServed(ctx, c, ns, n); err != nil {
			return "", err
		}
		direct.logf("listed by the API server %s later", time.Since(start).Round(time.Millisecond))
	}
	if n == 0 {
		return "", nil
	}
	svc, err := c.CoreV1().Services(ns).Get(ctx, backgroundName(n-1), metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("reading the last background Service: %w", err)
	}
	return net.JoinHostPort(svc.Spec.ClusterIP, strconv.Itoa(int(port))), nil
}

// populateDirect creates background Services idx (none of which exists;
// the others of the n are there) through direct, but those whose fixed
// ClusterIP something else holds: these it creates through the API
// afterwards, once the API server lists those written directly, so that
// its allocator picks another address.
func populateDirect(ctx context.Context, c kubernetes.Interface, direct *EtcdStore, s serviceShape, n int, idx []int, workers int, report func()) error {
	taken, err := takenAddresses(ctx, c)
	if err != nil {
		return err
	}
	var viaEtcd, viaAPI []int
	for _, i := range idx {
		if taken[backgroundClusterIP(s.family(), i).String()] {
			viaAPI = append(viaAPI, i)
		} else {
			viaEtcd = append(viaEtcd, i)
		}
	}
	if len(viaEtcd) > 0 {
		if err := direct.loadDirect(ctx, c, s, viaEtcd, workers, report); err != nil {
			return fmt.Errorf("through etcd: %w", err)
		}
	}
	if len(viaEtcd) > 0 && len(viaAPI) > 0 {
		// Before the API's creations: the API server has caught up.
		if err := waitServed(ctx, c, s.ns, n-len(viaAPI)); err != nil {
			return err
		}
	}
	jobs := make([]func(context.Context) error, len(viaAPI))
	for k, i := range viaAPI {
		jobs[k] = func(ctx context.Context) error {
			_, err := s.create(ctx, c, backgroundName(i), i)
			report()
			return err
		}
	}
	return runParallel(ctx, workers, jobs)
}

// CreateBatch creates k more Services shaped as Populate's, named
// batch-00000 to batch-<k-1> (none may exist yet: DeleteBatch removes an
// earlier batch), with workers parallel clients, and returns their
// ClusterIP:port in name order. Their endpoints continue the round robin
// from the first address.
func CreateBatch(ctx context.Context, c kubernetes.Interface, ns string, k, endpoints int, addrs []netip.Addr, port int32, workers int) ([]string, error) {
	shape := serviceShape{ns: ns, set: setBatch, endpoints: endpoints, addrs: addrs, port: port}
	if err := shape.check(); err != nil {
		return nil, fmt.Errorf("creating a batch in %s: %w", ns, err)
	}
	if err := ensureNamespace(ctx, c, ns); err != nil {
		return nil, err
	}
	vips := make([]string, k)
	jobs := make([]func(context.Context) error, k)
	for i := range k {
		jobs[i] = func(ctx context.Context) error {
			vip, err := shape.create(ctx, c, fmt.Sprintf("%s%05d", batchPrefix, i), i)
			vips[i] = vip // each job its own element
			return err
		}
	}
	if err := runParallel(ctx, workers, jobs); err != nil {
		return nil, fmt.Errorf("creating %d Services in %s: %w", k, ns, err)
	}
	return vips, nil
}

// DeleteBatch deletes every Service CreateBatch made in ns, and their
// slices, with workers parallel clients.
func DeleteBatch(ctx context.Context, c kubernetes.Interface, ns string, workers int) error {
	services, err := listSet(ctx, c, ns, setBatch, false)
	if err != nil {
		return err
	}
	slices, err := listSet(ctx, c, ns, setBatch, true)
	if err != nil {
		return err
	}
	for name := range slices {
		services[name] = true
	}
	var jobs []func(context.Context) error
	for name := range services {
		jobs = append(jobs, func(ctx context.Context) error { return deleteService(ctx, c, ns, name) })
	}
	if err := runParallel(ctx, workers, jobs); err != nil {
		return fmt.Errorf("deleting the batch Services in %s: %w", ns, err)
	}
	return nil
}

func backgroundName(i int) string { return fmt.Sprintf("%s%05d", backgroundPrefix, i) }

func backgroundIndex(name string) (int, bool) {
	digits, ok := strings.CutPrefix(name, backgroundPrefix)
	if !ok {
		return 0, false
	}
	i, err := strconv.Atoi(digits)
	return i, err == nil && i >= 0 && backgroundName(i) == name
}

// create creates the Service called name and its slice; it returns
// ClusterIP:port. i places its endpoints in the round robin.
func (s serviceShape) create(ctx context.Context, c kubernetes.Interface, name string, i int) (string, error) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{scaleSetLabel: s.set}},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{
				Name: "tcp", Protocol: corev1.ProtocolTCP, Port: s.port, TargetPort: intstr.FromInt32(s.port),
			}},
		},
	}
	// The background asks for its addresses: the API server's random
	// allocation halves its create rate (125 against 255 Services a
	// second here), the difference between 50k Services in 7 minutes and
	// in 3.5. An address something else took meanwhile falls back to the
	// API server's choice.
	if s.family() == model.IPv6 {
		policy := corev1.IPFamilyPolicySingleStack
		svc.Spec.IPFamilyPolicy = &policy
		svc.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol}
	}
	if s.set == setBackground {
		svc.Spec.ClusterIP = backgroundClusterIP(s.family(), i).String()
	}
	created, err := c.CoreV1().Services(s.ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil && svc.Spec.ClusterIP != "" && apierrors.IsInvalid(err) && strings.Contains(err.Error(), "already allocated") {
		svc.Spec.ClusterIP = ""
		created, err = c.CoreV1().Services(s.ns).Create(ctx, svc, metav1.CreateOptions{})
	}
	if err != nil {
		return "", fmt.Errorf("creating Service %s/%s: %w", s.ns, name, err)
	}
	if err := s.createSlice(ctx, c, name, i); err != nil {
		return "", err
	}
	return net.JoinHostPort(created.Spec.ClusterIP, strconv.Itoa(int(s.port))), nil
}

// backgroundClusterIP is background Service i's address of family f:
// 10.96.4.0 (fd00:96::400) on, above the static band the API server keeps
// for addresses asked for (the lowest 256 of a /16, of a /112 alike) and
// below the top of the range, 60000 of them.
func backgroundClusterIP(f model.IPFamily, i int) netip.Addr {
	cidr := localcluster.ServiceCIDR
	if f == model.IPv6 {
		cidr = localcluster.ServiceCIDR6
	}
	b := netip.MustParsePrefix(cidr).Addr().As16()
	// Both ranges start at a multiple of 2^16: the offset fits the last
	// two bytes.
	n := uint32(b[14])<<8 | uint32(b[15]) + 4*256 + uint32(i)
	b[14], b[15] = byte(n>>8), byte(n)
	return netip.AddrFrom16(b).Unmap()
}

// sliceEndpoints are Service i's endpoints: the next s.endpoints
// addresses of the round robin, ready.
func (s serviceShape) sliceEndpoints(i int) []discoveryv1.Endpoint {
	eps := make([]discoveryv1.Endpoint, s.endpoints)
	for j := range eps {
		ready, serving, terminating := true, true, false
		addr := s.addrs[(i*s.endpoints+j)%len(s.addrs)]
		eps[j] = discoveryv1.Endpoint{
			Addresses:  []string{addr.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
		}
	}
	return eps
}

// createSlice creates Service name's EndpointSlice, named as the Service.
func (s serviceShape) createSlice(ctx context.Context, c kubernetes.Interface, name string, i int) error {
	eps := s.sliceEndpoints(i)
	portName, proto, port := "tcp", corev1.ProtocolTCP, s.port
	_, err := c.DiscoveryV1().EndpointSlices(s.ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			discoveryv1.LabelServiceName: name,
			discoveryv1.LabelManagedBy:   sliceManager,
			scaleSetLabel:                s.set,
		}},
		AddressType: s.family().AddressType(),
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Protocol: &proto, Port: &port}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating EndpointSlice %s/%s: %w", s.ns, name, err)
	}
	return nil
}

// deleteService deletes the Service called name and its slice; either may
// be gone already.
func deleteService(ctx context.Context, c kubernetes.Interface, ns, name string) error {
	if err := c.CoreV1().Services(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting Service %s/%s: %w", ns, name, err)
	}
	if err := c.DiscoveryV1().EndpointSlices(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting EndpointSlice %s/%s: %w", ns, name, err)
	}
	return nil
}

func ensureNamespace(ctx context.Context, c kubernetes.Interface, ns string) error {
	_, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", ns, err)
	}
	return nil
}

// listSet returns the names of the set's Services (or EndpointSlices) in
// ns, listed in pages so that 50k objects never make one huge response.
func listSet(ctx context.Context, c kubernetes.Interface, ns, set string, slices bool) (map[string]bool, error) {
	return listSetAt(ctx, c, ns, set, slices, "")
}

// listSetAt is listSet at resourceVersion rv ("0": from the API server's
// watch cache, "": from etcd).
func listSetAt(ctx context.Context, c kubernetes.Interface, ns, set string, slices bool, rv string) (map[string]bool, error) {
	names := map[string]bool{}
	opts := metav1.ListOptions{LabelSelector: scaleSetLabel + "=" + set, Limit: 5000, ResourceVersion: rv}
	for {
		var cont string
		if slices {
			list, err := c.DiscoveryV1().EndpointSlices(ns).List(ctx, opts)
			if err != nil {
				return nil, fmt.Errorf("listing the %s EndpointSlices in %s: %w", set, ns, err)
			}
			for _, s := range list.Items {
				names[s.Name] = true
			}
			cont = list.Continue
		} else {
			list, err := c.CoreV1().Services(ns).List(ctx, opts)
			if err != nil {
				return nil, fmt.Errorf("listing the %s Services in %s: %w", set, ns, err)
			}
			for _, s := range list.Items {
				names[s.Name] = true
			}
			cont = list.Continue
		}
		if cont == "" {
			return names, nil
		}
		opts.Continue = cont
	}
}

// progressCounter returns a function to call once per finished job; it
// calls progress with the count so far, one call at a time.
func progressCounter(total int, progress func(done, total int)) func() {
	var mu sync.Mutex
	done := 0
	return func() {
		if progress == nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		done++
		progress(done, total)
	}
}

// runParallel runs jobs on `workers` goroutines and returns the first
// error, after which no new job starts.
func runParallel(ctx context.Context, workers int, jobs []func(context.Context) error) error {
	if workers < 1 {
		workers = 1
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan func(context.Context) error)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for range min(workers, len(jobs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for job := range next {
				if err := job(ctx); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					cancel()
				}
			}
		}()
	}
feed:
	for _, job := range jobs {
		select {
		case next <- job:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}
