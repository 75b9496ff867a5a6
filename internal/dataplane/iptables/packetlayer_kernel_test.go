package iptables

import (
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// The eBPF mode's packet layer is handed every change, but serves only
// the ports with an external frontend: a change to a ClusterIP-only
// Service runs no iptables-restore and leaves the rules as they are; one
// that gives a Service an external frontend, changes one, or takes it
// away is written.
func TestKernelExternalOnlySkipsWhatItDoesNotServe(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			ns := nodeNS(t)
			d := open(t, Config{Backend: b, NetNS: ns, ExternalOnly: true})
			node := model.NodeInfo{AllLocalAddresses: true}
			internal := sp("internal", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")
			web := sp("web", "http", model.TCP, "10.96.0.2:80", "10.244.1.2:8080")
			web.External.NodePort = 30080
			withNode := func(s *model.Snapshot) *model.Snapshot { s.Node = node; return s }
			mustSync(t, d, withNode(snap(true, internal, web)))
			saved := saveTables(t, ns, b)

			steps := []struct {
				name  string
				snap  *model.Snapshot
				write bool
			}{
				{"an endpoint of a ClusterIP-only Service", withNode(snap(false,
					sp("internal", "http", model.TCP, "10.96.0.1:80", "10.244.1.9:8080"))), false},
				{"a ClusterIP-only Service removed", withNode(&model.Snapshot{Services: map[model.ServiceName][]model.ServicePort{
					internal.Name.ServiceName: nil}}), false},
				{"an endpoint of a node port's Service", withNode(snap(false, func() model.ServicePort {
					w := sp("web", "http", model.TCP, "10.96.0.2:80", "10.244.1.7:8080")
					w.External.NodePort = 30080
					return w
				}())), true},
				{"a node port added", withNode(snap(false, func() model.ServicePort {
					i := internal
					i.External.NodePort = 30081
					return i
				}())), true},
				{"a node port removed", withNode(snap(false, internal)), true},
				{"the node changed", func() *model.Snapshot {
					s := snap(false, sp("other", "http", model.TCP, "10.96.0.3:80", "10.244.1.3:8080"))
					s.Node = model.NodeInfo{}
					return s
				}(), true},
			}
			for _, st := range steps {
				before := d.restores
				mustSync(t, d, st.snap)
				if wrote := d.restores != before; wrote != st.write {
					t.Errorf("%s: ran iptables-restore %v, want %v", st.name, wrote, st.write)
				}
				if !st.write {
					if diff := lineDiff(rulesAndChains(saved), rulesAndChains(saveTables(t, ns, b))); diff != "" {
						t.Errorf("%s: the rules changed:\n%s", st.name, diff)
					}
				}
				saved = saveTables(t, ns, b)
			}
		})
	}
}
