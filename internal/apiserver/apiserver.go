// Package apiserver decides how the proxy reaches the API server, and says at
// start, in the log, what to set when that cannot work.
//
// The trap it guards against: in a pod, the in-cluster configuration dials
// KUBERNETES_SERVICE_HOST, which the kubelet sets to the ClusterIP of Service
// default/kubernetes. A ClusterIP works only once a proxy has programmed it on
// the node, and this binary is that proxy: on a node with no Service rules
// (rebooted, new, or after a reinstall) it would wait for itself forever.
// The manifests therefore set KUBERNETES_SERVICE_HOST and
// KUBERNETES_SERVICE_PORT to the control plane's own address (variables a
// container declares win over the kubelet's service links), as kubeadm's
// kube-proxy kubeconfig and Cilium's k8sServiceHost do.
package apiserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

// Variables of the in-cluster configuration.
const (
	EnvHost = "KUBERNETES_SERVICE_HOST"
	EnvPort = "KUBERNETES_SERVICE_PORT"
	// envServiceLink is the kubelet's Docker-style link variable of Service
	// default/kubernetes ("tcp://10.96.0.1:443"). The kubelet sets it from
	// the Service's ClusterIP next to KUBERNETES_SERVICE_HOST, and the
	// manifests override only the latter, so the two differ exactly when
	// the override is in place.
	envServiceLink = "KUBERNETES_PORT"
)

// ConfigMap is where the manifests take the API server's address from.
const ConfigMap = "kube-system/kube-bpf-proxy-apiserver"

// setAddress is the advice every message about the address ends with.
const setAddress = "set " + EnvHost + " and " + EnvPort + " to the control plane's own address " +
	"(not the kubernetes Service's ClusterIP) in ConfigMap " + ConfigMap +
	", from a kustomize overlay of the manifests (docs/install.md, \"Pointing the proxy at the API server\"), or pass --kubeconfig"

// Target is where the proxy's API requests go, and how that was decided.
type Target struct {
	// Server is the API server's URL.
	Server string
	// Kubeconfig is the file the configuration came from; empty for the
	// in-cluster configuration.
	Kubeconfig string
	// ServiceClusterIP is set when the in-cluster host is the ClusterIP of
	// Service default/kubernetes: reachable only through a proxy's
	// datapath.
	ServiceClusterIP bool
}

// Config returns the client configuration: the kubeconfig file if one is
// given, otherwise the in-cluster one, refused with what to set when its
// address is missing. lookupEnv is os.LookupEnv outside tests.
func Config(kubeconfig string, lookupEnv func(string) (string, bool)) (*rest.Config, Target, error) {
	if kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, Target{}, fmt.Errorf("loading --kubeconfig %s: %w", kubeconfig, err)
		}
		return cfg, Target{Server: cfg.Host, Kubeconfig: kubeconfig}, nil
	}
	target, err := InCluster(lookupEnv)
	if err != nil {
		return nil, Target{}, err
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, Target{}, fmt.Errorf("loading the in-cluster configuration (the ServiceAccount token and CA the kubelet mounts in /var/run/secrets/kubernetes.io/serviceaccount): %w", err)
	}
	return cfg, target, nil
}

// InCluster reads where the in-cluster configuration will dial, and whether
// that is the kubernetes Service's ClusterIP. An empty or missing address is
// an error that says what to set: falling back to the ClusterIP would work
// only until the node reboots.
func InCluster(lookupEnv func(string) (string, bool)) (Target, error) {
	host, hostSet := lookupEnv(EnvHost)
	port, portSet := lookupEnv(EnvPort)
	switch {
	case !hostSet:
		return Target{}, fmt.Errorf("no --kubeconfig, and %s is not set (not running in a pod): pass --kubeconfig, or %s",
			EnvHost, setAddress)
	case host == "":
		return Target{}, fmt.Errorf("%s is empty: the API server's address was never set; %s", EnvHost, setAddress)
	case !portSet || port == "":
		return Target{}, fmt.Errorf("%s is empty: the API server's port was never set (6443 on kubeadm and kind, 443 on EKS, GKE and AKS); %s",
			EnvPort, setAddress)
	}
	t := Target{Server: "https://" + net.JoinHostPort(host, port)}
	if link, ok := lookupEnv(envServiceLink); ok {
		if u, err := url.Parse(link); err == nil && u.Hostname() == host {
			t.ServiceClusterIP = true
		}
	}
	return t, nil
}

