package iptables

import (
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// --detect-local-mode by interface, on the real kernel: ClusterIP traffic
// that comes in on the pods' interfaces keeps its source, and any other
// (a client routed to the Service range from outside the cluster, or, for
// BridgeInterface, a pod whose veth is not on the bridge) is masqueraded
// to the node's address, so that the replies come back through the node.
// No cluster CIDR is given: the interface alone decides.
func TestKernelDetectLocalByInterface(t *testing.T) {
	for _, tc := range []struct {
		name  string
		local LocalTraffic
		// bridged: the client pod's veth is a port of the bridge "kbr0";
		// else it is a routed veth named veth<N>.
		bridged bool
	}{
		{"InterfaceNamePrefix", LocalByInterfacePrefix("veth"), false},
		{"BridgeInterface", LocalByBridge("kbr0"), true},
	} {
		for _, b := range backends {
			t.Run(tc.name+"/"+b, func(t *testing.T) {
				e := newExtEnv(t, b, Config{LocalTraffic: tc.local})
				e.sync(t, true, []*v1.Service{web()}, webSlice(local(e.podA.IP.String())))
				var pod *testnet.Pod
				if tc.bridged {
					pod = e.n.AddBridgedPod("bridged", "10.244.2.1", "kbr0")
				} else {
					pod = e.n.AddPod("pod-c", "10.244.1.3")
				}
				if got := tally(answers(t, pod, "10.96.0.80:80", 4)); got["pod-a src="+pod.IP.String()] != 4 {
					t.Errorf("a pod on the pods' interfaces: %v, want pod-a seeing %s every time (not masqueraded)", got, pod.IP)
				}
				if got := tally(answers(t, e.client, "10.96.0.80:80", 4)); got["pod-a src="+extMasqSrc] != 4 {
					t.Errorf("a client outside the cluster: %v, want pod-a seeing %s every time (masqueraded)", got, extMasqSrc)
				}
				if tc.bridged {
					// pod-b's veth is routed, not on the bridge.
					if got := tally(answers(t, e.podB, "10.96.0.80:80", 4)); got["pod-a src="+extMasqSrc] != 4 {
						t.Errorf("a pod off the bridge: %v, want pod-a seeing %s every time (masqueraded)", got, extMasqSrc)
					}
				}
			})
		}
	}
}
