package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
)

// parseOptions parses and validates args as run does, failing the test on
// an error.
func parseOptions(t *testing.T, args ...string) options {
	t.Helper()
	var o options
	if err := newFlagSet(&o, io.Discard).Parse(args); err != nil {
		t.Fatalf("parsing %q: %v", args, err)
	}
	if err := o.validate(); err != nil {
		t.Fatalf("validating %q: %v", args, err)
	}
	return o
}

// writeKubeconfig writes a kubeconfig pointing at server and returns its
// path.
func writeKubeconfig(t *testing.T, server string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	cfg := `apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "` + server + `"}}]
users: [{name: test, user: {token: test}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
`
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// The API flags reach the client configuration, with kube-proxy's defaults.
func TestClientConfigFlags(t *testing.T) {
	kubeconfig := writeKubeconfig(t, "http://192.0.2.1:6443")
	tests := []struct {
		name       string
		args       []string
		wantType   string
		wantAccept string
		wantQPS    float32
		wantBurst  int
	}{
		{"defaults", nil, "application/vnd.kubernetes.protobuf", "application/vnd.kubernetes.protobuf,application/json", 5, 10},
		{"JSON", []string{"--kube-api-content-type=application/json"}, "application/json", "application/json", 5, 10},
		{"limits", []string{"--kube-api-qps=50.5", "--kube-api-burst=100"},
			"application/vnd.kubernetes.protobuf", "application/vnd.kubernetes.protobuf,application/json", 50.5, 100},
		{"no limit", []string{"--kube-api-qps=-1", "--kube-api-burst=0"},
			"application/vnd.kubernetes.protobuf", "application/vnd.kubernetes.protobuf,application/json", -1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := parseOptions(t, append([]string{"--kubeconfig=" + kubeconfig}, tt.args...)...)
			cfg, _, err := clientConfig(o, noEnv)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.ContentType != tt.wantType || cfg.AcceptContentTypes != tt.wantAccept || cfg.QPS != tt.wantQPS || cfg.Burst != tt.wantBurst {
				t.Errorf("config: ContentType %q, AcceptContentTypes %q, QPS %v, Burst %d; want %q, %q, %v, %d",
					cfg.ContentType, cfg.AcceptContentTypes, cfg.QPS, cfg.Burst, tt.wantType, tt.wantAccept, tt.wantQPS, tt.wantBurst)
			}
		})
	}
}

func noEnv(string) (string, bool) { return "", false }

// protobufMagic starts every object in Kubernetes' protobuf encoding.
var protobufMagic = []byte("k8s\x00")

// seenRequest is what the fake API server saw of one request.
type seenRequest struct {
	method, path, accept, contentType string
	protobufBody                      bool
}

// The proxy's client, built as main builds it, asks for and sends what
// --kube-api-content-type says, and decodes a JSON answer when it asked
// for protobuf first (the API server's answer for custom resources).
// client-go v0.36's generated clients would ask for protobuf here even
// without the flag; the JSON case fails if the flag is not applied, and
// the default cases guard against a configuration that asks for JSON.
func TestClientContentType(t *testing.T) {
	const (
		protobuf = "application/vnd.kubernetes.protobuf"
		json     = "application/json"
	)
	tests := []struct {
		name       string
		args       []string
		answer     string // the encoding the server answers in
		wantAccept string
		wantSent   string
	}{
		{"default, protobuf answer", nil, protobuf, protobuf + "," + json, protobuf},
		{"default, JSON answer", nil, json, protobuf + "," + json, protobuf},
		{"JSON", []string{"--kube-api-content-type=" + json}, json, json, json},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var (
				mu   sync.Mutex
				seen []seenRequest
			)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				mu.Lock()
				seen = append(seen, seenRequest{r.Method, r.URL.Path, r.Header.Get("Accept"), r.Header.Get("Content-Type"), bytes.HasPrefix(body, protobufMagic)})
				mu.Unlock()
				var obj runtime.Object
				status := http.StatusOK
				switch {
				case r.Method == http.MethodGet && r.URL.Path == "/api/v1/services":
					obj = &v1.ServiceList{Items: []v1.Service{{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"}}}}
				case r.Method == http.MethodPost && r.URL.Path == "/api/v1/namespaces/default/events":
					obj, status = &v1.Event{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "e"}}, http.StatusCreated
				default:
					http.NotFound(w, r)
					return
				}
				encode(t, w, obj, tt.answer, status)
			}))
			t.Cleanup(srv.Close)

			o := parseOptions(t, append([]string{"--kubeconfig=" + writeKubeconfig(t, srv.URL)}, tt.args...)...)
			cfg, _, err := clientConfig(o, noEnv)
			if err != nil {
				t.Fatal(err)
			}
			client, err := kubernetes.NewForConfig(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			list, err := client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatalf("listing Services: %v", err)
			}
			if len(list.Items) != 1 || list.Items[0].Name != "web" {
				t.Errorf("listed %v, want the one Service web", list.Items)
			}
			if _, err := client.CoreV1().Events("default").Create(ctx, &v1.Event{ObjectMeta: metav1.ObjectMeta{Name: "e"}}, metav1.CreateOptions{}); err != nil {
				t.Fatalf("creating an Event: %v", err)
			}

			mu.Lock()
			defer mu.Unlock()
			want := []seenRequest{
				{http.MethodGet, "/api/v1/services", tt.wantAccept, "", false},
				{http.MethodPost, "/api/v1/namespaces/default/events", tt.wantAccept, tt.wantSent, tt.wantSent == protobuf},
			}
			if len(seen) != len(want) {
				t.Fatalf("the server saw %+v, want %+v", seen, want)
			}
			for i := range want {
				if seen[i] != want[i] {
					t.Errorf("request %d: %+v, want %+v", i, seen[i], want[i])
				}
			}
		})
	}
}

// encode writes obj as the API server would in contentType.
func encode(t *testing.T, w http.ResponseWriter, obj runtime.Object, contentType string, status int) {
	info, ok := runtime.SerializerInfoForMediaType(scheme.Codecs.SupportedMediaTypes(), contentType)
	if !ok {
		t.Errorf("no serializer for %s", contentType)
		http.Error(w, "no serializer", http.StatusInternalServerError)
		return
	}
	var buf bytes.Buffer
	if err := scheme.Codecs.EncoderForVersion(info.Serializer, v1.SchemeGroupVersion).Encode(obj, &buf); err != nil {
		t.Errorf("encoding %T: %v", obj, err)
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", contentType)
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}
