// Package apitest builds Service and EndpointSlice objects for tests and
// the demo, in the shape the API server and the EndpointSlice controller
// give them.
package apitest

import (
	"fmt"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Service is a ClusterIP Service with the given ports.
func Service(ns, name, clusterIP string, ports ...v1.ServicePort) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.ServiceSpec{
			Type:       v1.ServiceTypeClusterIP,
			ClusterIP:  clusterIP,
			ClusterIPs: []string{clusterIP},
			Ports:      ports,
		},
	}
}

// Port is a Service port whose target port is targetPort.
func Port(name string, proto v1.Protocol, port, targetPort int32) v1.ServicePort {
	return v1.ServicePort{Name: name, Protocol: proto, Port: port, TargetPort: intstr.FromInt32(targetPort)}
}

// Slice is an IPv4 EndpointSlice of Service ns/svc.
func Slice(ns, svc, name string, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns,
			Name:      name,
			Labels:    map[string]string{discoveryv1.LabelServiceName: svc, discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io"},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       ports,
		Endpoints:   eps,
	}
}

// SlicePort is an EndpointSlice port.
func SlicePort(name string, proto v1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port}
}

// Ready is an endpoint that is ready and serving.
func Ready(addr string) discoveryv1.Endpoint { return endpoint(addr, true, true, false) }

// Terminating is an endpoint of a pod being deleted that still serves.
func Terminating(addr string) discoveryv1.Endpoint { return endpoint(addr, false, true, true) }

func endpoint(addr string, ready, serving, terminating bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
	}
}

// ReadyRange is n ready endpoints from base.0.1 upward, for large services.
func ReadyRange(base string, n int) []discoveryv1.Endpoint {
	out := make([]discoveryv1.Endpoint, n)
	for i := range n {
		out[i] = Ready(fmt.Sprintf("%s.%d.%d", base, i/250, i%250+1))
	}
	return out
}
