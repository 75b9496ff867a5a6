package apiserver

import (
	"fmt"

	"k8s.io/client-go/rest"
)

// Content types the proxy can ask the API server for.
const (
	// ContentTypeProtobuf is Kubernetes' protobuf encoding: kube-proxy's
	// default (its clientConnection.contentType), and much cheaper to
	// decode than JSON, which matters to a cold node's start with tens of
	// thousands of Services and EndpointSlices to list. client-go
	// v0.36's generated clients already ask for it for built-in types
	// when the configuration names no content type; naming it makes
	// that explicit, holds for every client built from the
	// configuration, and leaves JSON a deliberate choice.
	ContentTypeProtobuf = "application/vnd.kubernetes.protobuf"
	ContentTypeJSON     = "application/json"
)

// Flags that set a Connection, named as kube-proxy's.
const (
	FlagContentType = "kube-api-content-type"
	FlagQPS         = "kube-api-qps"
	FlagBurst       = "kube-api-burst"
)

// Connection is how the proxy's client talks to the API server: kube-proxy's
// clientConnection settings, with its defaults (DefaultConnection).
type Connection struct {
	// ContentType is the encoding asked for and sent: ContentTypeProtobuf
	// or ContentTypeJSON.
	ContentType string
	// QPS is the sustained rate of requests the client allows itself;
	// 0 means client-go's default (5), a negative value no limit.
	QPS float32
	// Burst is how many requests may go at once above QPS.
	Burst int
}

// DefaultConnection returns kube-proxy's defaults (v1.36,
// pkg/proxy/apis/config/v1alpha1: protobuf, 5 QPS, burst 10). The limits
// hardly matter to a proxy: its informers make one list and one watch per
// resource, and it writes only the odd Event and its Node label.
func DefaultConnection() Connection {
	return Connection{ContentType: ContentTypeProtobuf, QPS: 5, Burst: 10}
}

// Validate refuses a content type client-go cannot encode, and a burst
// client-go would refuse when building the client, naming the flag to fix.
func (c Connection) Validate() error {
	switch c.ContentType {
	case ContentTypeProtobuf, ContentTypeJSON:
	case "":
		return fmt.Errorf("--%s is empty: want %s (the default, as kube-proxy) or %s", FlagContentType, ContentTypeProtobuf, ContentTypeJSON)
	default:
		return fmt.Errorf("unknown --%s %q: want %s (the default, as kube-proxy) or %s", FlagContentType, c.ContentType, ContentTypeProtobuf, ContentTypeJSON)
	}
	switch {
	case c.Burst < 0:
		return fmt.Errorf("--%s %d: want 0 or more", FlagBurst, c.Burst)
	case c.QPS > 0 && c.Burst == 0:
		// client-go's NewForConfig fails on this, long after the flags.
		return fmt.Errorf("--%s 0: want at least 1 while --%s is above 0", FlagBurst, FlagQPS)
	}
	return nil
}

// Apply sets the connection on a client configuration. With protobuf, JSON
// stays accepted: the API server answers JSON for the types it has no
// protobuf encoding of (custom resources), and the client decodes whichever
// comes back.
func (c Connection) Apply(cfg *rest.Config) {
	cfg.ContentType = c.ContentType
	cfg.AcceptContentTypes = c.ContentType
	if c.ContentType == ContentTypeProtobuf {
		cfg.AcceptContentTypes = ContentTypeProtobuf + "," + ContentTypeJSON
	}
	cfg.QPS = c.QPS
	cfg.Burst = c.Burst
}
