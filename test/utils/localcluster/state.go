package localcluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// state is everything a cluster made that `down` must remove, written to
// the cluster directory after every change, so that another process (the
// CLI's `down` after `up` has exited) can find it.
type state struct {
	Name string `json:"name"`
	// Cgroup is the cluster's cgroup v2 directory; every process the
	// cluster starts lives in a child of it.
	Cgroup     string           `json:"cgroup"`
	Namespaces []string         `json:"namespaces"`
	Mounts     []string         `json:"mounts"`
	Nodes      []NodeInfo       `json:"nodes"`
	Pods       map[string]*pod  `json:"pods"`
	Procs      map[string]*proc `json:"procs"`
	// Image is the image the cluster's containers run from, if any.
	Image *Image `json:"image,omitempty"`
	// Stack is the cluster's IP families (Options.Stack).
	Stack Stack `json:"stack,omitempty"`
}

// NodeInfo describes one simulated node.
type NodeInfo struct {
	Name string `json:"name"`
	// NetNS is the node's network namespace (under /run/netns).
	NetNS string `json:"netns"`
	// IP is the node's InternalIP, on its link to the other nodes: of
	// the cluster's primary family.
	IP string `json:"ip"`
	// IPs are its InternalIPs, one per family of the cluster's stack, IP
	// first (AllIPs, IPOf).
	IPs []string `json:"ips,omitempty"`
	// PodCIDR is its spec.podCIDR, PodCIDRs its spec.podCIDRs: one per
	// family, PodCIDR first (AllPodCIDRs).
	PodCIDR  string   `json:"podCIDR"`
	PodCIDRs []string `json:"podCIDRs,omitempty"`
	Zone     string   `json:"zone"`
	// Cgroup holds the node's pod processes: the proxy's eBPF programs
	// attach here, as they attach to the cgroup root on a real node.
	Cgroup string `json:"cgroup"`
	// BPFFS is a bpffs mount of the node's own, for the proxy's pins.
	BPFFS string `json:"bpffs"`
	// NetNSDir is the node's /run/netns: a shared mount holding a bind of
	// each of its pods' network namespaces, and no one else's, as a
	// container runtime pins them on a real node.
	NetNSDir string `json:"netnsDir"`
	// XtablesLock is the node's /run/xtables.lock: a file of its own, as
	// every real node has, so that one node's long iptables restore does
	// not hold the other nodes' off (they would all share this machine's
	// /run/xtables.lock).
	XtablesLock string `json:"xtablesLock,omitempty"`
	// NextHost is the host part of the next pod address.
	NextHost int `json:"nextHost"`
}

// pod is a pod's network namespace and process.
type pod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Node      string `json:"node"`
	NetNS     string `json:"netns"`
	// IP is the pod's address of the primary family, IPs one per family
	// (IP first).
	IP     string   `json:"ip"`
	IPs    []string `json:"ips,omitempty"`
	HostIf string   `json:"hostIf"`
	Proc   *proc    `json:"proc,omitempty"`
}

const stateFile = "state.json"

// withState runs f on the state under an exclusive lock on the cluster
// directory and saves it afterwards, also when f fails part way: what was
// created before the failure must still be removed by down.
func withState(dir string, f func(*state) error) error {
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("locking %s: %w", dir, err)
	}
	st, err := readState(dir)
	if err != nil {
		return err
	}
	ferr := f(st)
	if err := writeState(dir, st); err != nil {
		return errors.Join(ferr, err)
	}
	return ferr
}

func readState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return &state{Pods: map[string]*pod{}, Procs: map[string]*proc{}}, nil
	}
	if err != nil {
		return nil, err
	}
	st := &state{}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, stateFile), err)
	}
	if st.Pods == nil {
		st.Pods = map[string]*pod{}
	}
	if st.Procs == nil {
		st.Procs = map[string]*proc{}
	}
	return st, nil
}

func writeState(dir string, st *state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, stateFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, stateFile))
}

func (st *state) node(name string) (*NodeInfo, error) {
	for i := range st.Nodes {
		if st.Nodes[i].Name == name {
			return &st.Nodes[i], nil
		}
	}
	return nil, fmt.Errorf("no node %q in cluster %s", name, st.Name)
}
