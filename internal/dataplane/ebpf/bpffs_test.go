package ebpf

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMountOf(t *testing.T) {
	const mountinfo = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
25 22 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/bpf rw,nosuid shared:12 - bpf bpf rw,mode=700
900 22 0:50 / /var/lib/kubelet/pods/x/volumes rw master:12 - tmpfs tmpfs rw
901 22 0:51 / /host\040dir rw - tmpfs tmpfs rw
902 22 0:52 / /both rw shared:40 master:12 - tmpfs tmpfs rw
903 22 0:53 / /sys/fs/bpf rw,nosuid master:12 - bpf bpf rw,mode=700
`
	for _, tc := range []struct {
		name, path string
		want       mountEntry
	}{
		{"the root", "/etc/kube", mountEntry{point: "/", shared: true}},
		{"a slave volume", "/var/lib/kubelet/pods/x/volumes/bpf", mountEntry{point: "/var/lib/kubelet/pods/x/volumes", slave: true}},
		{"a private mount, escaped name", "/host dir/a", mountEntry{point: "/host dir"}},
		{"shared and slave", "/both", mountEntry{point: "/both", shared: true, slave: true}},
		// A later mount on the same point hides the earlier one.
		{"the last of two on one point", "/sys/fs/bpf/kube-bpf-proxy", mountEntry{point: "/sys/fs/bpf", slave: true}},
		{"a prefix that is not a parent", "/system", mountEntry{point: "/", shared: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := mountOf(strings.NewReader(mountinfo), tc.path)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("mountOf(%q) = %+v, want %+v", tc.path, got, tc.want)
			}
		})
	}
}

func TestCheckMountVisible(t *testing.T) {
	for _, tc := range []struct {
		name             string
		m                mountEntry
		initialNS, known bool
		ok               bool
	}{
		{"shared, in a container (Bidirectional)", mountEntry{point: "/sys/fs/bpf", shared: true}, false, true, true},
		{"slave, in a container (HostToContainer)", mountEntry{point: "/sys/fs/bpf", slave: true}, false, true, false},
		{"private, in a container (None)", mountEntry{point: "/sys/fs/bpf"}, false, true, false},
		{"private, on the node itself", mountEntry{point: "/"}, true, true, true},
		{"slave, on the node itself", mountEntry{point: "/", slave: true}, true, true, true},
		{"slave, namespace unknown", mountEntry{point: "/sys/fs/bpf", slave: true}, false, false, false},
		{"private, namespace unknown", mountEntry{point: "/"}, false, false, true},
		{"shared, namespace unknown", mountEntry{point: "/", shared: true}, false, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkMountVisible("/sys/fs/bpf", tc.m, tc.initialNS, tc.known)
			if (err == nil) != tc.ok {
				t.Errorf("checkMountVisible = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

// ensureBPFFSHelper runs ensureBPFFS on its argument and prints "mounted"
// or the error: run in a mount namespace of its own.
func ensureBPFFSHelper(args []string) error {
	if err := ensureBPFFS(args[0]); err != nil {
		fmt.Println("refused:", err)
		return nil
	}
	if !onBPFFS(filepath.Dir(args[0])) {
		return fmt.Errorf("ensureBPFFS succeeded but %s is no bpffs", filepath.Dir(args[0]))
	}
	fmt.Println("mounted")
	return nil
}

// In a container whose /sys/fs/bpf is a hostPath volume with
// HostToContainer propagation (a slave mount), a bpffs the proxy mounted
// would die with the container, pins and datapath with it: it must refuse
// and say what to do. Where the mount propagates, it mounts. Each case runs
// in a mount namespace of its own, gone with its process.
func TestKernelBPFFSMountOnlyWhereItPropagates(t *testing.T) {
	testnet.Require(t)
	// unshare's namespace is not the node's, as a container's is not: a
	// private mount there dies with it, which the proxy can tell where it
	// can read PID 1's namespace (not in every sandbox).
	private := "refused: no bpffs on"
	if _, known := inInitialMountNamespace(); !known {
		private = "mounted"
	}
	for _, tc := range []struct {
		name  string
		setup string // shell, in the new mount namespace; $D is a fresh directory
		want  string
	}{
		{"shared mount", `mount -t tmpfs none $D && mount --make-shared $D`, "mounted"},
		{"private mount", `mount -t tmpfs none $D && mount --make-private $D`, private},
		{"slave of the host's mount (HostToContainer)",
			`mkdir $D/host $D/vol && mount -t tmpfs none $D/host && mount --make-shared $D/host && ` +
				`mount --bind $D/host $D/vol && mount --make-slave $D/vol && mkdir $D/vol/bpf && D=$D/vol`,
			"refused: no bpffs on"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			helper := strings.Join(testnet.Helper("ensure-bpffs", "$D/bpf/kube-bpf-proxy"), " ")
			script := fmt.Sprintf("set -e; D=%s; %s; %s", dir, tc.setup, helper)
			out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script).CombinedOutput()
			if err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("got %q, want %q", out, tc.want)
			}
			if strings.HasPrefix(tc.want, "refused") && !strings.Contains(string(out), "Mount bpffs on the node") {
				t.Errorf("the refusal does not say what to do: %q", out)
			}
			if entries, _ := os.ReadDir(dir); len(entries) > 2 {
				t.Logf("left in the test directory (removed with it): %v", entries)
			}
		})
	}
}
