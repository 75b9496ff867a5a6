package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// `kube-bpf-proxy inspect` reaches the inspect command, flags and exit
// statuses included (internal/inspect tests the command itself).
func TestInspectSubcommand(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		args     []string
		wantCode int
		want     string
	}{
		{[]string{"inspect", "--mode=ipvs"}, 2, `unknown --mode "ipvs"`},
		{[]string{"inspect", "--help"}, 0, "Exit status: 0 when the datapath holds what the API server says"},
		{[]string{"inspect", "--mode=ebpf", "--bpffs-path=" + t.TempDir(), "--kubeconfig=" + unreachableKubeconfig(t)}, 3, "reading the eBPF datapath"},
	} {
		cmd := exec.Command(exe, tt.args...)
		cmd.Env = append(os.Environ(), runMainEnv+"=1")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		_ = cmd.Run()
		if code := cmd.ProcessState.ExitCode(); code != tt.wantCode || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("kube-bpf-proxy %q: exit %d, stderr %q; want %d and %q", tt.args, code, stderr.String(), tt.wantCode, tt.want)
		}
	}
}
