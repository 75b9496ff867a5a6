package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMain(m *testing.M) { testnet.Main(m, nil) }

// recordingDataplane records snapshots and fails on demand.
type recordingDataplane struct {
	mu       sync.Mutex
	snaps    []*model.Snapshot
	failNext int
	synced   chan struct{}
	read     int // snapshots handed out by next
}

func newRecordingDataplane() *recordingDataplane {
	return &recordingDataplane{synced: make(chan struct{}, 100)}
}

func (r *recordingDataplane) Sync(_ context.Context, s *model.Snapshot) error {
	r.mu.Lock()
	defer func() { r.mu.Unlock(); r.synced <- struct{}{} }()
	r.snaps = append(r.snaps, s)
	if r.failNext > 0 {
		r.failNext--
		return errors.New("injected failure")
	}
	return nil
}

func (r *recordingDataplane) Close() error { return nil }

// next waits for the next sync and returns its snapshot, in order.
func (r *recordingDataplane) next(t *testing.T) *model.Snapshot {
	t.Helper()
	select {
	case <-r.synced:
	case <-time.After(30 * time.Second):
		t.Fatal("no sync within 30s")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.read++
	return r.snaps[r.read-1]
}

func service(ns, name, clusterIP string, ports ...v1.ServicePort) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       v1.ServiceSpec{Type: v1.ServiceTypeClusterIP, ClusterIP: clusterIP, ClusterIPs: []string{clusterIP}, Ports: ports},
	}
}

func tcpPort(name string, port, target int32) v1.ServicePort {
	return v1.ServicePort{Name: name, Port: port, Protocol: v1.ProtocolTCP, TargetPort: intstr.FromInt32(target)}
}

func slice(ns, name, svc, portName string, port int32, ips ...string) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To(portName), Port: ptr.To(port), Protocol: ptr.To(v1.ProtocolTCP)}},
	}
	for _, ip := range ips {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	return s
}

type running struct {
	cancel  context.CancelFunc
	done    chan error
	healthz string
	metrics string
}

func start(t *testing.T, client *fake.Clientset, dp interface {
	Sync(context.Context, *model.Snapshot) error
	Close() error
}) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1), healthz: testnet.FreeAddr(t), metrics: testnet.FreeAddr(t)}
	go func() {
		r.done <- Run(ctx, client, dp, Config{
			MinSyncPeriod: 0, SyncPeriod: time.Hour, RetryPeriod: 0,
			HealthzBindAddress: r.healthz, MetricsBindAddress: r.metrics,
		})
	}()
	t.Cleanup(func() { r.stop(t) })
	return r
}

func (r *running) stop(t *testing.T) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run returned %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("Run did not return within 10s of cancellation")
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	var lastErr error
	for range 100 {
		resp, err := http.Get(url)
		if err != nil {
			lastErr = err
			time.Sleep(50 * time.Millisecond) // the server may not listen yet
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(body)
	}
	t.Fatalf("GET %s: %v", url, lastErr)
	return 0, ""
}

