package watch

import (
	"fmt"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/scheme"
)

// BenchmarkDecodeList decodes, as the informers' lists do, the protobuf of
// n Services and n EndpointSlices of 10 endpoints shaped as the benchmark's
// bulk loader makes them (test/bench/scale.go), with the metadata an API
// server adds: the client's share of a cold node's list, without the API
// server's or the network's.
func BenchmarkDecodeList(b *testing.B) {
	for _, n := range []int{10000, 20000} {
		svcs, slices := listObjects(n, 10)
		s := protobuf.NewSerializer(scheme.Scheme, scheme.Scheme)
		svcData, err := runtime.Encode(s, svcs)
		if err != nil {
			b.Fatal(err)
		}
		sliceData, err := runtime.Encode(s, slices)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			for b.Loop() {
				for _, data := range [][]byte{svcData, sliceData} {
					if _, _, err := s.Decode(data, nil, nil); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(len(svcData)+len(sliceData))/(1<<20), "MiB")
		})
	}
}

func listObjects(n, eps int) (*v1.ServiceList, *discoveryv1.EndpointSliceList) {
	now := metav1.NewTime(time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC))
	meta := func(name string, i int, labels map[string]string) metav1.ObjectMeta {
		return metav1.ObjectMeta{
			Name: name, Namespace: "bench-bg", UID: types.UID(fmt.Sprintf("00000000-0000-0000-0000-%012d", i)),
			ResourceVersion: fmt.Sprint(1000 + i), CreationTimestamp: now, Labels: labels,
			ManagedFields: []metav1.ManagedFieldsEntry{{
				Manager: "bench", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1", Time: &now,
				FieldsType: "FieldsV1", FieldsV1: metav1.NewFieldsV1(`{"f:spec":{"f:ports":{".":{},"k:{\"port\":80,\"protocol\":\"TCP\"}":{".":{},"f:name":{},"f:port":{},"f:protocol":{},"f:targetPort":{}}},"f:selector":{},"f:type":{}}}`),
			}},
		}
	}
	svcs := &v1.ServiceList{TypeMeta: metav1.TypeMeta{Kind: "ServiceList", APIVersion: "v1"}}
	slices := &discoveryv1.EndpointSliceList{TypeMeta: metav1.TypeMeta{Kind: "EndpointSliceList", APIVersion: "discovery.k8s.io/v1"}}
	ready, serving, terminating := true, true, false
	port, portName, proto := int32(80), "tcp", v1.ProtocolTCP
	for i := range n {
		name := fmt.Sprintf("bg-%05d", i)
		ip := fmt.Sprintf("10.96.%d.%d", 4+i/256, i%256)
		svcs.Items = append(svcs.Items, v1.Service{
			ObjectMeta: meta(name, i, map[string]string{"kube-bpf-proxy.io/bench-set": "background"}),
			Spec: v1.ServiceSpec{
				Type: v1.ServiceTypeClusterIP, ClusterIP: ip, ClusterIPs: []string{ip},
				IPFamilies: []v1.IPFamily{v1.IPv4Protocol}, SessionAffinity: v1.ServiceAffinityNone,
				Ports: []v1.ServicePort{{Name: "tcp", Protocol: v1.ProtocolTCP, Port: 80}},
			},
		})
		sl := discoveryv1.EndpointSlice{
			ObjectMeta: meta(name, n+i, map[string]string{
				discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "bench", "kube-bpf-proxy.io/bench-set": "background",
			}),
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &portName, Protocol: &proto, Port: &port}},
		}
		for j := range eps {
			k := i*eps + j
			sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
				Addresses:  []string{fmt.Sprintf("10.%d.%d.%d", 128+k>>16, (k>>8)&255, k&255)},
				Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
			})
		}
		slices.Items = append(slices.Items, sl)
	}
	return svcs, slices
}
