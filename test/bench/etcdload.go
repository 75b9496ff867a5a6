package bench

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// The direct loader: the background Services, their IPAddress objects and
// their EndpointSlices written straight into the API server's etcd, as
// the API server itself would have written them.
//
// Why: each ClusterIP allocation in kube-apiserver 1.34+ lists every
// IPAddress object to refresh its gauges, so creating Services through
// the API slows from 94 a second to under 20 past 10k (docs/benchmarks.md,
// "Method") and 50k take about 3 hours. The benchmark measures the
// proxies, not that allocator: written directly, the objects reach the
// API server through its etcd watch like any others, and the proxies'
// informers see the same ADDED events, with the same contents, as for
// objects created through the API.
//
// How it stays faithful: the first background Service (bg-00000), its
// slice and its IPAddress are created through the API and read back from
// etcd as templates; each further Service is a copy with its own name,
// uid, creation time, ClusterIP and endpoints, encoded in the templates'
// storage version with the API server's protobuf encoding. Its IPAddress
// carries the labels and parentRef the allocator's repair loop checks
// (managed-by ipallocator.k8s.io, the address family, the Service), and
// its Service follows it within seconds (loadDirect), so the repair loop
// neither deletes nor replaces it, and the allocator's informer sees the
// address as taken: a later Service
// created through the API gets another one.

// EtcdStore writes objects into the API server's etcd through etcd's
// HTTP/JSON gateway (/v3/kv/...).
type EtcdStore struct {
	client *http.Client
	url    string
	// prefix is the API server's --etcd-prefix.
	prefix string
	// Logf, if set, is told how long each phase of a load took.
	Logf func(format string, args ...any)
}

func (e *EtcdStore) logf(format string, args ...any) {
	if e.Logf != nil {
		e.Logf(format, args...)
	}
}

// NewEtcdStore returns a store for the etcd at url (its client URL,
// reachable through client) holding an API server's objects under prefix.
func NewEtcdStore(client *http.Client, url, prefix string) *EtcdStore {
	return &EtcdStore{client: client, url: strings.TrimSuffix(url, "/"), prefix: strings.TrimSuffix(prefix, "/")}
}

// Close closes the client's idle connections to etcd: they are kept for
// the loads (the gateway is slow to accept), and nothing else would close
// them before the process exits.
func (e *EtcdStore) Close() { e.client.CloseIdleConnections() }

// The keys kube-apiserver stores these objects under (its resource
// prefixes, pkg/registry/.../storage): Services under services/specs,
// cluster-scoped IPAddresses by name, which is the address.
func (e *EtcdStore) serviceKey(ns, name string) string {
	return e.prefix + "/services/specs/" + ns + "/" + name
}
func (e *EtcdStore) sliceKey(ns, name string) string {
	return e.prefix + "/endpointslices/" + ns + "/" + name
}
func (e *EtcdStore) ipAddressKey(ip string) string { return e.prefix + "/ipaddresses/" + ip }

// maxTxnOps is etcd's default --max-txn-ops: at most this many puts (and
// as many compares) in one transaction.
const maxTxnOps = 128

// kv is one key to create.
type kv struct {
	key   string
	value []byte
}

func (e *EtcdStore) post(ctx context.Context, path string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, e.url+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hresp, err := e.client.Do(hreq)
	if err != nil {
		return fmt.Errorf("etcd %s: %w", path, err)
	}
	defer hresp.Body.Close()
	b, err := io.ReadAll(hresp.Body)
	if err != nil {
		return fmt.Errorf("etcd %s: %w", path, err)
	}
	if hresp.StatusCode != http.StatusOK {
		return fmt.Errorf("etcd %s: %s: %s", path, hresp.Status, bytes.TrimSpace(b))
	}
	return json.Unmarshal(b, resp)
}

func b64(s []byte) string { return base64.StdEncoding.EncodeToString(s) }

// get returns key's value, or nil if it does not exist.
func (e *EtcdStore) get(ctx context.Context, key string) ([]byte, error) {
	var resp struct {
		Kvs []struct {
			Value []byte `json:"value"` // base64 in the JSON
		} `json:"kvs"`
	}
	if err := e.post(ctx, "/v3/kv/range", map[string]any{"key": b64([]byte(key))}, &resp); err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	return resp.Kvs[0].Value, nil
}

// keys returns the keys under prefix p.
func (e *EtcdStore) keys(ctx context.Context, p string) ([]string, error) {
	end := []byte(p)
	end[len(end)-1]++
	var resp struct {
		Kvs []struct {
			Key []byte `json:"key"`
		} `json:"kvs"`
	}
	if err := e.post(ctx, "/v3/kv/range", map[string]any{"key": b64([]byte(p)), "range_end": b64(end), "keys_only": true}, &resp); err != nil {
		return nil, err
	}
	out := make([]string, len(resp.Kvs))
	for i, k := range resp.Kvs {
		out[i] = string(k.Key)
	}
	return out, nil
}

