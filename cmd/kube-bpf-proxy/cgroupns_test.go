package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/cgroups"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// In a container with a cgroup namespace of its own (an unprivileged pod on
// a cgroup v2 node, and some runtimes' privileged ones), the cgroup2 mount
// the eBPF mode attaches to by default is the container's own cgroup:
// programs there would serve the pod's sockets only, while the node looks
// served. Without --cgroup-path the proxy refuses, naming the fix, and
// attaches nothing. The "container" here is the test's own cgroup, entered
// and made the root of a new cgroup namespace with a cgroup2 mount of its
// own, as a runtime makes one.
func TestEBPFRefusesCgroupNamespaceRoot(t *testing.T) {
	n := testnet.New(t)
	mount, err := cgroups.Cgroup2Mount()
	if err != nil {
		t.Skip(err)
	}
	pod := filepath.Join(n.Cgroup, "pod")
	if err := os.Mkdir(pod, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(pod) })
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b := &binary{healthz: testnet.FreeAddr(t), metrics: testnet.FreeAddr(t)}
	script := `echo $$ > "$1/cgroup.procs" && exec unshare --cgroup --mount --propagation private -- sh -c 'umount -l "$0" && mount -t cgroup2 none "$0" && exec "$@"' "$2" "$3" "${@:4}"`
	b.cmd = exec.Command("bash", "-c", script, "bash", pod, mount, exe,
		"--kubeconfig="+unreachableKubeconfig(t), "--hostname-override=test-node",
		"--bpffs-path="+testnet.BPFFS(t), "--bpf-service-ports-max=64", "--bpf-backend-slots-max=256", "--bpf-sock-revnat-max=256",
		"--healthz-bind-address="+b.healthz, "--metrics-bind-address="+b.metrics)
	b.cmd.Env = append(os.Environ(), runMainEnv+"=1")
	b.cmd.Stderr = &b.stderr
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testnet.Stop(b.cmd) })
	if code := b.wait(t, 30*time.Second); code != 1 {
		t.Errorf("exit status %d, want 1; log:\n%s", code, b.stderr.String())
	}
	if !strings.Contains(b.stderr.String(), "is not the node's root cgroup") || !strings.Contains(b.stderr.String(), "--cgroup-path") {
		t.Errorf("log does not say the cgroup is a namespace's and to pass --cgroup-path:\n%s", b.stderr.String())
	}
	if got := testnet.AttachedPrograms(t, pod); got != 0 {
		t.Errorf("%d programs attached to the container's cgroup", got)
	}
}