func TestProxierSyncs(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(
		service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)),
		slice("default", "web-1", "web", "http", 8080, "10.244.0.2", "10.244.0.3"),
		service("default", "other", "10.96.0.11", tcpPort("http", 80, 8080)),
	)
	dp := newRecordingDataplane()
	r := start(t, client, dp)

	first := dp.next(t)
	if !first.Full {
		t.Fatal("first sync is not a full one")
	}
	web := first.Services[model.ServiceName{Namespace: "default", Name: "web"}]
	if len(web) != 1 || len(web[0].Backends) != 2 {
		t.Fatalf("first sync: web = %+v; all: %+v", web, first.Services)
	}
	if _, ok := first.Services[model.ServiceName{Namespace: "default", Name: "other"}]; !ok {
		t.Error("first sync misses the Service without endpoints")
	}

	// One slice changes: the next sync carries that Service alone.
	if _, err := client.DiscoveryV1().EndpointSlices("default").Update(ctx,
		slice("default", "web-1", "web", "http", 8080, "10.244.0.2"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	partial := dp.next(t)
	if partial.Full || len(partial.Services) != 1 {
		t.Fatalf("after one slice update: full=%v services=%v", partial.Full, partial.Services)
	}
	if got := partial.Services[model.ServiceName{Namespace: "default", Name: "web"}]; len(got) != 1 || len(got[0].Backends) != 1 {
		t.Errorf("web after update: %+v", got)
	}

	// A malformed Service is skipped and counted; the proxy carries on.
	if _, err := client.CoreV1().Services("default").Create(ctx,
		service("default", "broken", "not-an-ip", tcpPort("http", 80, 8080)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Services("default").Create(ctx,
		service("default", "fine", "10.96.0.12", tcpPort("http", 80, 8080)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		s := dp.next(t)
		if _, ok := s.Services[model.ServiceName{Namespace: "default", Name: "fine"}]; ok {
			break
		}
	}
	_, metrics := get(t, "http://"+r.metrics+"/metrics")
	for _, want := range []string{
		`kube_bpf_proxy_skipped_objects_total{ip_family="IPv4",reason="invalid-cluster-ip",resource="Service"} 1`,
		"kubeproxy_sync_proxy_rules_duration_seconds_bucket",
		"kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
		`kube_bpf_proxy_syncs_total{ip_family="IPv4",kind="full"} 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	code, body := get(t, "http://"+r.healthz+"/healthz")
	var status map[string]any
	if err := json.Unmarshal([]byte(body), &status); err != nil || code != http.StatusOK {
		t.Errorf("/healthz = %d %q (%v), want 200 with JSON", code, body, err)
	}
}

func TestProxierFailedSyncIsRetriedInFull(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	dp := newRecordingDataplane()
	start(t, client, dp)
	if !dp.next(t).Full {
		t.Fatal("first sync not full")
	}
	dp.mu.Lock()
	dp.failNext = 1
	dp.mu.Unlock()
	if _, err := client.DiscoveryV1().EndpointSlices("default").Create(ctx,
		slice("default", "web-1", "web", "http", 8080, "10.244.0.2"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if failed := dp.next(t); failed.Full {
		t.Fatalf("the change was synced in full, want partial: %+v; all: %d", failed, len(dp.snaps))
	}
	retry := dp.next(t)
	if !retry.Full {
		t.Fatal("the sync after a failure is not a full one")
	}
	if got := retry.Services[model.ServiceName{Namespace: "default", Name: "web"}]; len(got) != 1 || len(got[0].Backends) != 1 {
		t.Errorf("retry lost the change: %+v", got)
	}
}

func TestProxierHealthzUnhealthyWhileSyncsFail(t *testing.T) {
	client := fake.NewClientset(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	dp := newRecordingDataplane()
	dp.failNext = 1 << 30
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	healthz := testnet.FreeAddr(t)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, client, dp, Config{
			MinSyncPeriod: 10 * time.Millisecond, SyncPeriod: 50 * time.Millisecond, RetryPeriod: 10 * time.Millisecond,
			HealthzBindAddress: healthz, MetricsBindAddress: testnet.FreeAddr(t),
		})
	}()
	dp.next(t)
	// Health is about how long a change has waited (2 x sync period here):
	// poll until it turns, which it must once syncs keep failing.
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := get(t, "http://"+healthz+"/healthz")
		if code == http.StatusServiceUnavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz still %d %s while every sync fails", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestRunFailsWhenAddressIsTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = Run(context.Background(), fake.NewClientset(), newRecordingDataplane(), Config{
		SyncPeriod: time.Hour, HealthzBindAddress: ln.Addr().String(), MetricsBindAddress: testnet.FreeAddr(t),
	})
	if err == nil || !strings.Contains(err.Error(), "healthz") {
		t.Errorf("Run with a taken healthz address: %v, want an error naming healthz", err)
	}
	_ = fmt.Sprint()
}

// The ClusterIPs of Services another proxy serves reach the datapath with
// the node, in a full sync when they change; the Services themselves stay
// out of the model.
func TestProxierToldForeignClusterIPs(t *testing.T) {
	ctx := context.Background()
	theirs := service("default", "theirs", "10.96.0.77", tcpPort("http", 80, 8080))
	theirs.Labels = map[string]string{"service.kubernetes.io/service-proxy-name": "other"}
	client := fake.NewClientset(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)), theirs)
	dp := newRecordingDataplane()
	start(t, client, dp)
	first := dp.next(t)
	if got := first.Node.ForeignClusterIPs; len(got) != 1 || got[0].String() != "10.96.0.77" {
		t.Errorf("first sync: foreign ClusterIPs %v, want [10.96.0.77]", got)
	}
	if _, ok := first.Services[model.ServiceName{Namespace: "default", Name: "theirs"}]; ok {
		t.Error("another proxy's Service is in the snapshot")
	}
	if err := client.CoreV1().Services("default").Delete(ctx, "theirs", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		s := dp.next(t)
		if len(s.Node.ForeignClusterIPs) == 0 {
			if !s.Full {
				t.Error("the change of foreign ClusterIPs came in a partial sync")
			}
			break
		}
	}
}
