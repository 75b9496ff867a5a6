package main

import "testing"

func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		quick, large bool
		args         []string
		want         string
	}{
		{false, false, []string{"--kube-bin", "/x"}, "make bench"},
		{true, false, []string{"--kube-bin=/x", "--quick"}, "make bench QUICK=1"},
		{true, false, []string{"--kube-bin", "/x", "--quick", "--sizes=0,10"}, "QUICK=1 hack/bench.sh --sizes=0,10"},
		{false, false, []string{"--contenders", "ebpf"}, "hack/bench.sh --contenders ebpf"},
		{false, true, []string{"--kube-bin=/x", "--large"}, "make bench LARGE=1"},
		{false, true, []string{"--large", "--contenders=ebpf"}, "LARGE=1 hack/bench.sh --contenders=ebpf"},
	} {
		if got := commandLine(tc.quick, tc.large, tc.args); got != tc.want {
			t.Errorf("commandLine(%v, %v, %q) = %q, want %q", tc.quick, tc.large, tc.args, got, tc.want)
		}
	}
}
