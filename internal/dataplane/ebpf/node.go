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

// writeNodeNetNS tells the programs which network namespace is the node's
// (Config.NodeNetNS, or this process's): only sockets in it reach loopback
// frontends, since 127.0.0.1 in a pod is the pod's own, and with
// hostNetNSOnly only they are load-balanced at all. Without the cookie, no
// socket is in it, which is said once in the log: a loopback node port
// address is then not served at socket level, and with hostNetNSOnly the
// node's own sockets go to the packet layer's rules as pods' do. The word
// is written at every start, so a restart with the other
// --bpf-socket-lb-host-netns-only takes effect at once.
func writeNodeNetNS(m *ebpf.Map, path string, hostNetNSOnly bool) {
	cookie, err := netnsCookie(path)
	if err != nil {
		klog.ErrorS(err, "Cannot tell the node's network namespace to the BPF programs: "+
			"node ports on loopback addresses are not served to sockets")
		cookie = 0
	} else if cookie&^nodeCookieMask != 0 {
		// Never seen: the kernel counts namespaces from 1.
		klog.ErrorS(nil, "The node's network namespace cookie does not fit in 56 bits: "+
			"node ports on loopback addresses are not served to sockets", "cookie", cookie)
		cookie = 0
	}
	if err := m.Put(uint32(0), lbNodeConfig{NetnsCookie: nodeWord(cookie, hostNetNSOnly)}); err != nil {
		klog.ErrorS(err, "Writing the node's network namespace for the BPF programs: "+
			"node ports on loopback addresses are not served to sockets")
		return
	}
	if hostNetNSOnly {
		klog.InfoS("Socket-level load balancing is confined to the node's network namespace: "+
			"pods' Service traffic is served by the packet layer's iptables rules", "flag", "--"+FlagHostNetNSOnly)
	}
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
