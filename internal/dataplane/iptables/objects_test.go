package iptables

import (
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
)

// The Services of the renderer's golden cases and of the fidelity test
// against kube-proxy: apitest's ClusterIP Services and slices, made into
// each kind of Service the model describes.

// testNode is the node the rules are rendered for; endpoints on it are
// local.
const testNode = "node-a"

type svcOpt func(*v1.Service)

// service is a ClusterIP Service with one port per ports entry, changed by
// opts.
func service(ns, name, clusterIP string, ports []v1.ServicePort, opts ...svcOpt) *v1.Service {
	s := apitest.Service(ns, name, clusterIP, ports...)
	for _, o := range opts {
		o(s)
	}
	return s
}

// nodePorts makes a NodePort Service with the ports' node ports, in order.
func nodePorts(ports ...int32) svcOpt {
	return func(s *v1.Service) {
		if s.Spec.Type == v1.ServiceTypeClusterIP {
			s.Spec.Type = v1.ServiceTypeNodePort
		}
		for i := range ports {
			s.Spec.Ports[i].NodePort = ports[i]
		}
		if s.Spec.ExternalTrafficPolicy == "" {
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
		}
	}
}

// loadBalancer makes a LoadBalancer Service whose status lists ips (ipMode
// VIP, as cloud controllers set it).
func loadBalancer(ips ...string) svcOpt {
	return func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		if s.Spec.ExternalTrafficPolicy == "" {
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
		}
		vip := v1.LoadBalancerIPModeVIP
		for _, ip := range ips {
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: ip, IPMode: &vip})
		}
	}
}

func externalIPs(ips ...string) svcOpt {
	return func(s *v1.Service) { s.Spec.ExternalIPs = ips }
}

func sourceRanges(cidrs ...string) svcOpt {
	return func(s *v1.Service) { s.Spec.LoadBalancerSourceRanges = cidrs }
}

// externalLocal sets externalTrafficPolicy Local, with the health check
// node port a LoadBalancer has (0 for none).
func externalLocal(healthCheckNodePort int32) svcOpt {
	return func(s *v1.Service) {
		s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		s.Spec.HealthCheckNodePort = healthCheckNodePort
	}
}

func internalLocal() svcOpt {
	return func(s *v1.Service) {
		local := v1.ServiceInternalTrafficPolicyLocal
		s.Spec.InternalTrafficPolicy = &local
	}
}

func clientIPAffinity(seconds int32) svcOpt {
	return func(s *v1.Service) {
		s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: &seconds}}
	}
}

// on puts an endpoint on a node.
func on(node string, ep discoveryv1.Endpoint) discoveryv1.Endpoint {
	ep.NodeName = &node
	return ep
}

// local is a ready endpoint on testNode, remote one on another node.
func local(addr string) discoveryv1.Endpoint  { return on(testNode, apitest.Ready(addr)) }
func remote(addr string) discoveryv1.Endpoint { return on("node-b", apitest.Ready(addr)) }

// slice is the EndpointSlice of a single-port Service (port name "" or
// as given, TCP unless proto says otherwise).
func slice(ns, svc, portName string, proto v1.Protocol, port int32, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return apitest.Slice(ns, svc, svc+"-1", []discoveryv1.EndpointPort{apitest.SlicePort(portName, proto, port)}, eps...)
}

