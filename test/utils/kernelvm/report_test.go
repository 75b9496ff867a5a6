package kernelvm

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// sample is `go test -v` output as a test binary prints it in a VM: a
// feature test with subtests (one degraded, one failed, one skipped), a
// plain test, log lines and a verifier log in between.
const sample = `=== RUN   TestKernelFeatures
=== RUN   TestKernelFeatures/load
=== RUN   TestKernelFeatures/connect4
=== RUN   TestKernelFeatures/affinity
    features_test.go:40: KBP-FEATURE affinity degraded: bpf_ktime_get_coarse_ns is 5.11+, uses bpf_ktime_get_ns
=== RUN   TestKernelFeatures/connect6
    features_test.go:52: loading datapath: load program: invalid argument:
        	460: (85) call unknown#187
        	invalid func unknown#187
=== RUN   TestKernelFeatures/recvmsg6
    features_test.go:60: no IPv6 on this kernel
--- FAIL: TestKernelFeatures (3.21s)
    --- PASS: TestKernelFeatures/load (0.50s)
    --- PASS: TestKernelFeatures/connect4 (1.10s)
    --- PASS: TestKernelFeatures/affinity (0.80s)
    --- FAIL: TestKernelFeatures/connect6 (0.20s)
    --- SKIP: TestKernelFeatures/recvmsg6 (0.00s)
=== RUN   TestKernelCountsTranslationsAndRefusals
I1205 03:48:14.210216     115 bpffs.go:39] "Mounted bpffs, it was not mounted"
--- PASS: TestKernelCountsTranslationsAndRefusals (2.00s)
FAIL
`

func TestParseTestOutput(t *testing.T) {
	got := ParseTestOutput(sample)
	want := []TestResult{
		{Name: "TestKernelFeatures", Outcome: Fail},
		{Name: "TestKernelFeatures/load", Outcome: Pass},
		{Name: "TestKernelFeatures/connect4", Outcome: Pass},
		{Name: "TestKernelFeatures/affinity", Outcome: Degraded, Reasons: []string{"bpf_ktime_get_coarse_ns is 5.11+, uses bpf_ktime_get_ns"}},
		{Name: "TestKernelFeatures/connect6", Outcome: Fail},
		{Name: "TestKernelFeatures/recvmsg6", Outcome: Skip},
		{Name: "TestKernelCountsTranslationsAndRefusals", Outcome: Pass},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%+v\nwant\n%+v", got, want)
	}
}

func TestParseTestOutputMarkerWithoutTest(t *testing.T) {
	got := ParseTestOutput("    x_test.go:1: KBP-FEATURE sockops degraded: no such hook\n--- PASS: TestX (0.00s)\n")
	want := []TestResult{
		{Name: "TestX", Outcome: Pass},
		{Name: "sockops", Outcome: Degraded, Reasons: []string{"no such hook"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func TestLeaves(t *testing.T) {
	for _, c := range []struct {
		name    string
		results []TestResult
		want    []string
	}{{
		name:    "a parent with a failed subtest is left out",
		results: ParseTestOutput(sample),
		want: []string{"TestKernelFeatures/load", "TestKernelFeatures/connect4", "TestKernelFeatures/affinity",
			"TestKernelFeatures/connect6", "TestKernelFeatures/recvmsg6", "TestKernelCountsTranslationsAndRefusals"},
	}, {
		name:    "a parent that failed around passing subtests is kept",
		results: []TestResult{{Name: "T", Outcome: Fail}, {Name: "T/a", Outcome: Pass}},
		want:    []string{"T", "T/a"},
	}, {
		name:    "a prefix is not a parent",
		results: []TestResult{{Name: "TestA", Outcome: Pass}, {Name: "TestAB", Outcome: Pass}},
		want:    []string{"TestA", "TestAB"},
	}} {
		t.Run(c.name, func(t *testing.T) {
			var got []string
			for _, r := range Leaves(c.results) {
				got = append(got, r.Name)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("got %v, want %v", got, c.want)
			}
		})
	}
}

func TestFailureOutput(t *testing.T) {
	got := FailureOutput(sample, "TestKernelFeatures/connect6", 60)
	for _, want := range []string{"=== RUN   TestKernelFeatures/connect6", "invalid func unknown#187"} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in\n%s", want, got)
		}
	}
	if strings.Contains(got, "affinity") || strings.Contains(got, "recvmsg6") {
		t.Errorf("another test's lines in\n%s", got)
	}
	long := "=== RUN   TestL\n" + strings.Repeat("    line\n", 100) + "    verdict\n--- FAIL: TestL (1.00s)\n"
	got = FailureOutput(long, "TestL", 20)
	lines := strings.Split(got, "\n")
	if len(lines) != 21 || !strings.Contains(got, "(83 lines omitted)") || lines[19] != "    verdict" {
		t.Errorf("cut to 20 lines: got %d lines:\n%s", len(lines), got)
	}
}

func TestTable(t *testing.T) {
	old := Kernel{Name: "bullseye-5.10", Package: "linux-image-5.10.0-32-amd64 5.10.223-1", Release: "5.10.0-32-amd64"}
	cur := Kernel{Name: "trixie-6.12", Package: "linux-image-6.12.117+deb13-amd64 6.12.117-1", Release: "6.12.117+deb13-amd64"}
	got := Table([]Row{
		{Kernel: old, Release: "5.10.0-32-amd64", Results: ParseTestOutput(sample), Boot: 6500 * time.Millisecond, Test: 61 * time.Second},
		{Kernel: cur, Err: "killed the VM after 10m0s"},
	})
	want := `| kernel | uname -r | package | boot | tests | load | connect4 | affinity | connect6 | recvmsg6 | TestKernelCountsTranslationsAndRefusals |
|---|---|---|---|---|---|---|---|---|---|---|
| bullseye-5.10 | 5.10.0-32-amd64 | linux-image-5.10.0-32-amd64 5.10.223-1 | 6.5 s | 61.0 s | pass | pass | degraded | FAIL | skip | pass |
| trixie-6.12 | 6.12.117+deb13-amd64 | linux-image-6.12.117+deb13-amd64 6.12.117-1 | - | - | - | - | - | - | - | - |

- bullseye-5.10, affinity: degraded: bpf_ktime_get_coarse_ns is 5.11+, uses bpf_ktime_get_ns
- trixie-6.12: killed the VM after 10m0s
`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestMatrixReadsKernelList(t *testing.T) {
	names, err := Matrix("../../../hack/kernels.list")
	if err != nil {
		t.Fatal(err)
	}
	if len(names) < 3 {
		t.Errorf("hack/kernels.list has %v, want 5.10, 6.1 and a current kernel at least", names)
	}
	bad := filepath.Join(t.TempDir(), "list")
	if err := os.WriteFile(bad, []byte("# comment\nbullseye-5.10 bullseye\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Matrix(bad); err == nil {
		t.Error("a line without its package: no error")
	}
}
