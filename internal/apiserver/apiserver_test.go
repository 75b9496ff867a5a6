package apiserver

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/textlogger"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// env is a fake environment: a variable absent from the map is unset.
func env(vars map[string]string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	}
}

// kubeletLinks are the service-link variables the kubelet gives every
// container for Service default/kubernetes at ClusterIP 10.96.0.1:443.
func kubeletLinks(extra map[string]string) map[string]string {
	vars := map[string]string{
		"KUBERNETES_SERVICE_HOST":       "10.96.0.1",
		"KUBERNETES_SERVICE_PORT":       "443",
		"KUBERNETES_SERVICE_PORT_HTTPS": "443",
		"KUBERNETES_PORT":               "tcp://10.96.0.1:443",
		"KUBERNETES_PORT_443_TCP":       "tcp://10.96.0.1:443",
		"KUBERNETES_PORT_443_TCP_PROTO": "tcp",
		"KUBERNETES_PORT_443_TCP_PORT":  "443",
		"KUBERNETES_PORT_443_TCP_ADDR":  "10.96.0.1",
	}
	for k, v := range extra {
		vars[k] = v
	}
	return vars
}

func TestInCluster(t *testing.T) {
	tests := []struct {
		name          string
		env           map[string]string
		wantServer    string
		wantClusterIP bool
		wantErr       []string
	}{
		{
			name:          "kubelet's service links only",
			env:           kubeletLinks(nil),
			wantServer:    "https://10.96.0.1:443",
			wantClusterIP: true,
		},
		{
			name:       "the manifests' ConfigMap overrides host and port",
			env:        kubeletLinks(map[string]string{"KUBERNETES_SERVICE_HOST": "172.30.0.11", "KUBERNETES_SERVICE_PORT": "6443"}),
			wantServer: "https://172.30.0.11:6443",
		},
		{
			name:       "a name, as EKS and AKS give",
			env:        kubeletLinks(map[string]string{"KUBERNETES_SERVICE_HOST": "abc123.gr7.eu-west-1.eks.amazonaws.com"}),
			wantServer: "https://abc123.gr7.eu-west-1.eks.amazonaws.com:443",
		},
		{
			name:          "the ConfigMap set to the ClusterIP itself",
			env:           kubeletLinks(map[string]string{"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}),
			wantServer:    "https://10.96.0.1:443",
			wantClusterIP: true,
		},
		{
			name: "IPv6 ClusterIP",
			env: map[string]string{"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443",
				"KUBERNETES_PORT": "tcp://[fd00:10:96::1]:443"},
			wantServer:    "https://[fd00:10:96::1]:443",
			wantClusterIP: true,
		},
		{
			name:       "outside a pod, the variables set by hand",
			env:        map[string]string{"KUBERNETES_SERVICE_HOST": "192.0.2.10", "KUBERNETES_SERVICE_PORT": "6443"},
			wantServer: "https://192.0.2.10:6443",
		},
		{
			name:    "the manifests' ConfigMap left empty",
			env:     kubeletLinks(map[string]string{"KUBERNETES_SERVICE_HOST": ""}),
			wantErr: []string{"KUBERNETES_SERVICE_HOST is empty", "ConfigMap kube-system/kube-bpf-proxy-apiserver", "Pointing the proxy at the API server"},
		},
		{
			name:    "port left empty",
			env:     kubeletLinks(map[string]string{"KUBERNETES_SERVICE_HOST": "192.0.2.10", "KUBERNETES_SERVICE_PORT": ""}),
			wantErr: []string{"KUBERNETES_SERVICE_PORT is empty", "6443", "ConfigMap kube-system/kube-bpf-proxy-apiserver"},
		},
		{
			name:    "not in a pod",
			env:     map[string]string{},
			wantErr: []string{"KUBERNETES_SERVICE_HOST is not set", "--kubeconfig"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := InCluster(env(tt.env))
			if len(tt.wantErr) > 0 {
				if err == nil {
					t.Fatalf("InCluster() = %+v, want an error", got)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Server != tt.wantServer || got.ServiceClusterIP != tt.wantClusterIP {
				t.Errorf("InCluster() = %+v, want server %s, ServiceClusterIP %v", got, tt.wantServer, tt.wantClusterIP)
			}
		})
	}
}

// logBuffer collects a logger's output; Probe writes from the test's
// goroutine or another one.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func loggingContext(t *testing.T) (context.Context, *logBuffer) {
	t.Helper()
	var b logBuffer
	logger := textlogger.NewLogger(textlogger.NewConfig(textlogger.Output(&b), textlogger.Verbosity(2)))
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return klog.NewContext(ctx, logger), &b
}

func restClient(t *testing.T, host string) rest.Interface {
	t.Helper()
	cs, err := kubernetes.NewForConfig(&rest.Config{Host: host})
	if err != nil {
		t.Fatal(err)
	}
	return cs.Discovery().RESTClient()
}

func TestProbeAnswered(t *testing.T) {
	tests := []struct {
		name      string
		status    int
		clusterIP bool
		wantLog   string // "" means no error line at all
	}{
		{"direct address", http.StatusOK, false, ""},
		{"direct address, token refused", http.StatusUnauthorized, false, ""},
		{"through the ClusterIP", http.StatusOK, true, "through the kubernetes Service's ClusterIP, which works only while"},
		{"through the ClusterIP, forbidden", http.StatusForbidden, true, "after a reboot, on a new node or after a reinstall"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tt.status)
				_, _ = w.Write([]byte(`{}`))
			}))
			defer srv.Close()
			ctx, log := loggingContext(t)
			// Bounded, so that a Probe that never takes the answer for
			// one fails instead of hanging.
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			Probe(ctx, restClient(t, srv.URL), Target{Server: srv.URL, ServiceClusterIP: tt.clusterIP}, ProbeTimeout, time.Millisecond)
			out := log.String()
			if ctx.Err() != nil || strings.Contains(out, "Cannot reach") {
				t.Fatalf("an answer (HTTP %d) was not taken for one:\n%s", tt.status, out)
			}
			if tt.wantLog == "" {
				if strings.Contains(out, "\nE") || strings.HasPrefix(out, "E") {
					t.Errorf("an answering API server logged an error:\n%s", out)
				}
				return
			}
			for _, w := range []string{tt.wantLog, "ConfigMap kube-system/kube-bpf-proxy-apiserver"} {
				if !strings.Contains(out, w) {
					t.Errorf("log does not say %q:\n%s", w, out)
				}
			}
		})
	}
}

