package behaviour

import (
	"context"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// A dual-stack node runs both families' datapaths at once, each fed by a
// Tracker of its family from the same API objects, as a dual-stack proxy
// (kube-proxy's, ours) does. A Service created SingleStack IPv4 is served
// on its IPv4 ClusterIP only; made dual-stack, on both ClusterIPs, each by
// the endpoints of its family; made SingleStack again, on the IPv4 one
// only, the IPv6 one no longer served.
func TestDualStackServiceBothClusterIPs(t *testing.T) {
	v4, v6 := ipFamilies[0], ipFamilies[1]
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			s4 := newTopology(t, v4, 2)
			s6 := *s4
			s6.fam, s6.vip = v6, v6.ip(vip)
			// The pods get their IPv6 addresses (the servers their IPv6
			// listeners), the IPv6 Service range a way to the network.
			s4.client.AddAddress(v6.ip("10.244.0.100"))
			for _, p := range s4.pods {
				p.AddAddress(v6.ip(p.IP.String()))
				p.Start(false, testnet.Helper("serve", p.Name, "tcp6:8080", "udp6:5353")...)
			}
			s4.net.RouteToPod(v6.prefix(serviceCIDR).String(), s4.net.AddPod("world6", v6.ip("10.244.254.1")))
			dp4, dp6 := m.openBoth(t, s4, &s6)

			trackers := map[dataplane.Dataplane]*model.Tracker{
				dp4: model.NewTracker(model.WithFamily(model.IPv4)),
				dp6: model.NewTracker(model.WithFamily(model.IPv6)),
			}
			full := true
			// apply feeds both Trackers the objects, as the watch does,
			// and syncs each datapath with its Tracker's snapshot.
			apply := func(objs ...any) {
				t.Helper()
				for dp, tr := range trackers {
					for _, o := range objs {
						switch o := o.(type) {
						case *v1.Service:
							tr.UpsertService(o)
						case *discoveryv1.EndpointSlice:
							tr.UpsertEndpointSlice(o)
						case deletedSlice:
							tr.DeleteEndpointSlice(o.EndpointSlice)
						}
					}
					if err := dp.Sync(context.Background(), tr.Snapshot(full)); err != nil {
						t.Fatalf("sync of the %v datapath: %v", tr.Family(), err)
					}
				}
				full = false
			}

			ports := []discoveryv1.EndpointPort{apitest.SlicePort("http", v1.ProtocolTCP, 8080), apitest.SlicePort("dns", v1.ProtocolUDP, 5353)}
			slice4 := apitest.Slice("default", "web", "web-ipv4", ports, apitest.Ready(s4.pods[0].IPOf(true).String()), apitest.Ready(s4.pods[1].IPOf(true).String()))
			slice6 := apitest.Slice("default", "web", "web-ipv6", ports, apitest.Ready(s4.pods[0].IPOf(false).String()), apitest.Ready(s4.pods[1].IPOf(false).String()))
			slice6.AddressType = discoveryv1.AddressTypeIPv6
			svc := func(dual bool) *v1.Service {
				s := apitest.Service("default", "web", vip, apitest.Port("http", v1.ProtocolTCP, 80, 8080), apitest.Port("dns", v1.ProtocolUDP, 53, 5353))
				policy := v1.IPFamilyPolicySingleStack
				s.Spec.IPFamilies = []v1.IPFamily{v1.IPv4Protocol}
				if dual {
					policy = v1.IPFamilyPolicyPreferDualStack
					s.Spec.IPFamilies = append(s.Spec.IPFamilies, v1.IPv6Protocol)
					s.Spec.ClusterIPs = append(s.Spec.ClusterIPs, s6.vip)
				}
				s.Spec.IPFamilyPolicy = &policy
				return s
			}
			all := names(s4.pods)
			served := func(t *testing.T, s *setup, what string) {
				t.Helper()
				expectOK(t, what+": TCP", s.run(t, "tcp", s.at(vip, 80), "6"), all...)
				lines := s.run(t, "udp", s.at(vip, 53), "2")
				expectOK(t, what+": UDP", lines, all...)
			}
			notServed := func(t *testing.T, s *setup, what string) {
				t.Helper()
				expectFail(t, what, s.run(t, "tcp", s.at(vip, 80), "1"))
			}

			// The EndpointSlice controller keeps a slice per family of
			// the Service's.
			apply(svc(false), slice4)
			served(t, s4, "SingleStack, IPv4 ClusterIP")
			notServed(t, &s6, "SingleStack: the IPv6 address")

			apply(svc(true), slice6)
			served(t, s4, "dual-stack, IPv4 ClusterIP")
			served(t, &s6, "dual-stack, IPv6 ClusterIP")

			apply(svc(false), deletedSlice{slice6})
			served(t, s4, "back to SingleStack, IPv4 ClusterIP")
			notServed(t, &s6, "back to SingleStack: the IPv6 ClusterIP")
		})
	}
}

// deletedSlice is an EndpointSlice deletion, for apply.
type deletedSlice struct{ *discoveryv1.EndpointSlice }
