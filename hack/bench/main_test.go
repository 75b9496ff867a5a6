package main

import "testing"

func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		quick bool
		args  []string
		want  string
	}{
		{false, []string{"--kube-bin", "/x"}, "make bench"},
		{true, []string{"--kube-bin=/x", "--quick"}, "make bench QUICK=1"},
		{true, []string{"--kube-bin", "/x", "--quick", "--sizes=0,10"}, "QUICK=1 hack/bench.sh --sizes=0,10"},
		{false, []string{"--contenders", "ebpf"}, "hack/bench.sh --contenders ebpf"},
	} {
		if got := commandLine(tc.quick, tc.args); got != tc.want {
			t.Errorf("commandLine(%v, %q) = %q, want %q", tc.quick, tc.args, got, tc.want)
		}
	}
}
