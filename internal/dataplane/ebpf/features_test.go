package ebpf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEffectiveCapabilities(t *testing.T) {
	for _, c := range []struct {
		name   string
		status string
		want   uint64
		err    bool
	}{
		{name: "DaemonSet's BPF, PERFMON, NET_ADMIN, NET_RAW", status: "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000003000\n", want: 1<<capBPF | 1<<capPerfmon | 1<<capNetAdmin | 1<<13},
		{name: "root", status: "CapEff:\t000001ffffffffff\n", want: 0x1ffffffffff},
		{name: "none", status: "CapEff:\t0000000000000000\n", want: 0},
		{name: "no CapEff line", status: "Name:\tx\n", err: true},
		{name: "garbage", status: "CapEff:\tzz\n", err: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "status")
			if err := os.WriteFile(path, []byte(c.status), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := effectiveCapabilities(path)
			if (err != nil) != c.err || got != c.want {
				t.Errorf("effectiveCapabilities = %#x, %v; want %#x, error %v", got, err, c.want, c.err)
			}
		})
	}
}

func TestKernelDegraded(t *testing.T) {
	if d := (Kernel{SetRetval: true, KtimeCoarse: true, NetnsCookie: true}).Degraded(); len(d) != 0 {
		t.Errorf("the newest kernel degrades %v", d)
	}
	// 5.10: neither bpf_set_retval nor SO_NETNS_COOKIE; the exact clock
	// instead of the coarse one is no loss of function.
	d := (Kernel{}).Degraded()
	if len(d) != 2 || !strings.Contains(d[0], "EPERM") || !strings.Contains(d[1], "loopback") {
		t.Errorf("5.10 degrades %q, want the EPERM refusals and loopback node ports", d)
	}
}
