package ebpf

import (
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
)

// The word of kbp_node, as lb.c reads it (struct node_config): the node's
// network namespace cookie in the low 56 bits, flags in the high byte.
const (
	nodeCookieMask = 1<<56 - 1
	// nodeHostNetNSOnly confines socket-level load balancing to the
	// node's network namespace (Config.HostNetNSOnly).
	nodeHostNetNSOnly = 1 << 63
)

// nodeWord is kbp_node's entry for a cookie and the configuration.
func nodeWord(cookie uint64, hostNetNSOnly bool) uint64 {
	w := cookie & nodeCookieMask
	if hostNetNSOnly {
		w |= nodeHostNetNSOnly
	}
	return w
}

// nodeCookie is the cookie of the node's network namespace (path, or this
// process's), which the programs compare sockets' with: only sockets there
// reach loopback frontends, since 127.0.0.1 in a pod is the pod's own, and
// with HostNetNSOnly only they are load-balanced at all. 0 if it cannot be
// read, which is said in the log: no socket is then in the node's
// namespace, a loopback node port address is not served at socket level,
// and with HostNetNSOnly the node's own sockets go to the packet layer's
// rules as pods' do.
func nodeCookie(path string) uint64 {
	cookie, err := netnsCookie(path)
	if err != nil {
		klog.ErrorS(err, "Cannot tell the node's network namespace to the BPF programs: "+
			"node ports on loopback addresses are not served to sockets")
		return 0
	}
	if cookie&^nodeCookieMask != 0 {
		// Never seen: the kernel counts namespaces from 1.
		klog.ErrorS(nil, "The node's network namespace cookie does not fit in 56 bits: "+
			"node ports on loopback addresses are not served to sockets", "cookie", cookie)
		return 0
	}
	return cookie
}

// pinnedConfined reports whether the programs already serve the node's
// namespace only: the previous run had HostNetNSOnly, and its packet
// layer's ClusterIP rules are in place.
func pinnedConfined(m *ebpf.Map) bool {
	var v lbNodeConfig
	if err := m.Lookup(uint32(0), &v); err != nil {
		return false
	}
	return v.NetnsCookie&nodeHostNetNSOnly != 0
}

// writeNodeWord writes kbp_node's word. It is written at every start, so
// a restart with the other --bpf-socket-lb-host-netns-only takes effect
// there, or, for confining, once the packet layer serves pods' ClusterIPs
// (Dataplane.ConfineToNodeNetNS).
func writeNodeWord(m *ebpf.Map, cookie uint64, confined bool) error {
	if err := m.Put(uint32(0), lbNodeConfig{NetnsCookie: nodeWord(cookie, confined)}); err != nil {
		return fmt.Errorf("writing the node's network namespace for the BPF programs: %w", err)
	}
	return nil
}

// netnsCookie is the cookie of the network namespace at path (this
// process's if empty), as bpf_get_netns_cookie() gives it to the programs:
// read from a socket made there (SO_NETNS_COOKIE, Linux 5.14).
func netnsCookie(path string) (uint64, error) {
	var cookie uint64
	read := func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14): %w", err)
		}
		return nil
	}
	if path == "" {
		return cookie, read()
	}
	return cookie, netnsenter.Do(path, read)
}
