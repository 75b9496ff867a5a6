// Package report turns a benchmark run (test/bench/results) into a
// report directory: report.md (GitHub-renderable markdown with the tables
// and the targets' verdicts), SVG plots made with gonum.org/v1/plot, the raw
// samples as CSV so anyone can re-plot them, and results.json, from which
// Load rebuilds the Run so a report can be written again without measuring.
//
// Rendering is deterministic: contenders in results.AllContenders order,
// sizes ascending, never a map's order.
package report

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// File names in a report directory.
const (
	ReportFile      = "report.md"
	ResultsFile     = "results.json"
	LatencyCSV      = "latency.csv"
	RatesCSV        = "rates.csv"
	ControlPlaneCSV = "control-plane.csv"
	CellsCSV        = "cells.csv"
)

// Write writes dir/report.md, dir/*.csv, dir/*.svg and dir/results.json for
// r, creating dir if needed. results.json is written first, so a failure
// in the rendering still leaves the measurements behind.
func Write(dir string, r *results.Run) error {
	if r == nil {
		return fmt.Errorf("writing the report in %s: no run", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating the report directory: %w", err)
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the results: %w", err)
	}
	if err := writeFile(dir, ResultsFile, append(js, '\n')); err != nil {
		return err
	}
	ix := newIndex(r)
	for _, f := range []struct {
		name string
		fn   func(*index) [][]string
	}{
		{LatencyCSV, latencyRows},
		{RatesCSV, rateRows},
		{ControlPlaneCSV, controlPlaneRows},
		{CellsCSV, cellRows},
	} {
		var buf bytes.Buffer
		w := csv.NewWriter(&buf)
		if err := w.WriteAll(f.fn(ix)); err != nil {
			return fmt.Errorf("encoding %s: %w", f.name, err)
		}
		if err := writeFile(dir, f.name, buf.Bytes()); err != nil {
			return err
		}
	}
	plots, err := writePlots(dir, ix)
	if err != nil {
		return fmt.Errorf("writing the plots: %w", err)
	}
	var md bytes.Buffer
	if err := writeMarkdown(&md, ix, plots); err != nil {
		return fmt.Errorf("rendering %s: %w", ReportFile, err)
	}
	return writeFile(dir, ReportFile, md.Bytes())
}

func writeFile(dir, name string, data []byte) error {
	if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	return nil
}

// Load reads dir/results.json back.
func Load(dir string) (*results.Run, error) {
	path := filepath.Join(dir, ResultsFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the results: %w", err)
	}
	var r results.Run
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", path, err)
	}
	return &r, nil
}

// CSV headers. family (IPv4, IPv6) is last, so that readers of the
// columns before it are unchanged.
var (
	latencyHeader      = []string{"contender", "size", "workload", "rep", "target", "index", "microseconds", "family"}
	ratesHeader        = []string{"contender", "size", "workload", "rep", "target", "seconds", "ops", "errors", "node_cpu_seconds", "proxy_cpu_seconds", "family"}
	controlPlaneHeader = []string{"contender", "size", "metric", "index", "seconds", "family"}
	cellsHeader        = []string{"contender", "size", "skipped", "elapsed_seconds", "rss_bytes", "cpu_seconds", "family"}
)

// Control-plane metrics in control-plane.csv.
const (
	metricColdStart         = "cold-start"
	metricColdStartTimedOut = "cold-start-timed-out"
	metricBatchServed       = "batch-served"
	metricEndpointChange    = "endpoint-change"
	metricNetProgP50        = "network-programming-p50-estimate"
	metricNetProgP99        = "network-programming-p99-estimate"
)

func ff(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }

// csvCells is every cell of the run, in the order the run recorded them
// (raw data: nothing is merged or dropped).
func (ix *index) csvCells() []*results.Cell {
	out := make([]*results.Cell, len(ix.run.Cells))
	for i := range ix.run.Cells {
		out[i] = &ix.run.Cells[i]
	}
	return out
}

func latencyRows(ix *index) [][]string {
	rows := [][]string{latencyHeader}
	for _, c := range ix.csvCells() {
		size := strconv.Itoa(c.Size)
		for _, p := range c.Latency {
			for ri, rep := range p.Reps {
				for _, t := range []struct {
					name string
					s    []float64
				}{{results.TargetDirect, rep.Direct}, {results.TargetService, rep.Service}} {
					for i, v := range t.s {
						rows = append(rows, []string{c.Contender, size, p.Workload, strconv.Itoa(ri), t.name, strconv.Itoa(i), ff(v), results.FamilyOf(c.Family)})
					}
				}
			}
		}
	}
	return rows
}

func rateRows(ix *index) [][]string {
	rows := [][]string{ratesHeader}
	for _, c := range ix.csvCells() {
		for _, ph := range c.Rates {
			rows = append(rows, []string{c.Contender, strconv.Itoa(c.Size), ph.Workload, strconv.Itoa(ph.Rep), ph.Target,
				ff(ph.Seconds), strconv.FormatInt(ph.Ops, 10), strconv.FormatInt(ph.Errors, 10), ff(ph.NodeCPUSeconds), ff(ph.ProxyCPUSeconds), results.FamilyOf(c.Family)})
		}
	}
	return rows
}

func controlPlaneRows(ix *index) [][]string {
	rows := [][]string{controlPlaneHeader}
	for _, c := range ix.csvCells() {
		row := func(metric string, i int, sec float64) {
			rows = append(rows, []string{c.Contender, strconv.Itoa(c.Size), metric, strconv.Itoa(i), ff(sec), results.FamilyOf(c.Family)})
		}
		cp := c.ControlPlane
		switch {
		case cp.ColdStartTimedOut:
			row(metricColdStartTimedOut, 0, cp.ColdStart.Seconds())
		case cp.ColdStart > 0:
			row(metricColdStart, 0, cp.ColdStart.Seconds())
		}
		if cp.BatchServices > 0 {
			row(metricBatchServed, 0, cp.BatchServed.Seconds())
		}
		for i, d := range cp.EndpointChange {
			row(metricEndpointChange, i, d.Seconds())
		}
		if h := cp.NetworkProgramming; h != nil {
			if v, ok := histogramQuantile(0.5, h.Bounds, h.Buckets); ok {
				row(metricNetProgP50, 0, v)
			}
			if v, ok := histogramQuantile(0.99, h.Bounds, h.Buckets); ok {
				row(metricNetProgP99, 0, v)
			}
		}
	}
	return rows
}

func cellRows(ix *index) [][]string {
	rows := [][]string{cellsHeader}
	for _, c := range ix.csvCells() {
		rows = append(rows, []string{c.Contender, strconv.Itoa(c.Size), c.Skipped, ff(c.Elapsed.Seconds()),
			strconv.FormatInt(c.Proxy.RSSBytes, 10), ff(c.Proxy.CPUSeconds), results.FamilyOf(c.Family)})
	}
	return rows
}
