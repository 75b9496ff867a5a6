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
	// The next address after the current one that the slice does not
	// hold yet: an endpoint moves, none is duplicated.
	inSlice := map[string]bool{}
	for _, e := range s.Endpoints {
		for _, a := range e.Addresses {
			inSlice[a] = true
		}
	}
	start := 0
	for j, a := range addrs {
		if a == cur {
			start = j
		}
	}
	next := netip.Addr{}
	for k := 1; k <= len(addrs); k++ {
		if a := addrs[(start+k)%len(addrs)]; !inSlice[a.String()] {
			next = a
			break
		}
	}
	if !next.IsValid() {
		return nil // every address is in use: nothing can move
	}
	s.Endpoints[0].Addresses = []string{next.String()}
	if _, err := c.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating slice %s: %w", name, err)
	}
	return nil
}