// create writes every kv in one transaction, as the API server creates an
// object: only if none of the keys exists yet (no lease: none of these
// objects expires).
func (e *EtcdStore) create(ctx context.Context, kvs []kv) error {
	if len(kvs) > maxTxnOps {
		return fmt.Errorf("%d keys in one transaction, etcd takes %d", len(kvs), maxTxnOps)
	}
	cmp := make([]map[string]any, len(kvs))
	put := make([]map[string]any, len(kvs))
	for i, x := range kvs {
		cmp[i] = map[string]any{"key": b64([]byte(x.key)), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
		put[i] = map[string]any{"request_put": map[string]any{"key": b64([]byte(x.key)), "value": b64(x.value)}}
	}
	var resp struct {
		Succeeded bool `json:"succeeded"`
	}
	if err := e.post(ctx, "/v3/kv/txn", map[string]any{"compare": cmp, "success": put}, &resp); err != nil {
		return err
	}
	if !resp.Succeeded {
		for _, x := range kvs {
			if v, err := e.get(ctx, x.key); err == nil && v != nil {
				return fmt.Errorf("etcd: %s exists already", x.key)
			}
		}
		return fmt.Errorf("etcd: one of %s … %s exists already", kvs[0].key, kvs[len(kvs)-1].key)
	}
	return nil
}

// storageCodec is the API server's storage encoding: protobuf, with the
// "k8s\x00" prefix and the runtime.Unknown envelope naming the stored
// version.
var storageCodec = protobuf.NewSerializer(scheme.Scheme, scheme.Scheme)

// decodeStored decodes a stored object; it also returns its storage
// version, which encodeStored writes the copies in.
func decodeStored(raw []byte) (runtime.Object, schema.GroupVersionKind, error) {
	obj, gvk, err := storageCodec.Decode(raw, nil, nil)
	if err != nil {
		return nil, schema.GroupVersionKind{}, err
	}
	return obj, *gvk, nil
}

// encodeStored encodes obj as the API server stores it, in version gvk.
func encodeStored(obj runtime.Object, gvk schema.GroupVersionKind) ([]byte, error) {
	obj.GetObjectKind().SetGroupVersionKind(gvk)
	var buf bytes.Buffer
	if err := storageCodec.Encode(obj, &buf); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// etcdTemplates are bg-00000's three objects as stored, with their
// storage versions.
type etcdTemplates struct {
	svc                     *corev1.Service
	slice                   *discoveryv1.EndpointSlice
	ip                      *networkingv1.IPAddress
	svcGVK, sliceGVK, ipGVK schema.GroupVersionKind
}

// readTemplates reads Service ns/name, its slice and its IPAddress from
// etcd.
func (e *EtcdStore) readTemplates(ctx context.Context, ns, name string) (*etcdTemplates, error) {
	var t etcdTemplates
	read := func(key string, into any, gvk *schema.GroupVersionKind) error {
		raw, err := e.get(ctx, key)
		if err != nil {
			return err
		}
		if raw == nil {
			return fmt.Errorf("no key %s in etcd: is the API server's --etcd-prefix %s?", key, e.prefix)
		}
		obj, g, err := decodeStored(raw)
		if err != nil {
			return fmt.Errorf("decoding %s: %w", key, err)
		}
		*gvk = g
		switch into := into.(type) {
		case **corev1.Service:
			o, ok := obj.(*corev1.Service)
			if !ok {
				return fmt.Errorf("%s holds a %T", key, obj)
			}
			*into = o
		case **discoveryv1.EndpointSlice:
			o, ok := obj.(*discoveryv1.EndpointSlice)
			if !ok {
				return fmt.Errorf("%s holds a %T", key, obj)
			}
			*into = o
		case **networkingv1.IPAddress:
			o, ok := obj.(*networkingv1.IPAddress)
			if !ok {
				return fmt.Errorf("%s holds a %T", key, obj)
			}
			*into = o
		}
		return nil
	}
	if err := read(e.serviceKey(ns, name), &t.svc, &t.svcGVK); err != nil {
		return nil, err
	}
	if err := read(e.sliceKey(ns, name), &t.slice, &t.sliceGVK); err != nil {
		return nil, err
	}
	if len(t.svc.Spec.ClusterIPs) != 1 {
		return nil, fmt.Errorf("template Service %s/%s has ClusterIPs %v, want one", ns, name, t.svc.Spec.ClusterIPs)
	}
	if err := read(e.ipAddressKey(t.svc.Spec.ClusterIP), &t.ip, &t.ipGVK); err != nil {
		return nil, err
	}
	if p := t.ip.Spec.ParentRef; p == nil || p.Resource != "services" || p.Namespace != ns || p.Name != name {
		return nil, fmt.Errorf("IPAddress %s's parentRef %+v is not Service %s/%s", t.ip.Name, p, ns, name)
	}
	return &t, nil
}

// stamp gives a copied object its own identity, as the API server's
// create does: a new uid, this creation time (at the second, as the API
// server's clock is shown), the same time on its managedFields entries,
// generation 1 where it has one, and no resourceVersion (etcd's revision
// becomes it).
func stamp(m *metav1.ObjectMeta, name string, now metav1.Time) {
	m.Name = name
	m.UID = uuid.NewUUID()
	m.ResourceVersion = ""
	m.CreationTimestamp = now
	if m.Generation > 0 {
		// The template may have been updated since (churn); a create
		// starts at 1.
		m.Generation = 1
	}
	for i := range m.ManagedFields {
		t := now
		m.ManagedFields[i].Time = &t
	}
}

// address returns background Service i's IPAddress as key and value,
// copied from the template and created at now.
func (t *etcdTemplates) address(e *EtcdStore, s serviceShape, i int, now metav1.Time) (kv, error) {
	name, ip := backgroundName(i), backgroundClusterIP(model.IPv4, i).String()
	addr := t.ip.DeepCopy()
	stamp(&addr.ObjectMeta, ip, now)
	addr.Spec.ParentRef.Namespace, addr.Spec.ParentRef.Name = s.ns, name
	b, err := encodeStored(addr, t.ipGVK)
	if err != nil {
		return kv{}, fmt.Errorf("encoding IPAddress %s: %w", ip, err)
	}
	return kv{e.ipAddressKey(ip), b}, nil
}

// service returns background Service i and its slice as keys and values,
// copied from the templates and created at now.
func (t *etcdTemplates) service(e *EtcdStore, s serviceShape, i int, now metav1.Time) ([]kv, error) {
	name, ip := backgroundName(i), backgroundClusterIP(model.IPv4, i).String()

	svc := t.svc.DeepCopy()
	stamp(&svc.ObjectMeta, name, now)
	svc.Spec.ClusterIP, svc.Spec.ClusterIPs = ip, []string{ip}

	slice := t.slice.DeepCopy()
	stamp(&slice.ObjectMeta, name, now)
	slice.Labels[discoveryv1.LabelServiceName] = name
	slice.Endpoints = s.sliceEndpoints(i)

	var out []kv
	for _, o := range []struct {
		key string
		obj runtime.Object
		gvk schema.GroupVersionKind
	}{
		{e.serviceKey(s.ns, name), svc, t.svcGVK},
		{e.sliceKey(s.ns, name), slice, t.sliceGVK},
	} {
		b, err := encodeStored(o.obj, o.gvk)
		if err != nil {
			return nil, fmt.Errorf("encoding %s: %w", o.key, err)
		}
		out = append(out, kv{o.key, b})
	}
	return out, nil
}

// directRound is how many Services loadDirect writes at a time, each
// round's IPAddresses first and then its Services. The API server's
// ClusterIP repair loop deletes, as leaked, an IPAddress whose Service it
// has not seen 60 s after the address's creationTimestamp (repairip.go,
// syncIPAddress), and then finds that Service's address missing
// (ClusterIPNotAllocated) and creates it again: the allocator would in
// between give the address to a new Service. Written in one round, 20k
// addresses were over 60 s old before their Services arrived, and the
// repair loop deleted 1,285 of them. A round of 2,000 takes seconds
// (about 240 Services a second here, addresses included).
const directRound = 2000

// loadDirect writes background Services idx (none of which exists, nor
// its slice, nor an IPAddress for its ClusterIP) into etcd, with workers
// transactions in flight, once bg-00000 (the template) exists. It goes
// in rounds of directRound Services; in each, as the API server's
// allocator does, it writes the IPAddresses first, created at that
// moment, and the Services and slices after, created when they are
// written, once the API server lists the addresses: the repair loop then
// finds each Service's address in its informer, and each address's
// Service well within its 60 s grace.
func (e *EtcdStore) loadDirect(ctx context.Context, c kubernetes.Interface, s serviceShape, idx []int, workers int, report func()) error {
	t, err := e.readTemplates(ctx, s.ns, backgroundName(0))
	if err != nil {
		return fmt.Errorf("reading the template Service: %w", err)
	}
	var wrote, listed, loaded time.Duration
	defer func() {
		e.logf("%d Services written to etcd in rounds of %d: IPAddresses %s, listed by the API server %s later, Services and slices %s",
			len(idx), directRound, wrote.Round(time.Millisecond), listed.Round(time.Millisecond), loaded.Round(time.Millisecond))
	}()
	for start := 0; start < len(idx); start += directRound {
		round := idx[start:min(start+directRound, len(idx))]
		phase := time.Now()
		if err := e.writeAddresses(ctx, t, s, round, workers); err != nil {
			return err
		}
		wrote += time.Since(phase)
		phase = time.Now()
		if err := waitAddresses(ctx, c, round); err != nil {
			return err
		}
		listed += time.Since(phase)
		phase = time.Now()
		if err := e.writeServices(ctx, t, s, round, workers, report); err != nil {
			return err
		}
		loaded += time.Since(phase)
	}
	return nil
}

// writeAddresses writes Services idx's IPAddresses, created now.
func (e *EtcdStore) writeAddresses(ctx context.Context, t *etcdTemplates, s serviceShape, idx []int, workers int) error {
	now := metav1.Now().Rfc3339Copy()
	ips := make([]kv, len(idx))
	for k, i := range idx {
		var err error
		if ips[k], err = t.address(e, s, i, now); err != nil {
			return err
		}
	}
	var jobs []func(context.Context) error
	for start := 0; start < len(ips); start += maxTxnOps {
		chunk := ips[start:min(start+maxTxnOps, len(ips))]
		jobs = append(jobs, func(ctx context.Context) error { return e.create(ctx, chunk) })
	}
	return runParallel(ctx, workers, jobs)
}

// writeServices writes Services idx and their slices, created now.
func (e *EtcdStore) writeServices(ctx context.Context, t *etcdTemplates, s serviceShape, idx []int, workers int, report func()) error {
	now := metav1.Now().Rfc3339Copy()
	svcs := make([][]kv, len(idx))
	for k, i := range idx {
		var err error
		if svcs[k], err = t.service(e, s, i, now); err != nil {
			return err
		}
	}
	const perTxn = maxTxnOps / 2
	var jobs []func(context.Context) error
	for start := 0; start < len(svcs); start += perTxn {
		chunk := svcs[start:min(start+perTxn, len(svcs))]
		jobs = append(jobs, func(ctx context.Context) error {
			var kvs []kv
			for _, o := range chunk {
				kvs = append(kvs, o...)
			}
			if err := e.create(ctx, kvs); err != nil {
				return err
			}
			for range chunk {
				report()
			}
			return nil
		})
	}
	return runParallel(ctx, workers, jobs)
}

// waitAddresses waits until the API server lists background Services
// idx's IPAddresses. A list without resourceVersion is served once the
// API server's watch cache has caught up with etcd (or from etcd), so one
// list normally does.
func waitAddresses(ctx context.Context, c kubernetes.Interface, idx []int) error {
	for {
		taken, err := takenAddresses(ctx, c)
		if err != nil {
			return err
		}
		missing := 0
		for _, i := range idx {
			if !taken[backgroundClusterIP(model.IPv4, i).String()] {
				missing++
			}
		}
		if missing == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the API server to list %d IPAddresses written to etcd (%d missing): %w", len(idx), missing, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// takenAddresses returns the IPAddress objects' names (the ClusterIPs in
// use), listed from the API server.
func takenAddresses(ctx context.Context, c kubernetes.Interface) (map[string]bool, error) {
	taken := map[string]bool{}
	opts := metav1.ListOptions{Limit: 5000}
	for {
		l, err := c.NetworkingV1().IPAddresses().List(ctx, opts)
		if err != nil {
			return nil, fmt.Errorf("listing IPAddresses: %w", err)
		}
		for _, a := range l.Items {
			taken[a.Name] = true
		}
		if l.Continue == "" {
			return taken, nil
		}
		opts.Continue = l.Continue
	}
}

// waitServed waits until the API server lists n background Services and
// n slices in ns, both from its watch cache (resourceVersion 0, what an
// informer's first list reads) and from etcd (a quorum list): written
// directly, objects reach the watch cache through its etcd watch, shortly
// after.
func waitServed(ctx context.Context, c kubernetes.Interface, ns string, n int) error {
	count := func(rv string) (int, int, error) {
		svcs, err := listSetAt(ctx, c, ns, setBackground, false, rv)
		if err != nil {
			return 0, 0, err
		}
		slices, err := listSetAt(ctx, c, ns, setBackground, true, rv)
		if err != nil {
			return 0, 0, err
		}
		return len(svcs), len(slices), nil
	}
	var last string
	for {
		ok := true
		// The consistent list first: it waits for the watch cache to
		// catch up with etcd, after which the cache (resourceVersion 0)
		// has them too.
		for _, rv := range []string{"", "0"} {
			s, sl, err := count(rv)
			if err != nil {
				return err
			}
			if s != n || sl != n {
				ok, last = false, fmt.Sprintf("%d Services and %d slices at resourceVersion %q", s, sl, rv)
				break
			}
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the API server to list %d background Services (last: %s): %w", n, last, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}