// kindsOfServices is one Service of each kind the model describes, with
// their slices: the golden cases' "every-kind" and the fidelity test's
// set. Addresses are in the fidelity test's service range (10.96.0.0/16,
// ClusterIPs requested explicitly) and pod range (10.244.0.0/16).
func kindsOfServices() ([]*v1.Service, []*discoveryv1.EndpointSlice) {
	tcpPort := func(name string, port, target int32) []v1.ServicePort {
		return []v1.ServicePort{apitest.Port(name, tcp, port, target)}
	}
	svcs := []*v1.Service{
		// ClusterIP, two ports (TCP and UDP), endpoints on two nodes.
		service("fid", "cluster-ip", "10.96.10.1", []v1.ServicePort{apitest.Port("http", tcp, 80, 8080), apitest.Port("dns", udp, 53, 5353)}),
		// No endpoints at all: REJECT on every frontend.
		service("fid", "no-endpoints", "10.96.10.2", tcpPort("http", 80, 8080),
			nodePorts(30002), externalIPs("192.0.2.2")),
		// NodePort, externalTrafficPolicy Cluster.
		service("fid", "node-port", "10.96.10.3", tcpPort("", 80, 8080), nodePorts(30003)),
		// UDP NodePort with an external IP.
		service("fid", "node-port-udp", "10.96.10.4", []v1.ServicePort{apitest.Port("dns", udp, 53, 5353)},
			nodePorts(30004), externalIPs("192.0.2.4")),
		// LoadBalancer, Cluster policy, source ranges (one holding the
		// node's address, so the LB IPs are admitted as sources too).
		service("fid", "lb-ranges", "10.96.10.5", tcpPort("http", 80, 8080), nodePorts(30005),
			loadBalancer("198.51.100.5", "198.51.100.15"), sourceRanges("203.0.113.0/24", "172.29.0.0/16")),
		// LoadBalancer, Local policy with health check node port, local
		// and remote endpoints, an external IP too.
		service("fid", "lb-local", "10.96.10.6", tcpPort("http", 80, 8080), nodePorts(30006),
			loadBalancer("198.51.100.6"), externalIPs("192.0.2.6"), externalLocal(32006)),
		// LoadBalancer, Local policy, endpoints on other nodes only: DROP
		// from outside, short-circuit from inside.
		service("fid", "lb-local-remote", "10.96.10.7", tcpPort("http", 80, 8080), nodePorts(30007),
			loadBalancer("198.51.100.7"), externalLocal(32007)),
		// internalTrafficPolicy Local with a local endpoint, and without.
		service("fid", "itp-local", "10.96.10.8", tcpPort("http", 80, 8080), internalLocal()),
		service("fid", "itp-local-none", "10.96.10.9", tcpPort("http", 80, 8080), internalLocal()),
		// ITP Local and ETP Cluster on a NodePort.
		service("fid", "itp-local-np", "10.96.10.10", tcpPort("http", 80, 8080), internalLocal(), nodePorts(30010)),
		// ClientIP affinity (timeout set), on a NodePort.
		service("fid", "affinity", "10.96.10.11", tcpPort("http", 80, 8080), clientIPAffinity(600), nodePorts(30011)),
		// externalIPs only (a ClusterIP Service with external IPs).
		service("fid", "external-ip", "10.96.10.12", tcpPort("http", 80, 8080), externalIPs("192.0.2.12", "192.0.2.22")),
		// LoadBalancer without node ports, Local policy, affinity, source
		// range not holding the node.
		service("fid", "lb-local-affinity", "10.96.10.13", tcpPort("http", 80, 8080), loadBalancer("198.51.100.13"),
			externalLocal(32013), clientIPAffinity(10800), sourceRanges("203.0.113.128/25")),
		// Only a terminating local endpoint beside a ready remote one:
		// Local uses the terminating one, Cluster the ready one.
		service("fid", "local-terminating", "10.96.10.14", tcpPort("http", 80, 8080), nodePorts(30014), externalLocal(0)),
		// Host-scoped load balancer IPs, which anyone allowed to write
		// services/status can name: kube-proxy writes their rules (a
		// pod's loopback never reaches them); the eBPF mode's socket
		// layer leaves them out.
		service("fid", "lb-host-scoped", "10.96.10.15", tcpPort("http", 80, 8080), nodePorts(30015),
			loadBalancer("127.0.0.53", "169.254.10.15")),
	}
	terminatingLocal := on(testNode, apitest.Terminating("10.244.1.14"))
	slices := []*discoveryv1.EndpointSlice{
		apitest.Slice("fid", "cluster-ip", "cluster-ip-1",
			[]discoveryv1.EndpointPort{apitest.SlicePort("http", tcp, 8080), apitest.SlicePort("dns", udp, 5353)},
			local("10.244.1.1"), remote("10.244.2.1"), remote("10.244.2.10")),
		slice("fid", "node-port", "", tcp, 8080, local("10.244.1.3"), remote("10.244.2.3")),
		slice("fid", "node-port-udp", "dns", udp, 5353, remote("10.244.2.4")),
		slice("fid", "lb-ranges", "http", tcp, 8080, remote("10.244.2.5"), remote("10.244.2.15")),
		slice("fid", "lb-local", "http", tcp, 8080, local("10.244.1.6"), remote("10.244.2.6")),
		slice("fid", "lb-local-remote", "http", tcp, 8080, remote("10.244.2.7")),
		slice("fid", "itp-local", "http", tcp, 8080, local("10.244.1.8"), remote("10.244.2.8")),
		slice("fid", "itp-local-none", "http", tcp, 8080, remote("10.244.2.9")),
		slice("fid", "itp-local-np", "http", tcp, 8080, local("10.244.1.10"), remote("10.244.2.10")),
		slice("fid", "affinity", "http", tcp, 8080, local("10.244.1.11"), remote("10.244.2.11")),
		slice("fid", "external-ip", "http", tcp, 8080, remote("10.244.2.12")),
		slice("fid", "lb-local-affinity", "http", tcp, 8080, local("10.244.1.13"), local("10.244.1.23"), remote("10.244.2.13")),
		slice("fid", "local-terminating", "http", tcp, 8080, terminatingLocal, remote("10.244.2.14")),
		slice("fid", "lb-host-scoped", "http", tcp, 8080, remote("10.244.2.16")),
	}
	return svcs, slices
}
