package iptables

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
)

// The sysctls of the programmed network namespace this mode reads or sets,
// as kube-proxy does in its own.
const (
	// sysctlRouteLocalnet lets packets to 127.0.0.0/8 be routed rather
	// than dropped as martians once DNATed: node ports on localhost need
	// it (and KUBE-FIREWALL then guards it).
	sysctlRouteLocalnet = "net/ipv4/conf/all/route_localnet"
	// sysctlTCPBeLiberal makes conntrack mark only out-of-window RSTs as
	// INVALID; kube-proxy then does not drop INVALID packets.
	sysctlTCPBeLiberal = "net/netfilter/nf_conntrack_tcp_be_liberal"
)

// inNetNS runs fn in the network namespace at nsPath, or right here if it
// is empty. /proc/sys/net shows the namespace of the thread that opens it.
func inNetNS(nsPath string, fn func() error) error {
	if nsPath == "" {
		return fn()
	}
	return netnsenter.Do(nsPath, fn)
}

// readSysctl reads an integer sysctl of the namespace at nsPath.
func readSysctl(nsPath, name string) (int, error) {
	var v int
	err := inNetNS(nsPath, func() error {
		b, err := os.ReadFile(filepath.Join("/proc/sys", name))
		if err != nil {
			return err
		}
		v, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading sysctl %s: %w", name, err)
	}
	return v, nil
}

// ensureSysctl sets an integer sysctl of the namespace at nsPath unless it
// already has the value (so that a read-only /proc/sys is fine when nothing
// needs changing).
func ensureSysctl(nsPath, name string, value int) error {
	err := inNetNS(nsPath, func() error {
		path := filepath.Join("/proc/sys", name)
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(b)) == strconv.Itoa(value) {
			return nil
		}
		return os.WriteFile(path, []byte(strconv.Itoa(value)), 0o644)
	})
	if err != nil {
		return fmt.Errorf("setting sysctl %s to %d: %w", name, value, err)
	}
	return nil
}