// An API server that cannot be reached is reported with what to set, and
// Probe keeps trying until it answers.
func TestProbeUnreachable(t *testing.T) {
	tests := []struct {
		name   string
		target Target
		want   []string
	}{
		{
			name:   "the kubelet's ClusterIP",
			target: Target{ServiceClusterIP: true},
			want: []string{"Cannot reach the API server through the kubernetes Service's ClusterIP",
				"set KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT to the control plane's own address",
				"ConfigMap kube-system/kube-bpf-proxy-apiserver", "connection refused"},
		},
		{
			name:   "the address the ConfigMap set",
			target: Target{},
			want:   []string{"Cannot reach the API server at KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT", "node's own network", "ConfigMap kube-system/kube-bpf-proxy-apiserver"},
		},
		{
			name:   "a kubeconfig's server",
			target: Target{Kubeconfig: "/var/lib/kube-proxy/kubeconfig.conf"},
			want:   []string{"named by --kubeconfig /var/lib/kube-proxy/kubeconfig.conf"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := testnet.FreeAddr(t)
			tt.target.Server = "http://" + addr
			ctx, log := loggingContext(t)
			done := make(chan struct{})
			go func() {
				defer close(done)
				Probe(ctx, restClient(t, tt.target.Server), tt.target, ProbeTimeout, 10*time.Millisecond)
			}()
			// The diagnostic, then the server comes up: Probe must
			// still be trying, and stop once it answers.
			for !strings.Contains(log.String(), "Cannot reach") {
				select {
				case <-done:
					t.Fatalf("Probe returned while nothing listened:\n%s", log.String())
				case <-time.After(10 * time.Millisecond):
				}
			}
			ln, err := net.Listen("tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte(`{}`)) })}
			go func() { _ = srv.Serve(ln) }()
			defer srv.Close()
			<-done
			out := log.String()
			for _, w := range append(tt.want, tt.target.Server) {
				if !strings.Contains(out, w) {
					t.Errorf("log does not say %q:\n%s", w, out)
				}
			}
		})
	}
}

// A certificate that does not cover the address is named as the problem.
func TestProbeWrongCertificate(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	ctx, log := loggingContext(t)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		// No CA: the test server's certificate is unknown, as a wrong
		// address's would be to the ServiceAccount's ca.crt.
		Probe(ctx, restClient(t, srv.URL), Target{Server: srv.URL}, ProbeTimeout, 10*time.Millisecond)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(log.String(), "certificate") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if out := log.String(); !strings.Contains(out, "The API server's certificate does not match KUBERNETES_SERVICE_HOST") {
		t.Errorf("log does not name the certificate:\n%s", out)
	}
}