// ProbeTimeout bounds each attempt of Probe: long enough for a TLS handshake
// with a busy API server, short enough that a dial into nowhere is reported
// while the user is still looking.
const ProbeTimeout = 5 * time.Second

// Probe asks the API server for /version until it answers, logging after each
// failed attempt why it cannot be reached and what to set. Any HTTP answer,
// an authorization error included, counts: the address works. Once it
// answers through the kubernetes Service's ClusterIP, Probe warns that this
// will fail after a reboot. It returns when the server answered or ctx ends,
// waiting retry between attempts (doubled each time, up to a minute). It
// only reports; the informers keep retrying on their own.
func Probe(ctx context.Context, client rest.Interface, t Target, timeout, retry time.Duration) {
	logger := klog.FromContext(ctx)
	for {
		actx, cancel := context.WithTimeout(ctx, timeout)
		_, err := client.Get().AbsPath("/version").Do(actx).Raw()
		cancel()
		if ctx.Err() != nil {
			return
		}
		if answered(err) {
			if t.ServiceClusterIP {
				logger.Error(nil, ClusterIPWarning, "server", t.Server)
			} else {
				logger.V(2).Info("The API server answers", "server", t.Server)
			}
			return
		}
		logger.Error(err, t.Unreachable(err), "server", t.Server)
		select {
		case <-ctx.Done():
			return
		case <-time.After(retry):
		}
		retry = min(2*retry, time.Minute)
	}
}

// answered reports whether a request got an HTTP answer, of whatever status.
func answered(err error) bool {
	var status apierrors.APIStatus
	return err == nil || errors.As(err, &status)
}

// ClusterIPWarning is logged when the API server answers through the
// kubernetes Service's ClusterIP.
const ClusterIPWarning = "The API server answers through the kubernetes Service's ClusterIP, " +
	"which works only while a datapath (this proxy's pins, or kube-proxy's rules) already serves it on this node: " +
	"after a reboot, on a new node or after a reinstall this proxy will not start. To fix it, " + setAddress

// Unreachable says why the API server at t did not answer (err is the
// failed request's error) and what to change.
func (t Target) Unreachable(err error) string {
	var (
		unknownCA  x509.UnknownAuthorityError
		wrongName  x509.HostnameError
		verifyCert *tls.CertificateVerificationError
	)
	badCert := errors.As(err, &unknownCA) || errors.As(err, &wrongName) || errors.As(err, &verifyCert)
	switch {
	case t.ServiceClusterIP:
		return "Cannot reach the API server through the kubernetes Service's ClusterIP (the kubelet's " + EnvHost +
			"): only a proxy's datapath serves a ClusterIP, and this proxy is the one to program it on this node. To fix it, " + setAddress
	case t.Kubeconfig != "" && badCert:
		return "The API server's certificate does not match --kubeconfig " + t.Kubeconfig +
			": check its server and certificate-authority"
	case t.Kubeconfig != "":
		return "Cannot reach the API server named by --kubeconfig " + t.Kubeconfig +
			": check its server, which must be reachable from the node's own network"
	case badCert:
		return "The API server's certificate does not match " + EnvHost + " and " + EnvPort +
			": use an address the certificate names (kubeadm: the controlPlaneEndpoint or the advertise address) and check the ServiceAccount's ca.crt; " +
			"they are set in ConfigMap " + ConfigMap
	default:
		return "Cannot reach the API server at " + EnvHost + " and " + EnvPort +
			": check the address, which must be reachable from the node's own network; it is set in ConfigMap " + ConfigMap
	}
}
