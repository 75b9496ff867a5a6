package ebpf

import (
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
)

// writeNodeNetNS tells the programs which network namespace is the node's
// (Config.NodeNetNS, or this process's): only sockets in it reach loopback
// frontends, since 127.0.0.1 in a pod is the pod's own. Without it, no
// socket does, which is said once in the log: a loopback node port address
// is then not served at socket level.
func writeNodeNetNS(m *ebpf.Map, path string) {
	cookie, err := netnsCookie(path)
	if err != nil {
		klog.ErrorS(err, "Cannot tell the node's network namespace to the BPF programs: "+
			"node ports on loopback addresses are not served to sockets")
		return
	}
	if err := m.Put(uint32(0), lbNodeConfig{NetnsCookie: cookie}); err != nil {
		klog.ErrorS(err, "Writing the node's network namespace for the BPF programs: "+
			"node ports on loopback addresses are not served to sockets")
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
