package apiserver

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
)

func TestConnection(t *testing.T) {
	tests := []struct {
		name       string
		conn       Connection
		wantErr    string
		wantAccept string
	}{
		{"default", DefaultConnection(), "", ContentTypeProtobuf + "," + ContentTypeJSON},
		{"JSON", Connection{ContentType: ContentTypeJSON, QPS: 5, Burst: 10}, "", ContentTypeJSON},
		{"no limit", Connection{ContentType: ContentTypeProtobuf, QPS: -1}, "", ContentTypeProtobuf + "," + ContentTypeJSON},
		{"empty content type", Connection{QPS: 5, Burst: 10}, "--kube-api-content-type is empty", ""},
		{"CBOR", Connection{ContentType: "application/cbor", QPS: 5, Burst: 10}, `unknown --kube-api-content-type "application/cbor"`, ""},
		{"negative burst", Connection{ContentType: ContentTypeJSON, QPS: -1, Burst: -1}, "--kube-api-burst -1: want 0 or more", ""},
		{"burst 0 with a limit", Connection{ContentType: ContentTypeJSON, QPS: 1}, "--kube-api-burst 0: want at least 1", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.conn.Validate()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("Validate() = %v, want an error saying %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Validate() = %v", err)
			}
			var cfg rest.Config
			tt.conn.Apply(&cfg)
			if cfg.ContentType != tt.conn.ContentType || cfg.AcceptContentTypes != tt.wantAccept || cfg.QPS != tt.conn.QPS || cfg.Burst != tt.conn.Burst {
				t.Errorf("Apply: ContentType %q, AcceptContentTypes %q, QPS %v, Burst %d; want %q, %q, %v, %d",
					cfg.ContentType, cfg.AcceptContentTypes, cfg.QPS, cfg.Burst, tt.conn.ContentType, tt.wantAccept, tt.conn.QPS, tt.conn.Burst)
			}
		})
	}
}

// BenchmarkDecodeList decodes what a cold node lists, 20000 Services and
// 20000 EndpointSlices of three endpoints, in each content type: the
// client's share of the initial list, without the API server's.
//
//	go test -run '^$' -bench DecodeList -benchmem ./internal/apiserver/
func BenchmarkDecodeList(b *testing.B) {
	const n = 20000
	svcs := &v1.ServiceList{}
	eps := &discoveryv1.EndpointSliceList{}
	for i := range n {
		name := fmt.Sprintf("svc-%05d", i)
		meta := metav1.ObjectMeta{Namespace: "load", Name: name, ResourceVersion: fmt.Sprint(1000 + i),
			UID: "0b5e6f4e-8c2a-4f5e-9a55-5b3c0d5f0000", Labels: map[string]string{"app": "load"}}
		svcs.Items = append(svcs.Items, v1.Service{ObjectMeta: meta, Spec: v1.ServiceSpec{
			Type: v1.ServiceTypeClusterIP, ClusterIP: fmt.Sprintf("10.96.%d.%d", i/250, i%250+1),
			Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80}}}})
		pname, proto, port, ready := "http", v1.ProtocolTCP, int32(8080), true
		s := discoveryv1.EndpointSlice{ObjectMeta: meta, AddressType: discoveryv1.AddressTypeIPv4,
			Ports: []discoveryv1.EndpointPort{{Name: &pname, Protocol: &proto, Port: &port}}}
		s.Name += "-1"
		s.Labels = map[string]string{discoveryv1.LabelServiceName: name}
		for j := range 3 {
			node := fmt.Sprintf("node%d", j%2+1)
			s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.%d.%d.%d", 128+j, i/250, i%250+1)},
				Conditions: discoveryv1.EndpointConditions{Ready: &ready}, NodeName: &node})
		}
		eps.Items = append(eps.Items, s)
	}
	for _, ct := range []string{ContentTypeProtobuf, ContentTypeJSON} {
		info, ok := runtime.SerializerInfoForMediaType(scheme.Codecs.SupportedMediaTypes(), ct)
		if !ok {
			b.Fatalf("no serializer for %s", ct)
		}
		var encoded [][]byte
		for _, obj := range []runtime.Object{svcs, eps} {
			var buf bytes.Buffer
			gv := v1.SchemeGroupVersion
			if _, ok := obj.(*discoveryv1.EndpointSliceList); ok {
				gv = discoveryv1.SchemeGroupVersion
			}
			if err := scheme.Codecs.EncoderForVersion(info.Serializer, gv).Encode(obj, &buf); err != nil {
				b.Fatal(err)
			}
			encoded = append(encoded, buf.Bytes())
		}
		// What client-go decodes with: conversion-free, as the typed
		// clients' NegotiatedSerializer.
		decoder := scheme.Codecs.WithoutConversion().DecoderToVersion(info.Serializer, nil)
		b.Run(ct[strings.LastIndex(ct, "/")+1:], func(b *testing.B) {
			for b.Loop() {
				for _, data := range encoded {
					if _, _, err := decoder.Decode(data, nil, nil); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(len(encoded[0])+len(encoded[1]))/(1<<20), "MiB")
		})
	}
}
