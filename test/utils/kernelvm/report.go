package kernelvm

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Outcome is what one test did on one kernel.
type Outcome string

const (
	Pass Outcome = "pass"
	Fail Outcome = "FAIL"
	Skip Outcome = "skip"
	// Degraded: the test passed, and logged that its feature works in a
	// degraded way on this kernel (DegradedMarker).
	Degraded Outcome = "degraded"
)

// DegradedMarker starts the line a feature test logs (t.Logf) when the
// feature works on the kernel, but degraded:
//
//	KBP-FEATURE <name> degraded: <reason>
//
// where <name> is the subtest's name.
const DegradedMarker = "KBP-FEATURE "

// TestResult is one test or subtest in `go test -v` output.
type TestResult struct {
	// Name is the full name, e.g. "TestKernelFeatures/connect4".
	Name    string
	Outcome Outcome
	// Reasons are the degraded markers' reasons.
	Reasons []string
}

var (
	resultLine   = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) \(`)
	switchLine   = regexp.MustCompile(`^=== (?:RUN|NAME|CONT|PAUSE)\s+(\S+)$`)
	degradedLine = regexp.MustCompile(regexp.QuoteMeta(DegradedMarker) + `(\S+) degraded: (.*)$`)
)

// ParseTestOutput reads the results of `go test -v` (or a test binary's
// -test.v) output, in the order they were reported. A degraded marker turns
// its passing test into Degraded; a marker naming no test that ran becomes a
// Degraded result of its own, so that it is not lost.
func ParseTestOutput(out string) []TestResult {
	var results []TestResult
	index := map[string]int{}
	type marker struct{ feature, reason string }
	var markers []marker
	for line := range strings.Lines(out) {
		line = strings.TrimRight(line, "\r\n")
		if m := resultLine.FindStringSubmatch(line); m != nil {
			o := map[string]Outcome{"PASS": Pass, "FAIL": Fail, "SKIP": Skip}[m[1]]
			if i, ok := index[m[2]]; ok {
				results[i].Outcome = o
				continue
			}
			index[m[2]] = len(results)
			results = append(results, TestResult{Name: m[2], Outcome: o})
			continue
		}
		if m := degradedLine.FindStringSubmatch(line); m != nil {
			markers = append(markers, marker{m[1], strings.TrimSpace(m[2])})
		}
	}
	for _, mk := range markers {
		i := slices.IndexFunc(results, func(r TestResult) bool {
			return r.Name == mk.feature || strings.HasSuffix(r.Name, "/"+mk.feature)
		})
		if i < 0 {
			index[mk.feature] = len(results)
			results = append(results, TestResult{Name: mk.feature, Outcome: Degraded})
			i = len(results) - 1
		}
		results[i].Reasons = append(results[i].Reasons, mk.reason)
		if results[i].Outcome == Pass {
			results[i].Outcome = Degraded
		}
	}
	return results
}

// Leaves are the results a table shows: tests without subtests, and a
// failed test whose subtests all passed (it failed around them).
func Leaves(results []TestResult) []TestResult {
	var out []TestResult
	for _, r := range results {
		children := slices.DeleteFunc(slices.Clone(results), func(c TestResult) bool {
			return !strings.HasPrefix(c.Name, r.Name+"/")
		})
		if len(children) == 0 || r.Outcome == Fail && !slices.ContainsFunc(children, func(c TestResult) bool { return c.Outcome == Fail }) {
			out = append(out, r)
		}
	}
	return out
}

// FailureOutput returns the lines a test printed in -v output: from its
// "=== RUN" (or NAME, CONT) line to its "--- FAIL" (or SKIP) line, or until
// another test's output starts; at most max of them: the first and the last,
// which hold a failed load's error and the verifier's verdict.
func FailureOutput(out, name string, max int) string {
	var lines []string
	ours := func(test string) bool { return test == name || strings.HasPrefix(test, name+"/") }
	in := false
	for line := range strings.Lines(out) {
		trimmed := strings.TrimSpace(line)
		if m := switchLine.FindStringSubmatch(trimmed); m != nil {
			in = ours(m[1])
		} else if m := resultLine.FindStringSubmatch(line); m != nil && !ours(m[2]) {
			in = false
		}
		if in {
			lines = append(lines, strings.TrimRight(line, "\n"))
		}
		if m := resultLine.FindStringSubmatch(line); m != nil && m[2] == name {
			in = false
		}
	}
	if len(lines) > max {
		head := max / 4
		omitted := len(lines) - max
		lines = slices.Concat(lines[:head], []string{fmt.Sprintf("\t... (%d lines omitted)", omitted)}, lines[head+omitted:])
	}
	return strings.Join(lines, "\n")
}

// Row is one kernel's line in the matrix table.
type Row struct {
	Kernel Kernel
	// Release is uname -r as the VM reported it (Kernel.Release if empty).
	Release string
	Results []TestResult
	// Err is why the kernel has no (or not all) results: the VM did not
	// boot, timed out, or the test binary failed outside any test.
	Err        string
	Boot, Test time.Duration
}

// Table renders the rows as a markdown table, kernels by tests, with the
// degraded reasons and errors listed under it.
func Table(rows []Row) string {
	var columns []string
	for _, row := range rows {
		for _, r := range Leaves(row.Results) {
			if !slices.Contains(columns, r.Name) {
				columns = append(columns, r.Name)
			}
		}
	}
	var b strings.Builder
	b.WriteString("| kernel | uname -r | package | boot | tests |")
	for _, c := range columns {
		fmt.Fprintf(&b, " %s |", columnLabel(c))
	}
	b.WriteString("\n|---|---|---|---|---|" + strings.Repeat("---|", len(columns)) + "\n")
	var notes []string
	for _, row := range rows {
		release := row.Release
		if release == "" {
			release = row.Kernel.Release
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |", row.Kernel.Name, release, row.Kernel.Package, seconds(row.Boot), seconds(row.Test))
		for _, c := range columns {
			i := slices.IndexFunc(row.Results, func(r TestResult) bool { return r.Name == c })
			if i < 0 {
				b.WriteString(" - |")
				continue
			}
			r := row.Results[i]
			fmt.Fprintf(&b, " %s |", r.Outcome)
			for _, reason := range r.Reasons {
				notes = append(notes, fmt.Sprintf("- %s, %s: degraded: %s", row.Kernel.Name, columnLabel(c), reason))
			}
		}
		b.WriteString("\n")
		if row.Err != "" {
			notes = append(notes, fmt.Sprintf("- %s: %s", row.Kernel.Name, row.Err))
		}
	}
	if len(notes) > 0 {
		b.WriteString("\n" + strings.Join(notes, "\n") + "\n")
	}
	return b.String()
}

// columnLabel drops the top-level test's name from a subtest's.
// A "|" would end the markdown cell.
func columnLabel(name string) string {
	if _, sub, ok := strings.Cut(name, "/"); ok {
		name = sub
	}
	return strings.ReplaceAll(name, "|", `\|`)
}

func seconds(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}
