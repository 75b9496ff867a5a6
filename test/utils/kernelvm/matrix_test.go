package kernelvm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// kernelTests selects the eBPF package's tests that run on every kernel of
// the matrix (a -test.run pattern); KBP_KERNEL_TESTS overrides it:
// TestKernelFeatures, one subtest per feature on one datapath;
// TestKernelHooksPerPath, which proves the hook each AF_INET6 path runs
// (the claims of bpf/lb.c's header) by the programs' run counts; and
// TestKernelRestartWithDaemonSetCapabilities, a restart with only the
// DaemonSet's capabilities, which older verifiers judge more strictly;
// and the IPv6 Services' tests (TestKernelIPv6*: ClusterIP over connect6,
// sendmsg6, recvmsg6 and getpeername6, affinity, a node port, refusals).
const kernelTests = `^(TestKernelFeatures|TestKernelHooksPerPath|TestKernelRestartWithDaemonSetCapabilities|TestKernelIPv6ClusterIP|TestKernelIPv6AffinityNodePortAndRefusals)$`

// perKernel bounds one VM: boot, the selected tests under TCG, power off.
// A kernel takes one to two minutes; three of them must fit in go test's
// timeout in hack/test.sh (20 minutes a package).
const perKernel = 6 * time.Minute

// TestKernelMatrix runs the selected kernel tests of internal/dataplane/ebpf
// on each kernel of hack/kernels.list that hack/kernels.sh has fetched, and
// fails unless every one of them passes on every kernel. Kernels that are
// missing are skipped, unless KBP_REQUIRE_KERNELS=1 (hack/test.sh, make
// kernels), where they fail. KBP_KERNELS_REPORT names a file for the
// markdown table of kernels by test; each kernel's whole output goes next to
// it (kernels-NAME.log).
func TestKernelMatrix(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the tests in the VMs load BPF programs (make test runs as root)")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 is missing (hack/deps.sh installs it)")
	}
	names, err := Matrix("../../../hack/kernels.list")
	if err != nil {
		t.Fatal(err)
	}
	require := os.Getenv("KBP_REQUIRE_KERNELS") == "1"
	var kernels []Kernel
	for _, name := range names {
		k, err := Find(CacheDir(), name)
		switch {
		case err == nil:
			kernels = append(kernels, k)
		case require:
			t.Errorf("%v", err)
		default:
			t.Logf("skipping %v", err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if len(kernels) == 0 {
		t.Skip("no kernel in " + CacheDir() + ": hack/kernels.sh --fetch fetches them")
	}
	selection := kernelTests
	if s := os.Getenv("KBP_KERNEL_TESTS"); s != "" {
		selection = s
	}

	dir := t.TempDir()
	bin := filepath.Join(dir, "ebpf.test")
	build := exec.Command(goCommand(), "test", "-c", "-o", bin, "./internal/dataplane/ebpf")
	build.Dir = "../../.."
	// Static: the binary runs on the host's root either way, but nothing
	// then depends on the VM resolving the host's dynamic loader.
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the eBPF package's tests: %v\n%s", err, out)
	}

	pkgDir, err := filepath.Abs("../../../internal/dataplane/ebpf")
	if err != nil {
		t.Fatal(err)
	}
	report := os.Getenv("KBP_KERNELS_REPORT")
	var rows []Row
	for _, k := range kernels {
		row := Row{Kernel: k}
		t.Run(k.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), perKernel)
			defer cancel()
			// In the package's directory, as go test runs it: tests read
			// testdata and sources relative to it.
			res, err := Run(ctx, k, Command{Shared: dir, Dir: pkgDir, Args: []string{bin, "-test.v", "-test.count=1",
				"-test.timeout=" + (perKernel - time.Minute).String(), "-test.run", selection}})
			if res != nil {
				row.Release, row.Boot, row.Test = res.Release, res.Boot, res.Command
				t.Logf("%s (%s, %s): boot %.1f s, tests %.1f s, qemu %.1f s in all",
					k.Name, k.Package, res.Release, res.Boot.Seconds(), res.Command.Seconds(), res.Wall.Seconds())
				if report != "" {
					log := filepath.Join(filepath.Dir(report), "kernels-"+k.Name+".log")
					if werr := os.WriteFile(log, res.Output, 0o644); werr != nil {
						t.Errorf("%v", werr)
					}
				}
			}
			if err != nil {
				row.Err = firstLine(err.Error())
				t.Fatal(err)
			}
			out := string(res.Output)
			row.Results = ParseTestOutput(out)
			if len(row.Results) == 0 {
				row.Err = fmt.Sprintf("no test ran (exit status %d)", res.ExitCode)
				t.Fatalf("no test matching %s ran (exit status %d):\n%s", selection, res.ExitCode, tail(res.Output, 40))
			}
			for _, r := range Leaves(row.Results) {
				switch r.Outcome {
				case Fail:
					t.Errorf("%s fails on %s:\n%s", r.Name, res.Release, FailureOutput(out, r.Name, 60))
				case Skip:
					t.Errorf("%s skipped on %s: every selected test must run on every kernel:\n%s", r.Name, res.Release, FailureOutput(out, r.Name, 60))
				case Degraded:
					t.Logf("%s degraded on %s: %s", r.Name, res.Release, strings.Join(r.Reasons, "; "))
				}
			}
			if t.Failed() && report != "" {
				t.Logf("the whole output: %s", filepath.Join(filepath.Dir(report), "kernels-"+k.Name+".log"))
			}
			if res.ExitCode != 0 && !slices.ContainsFunc(row.Results, func(r TestResult) bool { return r.Outcome == Fail }) {
				row.Err = fmt.Sprintf("the test binary exited with status %d", res.ExitCode)
				t.Errorf("%s:\n%s", row.Err, tail(res.Output, 40))
			}
		})
		rows = append(rows, row)
	}
	table := Table(rows)
	t.Logf("kernels by test (%s):\n%s", selection, table)
	if report != "" {
		if err := os.WriteFile(report, []byte(table), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// goCommand is the go command that runs this test: go test puts its own
// GOROOT/bin first on the PATH of the tests it runs.
func goCommand() string { return "go" }

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
