package bench

import (
	"context"
	"fmt"
	"net/netip"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// ChurnOne rotates the endpoints of background Service i by one address
// among addrs, as a rolling update moves a pod: the slice keeps its size,
// one address changes.
func ChurnOne(ctx context.Context, c kubernetes.Interface, ns string, i int, addrs []netip.Addr) error {
	name := backgroundName(i)
	s, err := c.DiscoveryV1().EndpointSlices(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading slice %s: %w", name, err)
	}
	if len(s.Endpoints) == 0 || len(s.Endpoints[0].Addresses) == 0 || len(addrs) == 0 {
		return nil
	}
	cur, err := netip.ParseAddr(s.Endpoints[0].Addresses[0])
	if err != nil {
		return fmt.Errorf("slice %s: %w", name, err)
	}
	next := addrs[0]
	for j, a := range addrs {
		if a == cur {
			next = addrs[(j+len(s.Endpoints))%len(addrs)]
			break
		}
	}
	s.Endpoints[0].Addresses = []string{next.String()}
	if _, err := c.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating slice %s: %w", name, err)
	}
	return nil
}
