package main

import (
	"flag"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/doctable"
)

// The user docs hold tables the code must match: the flags in
// docs/configuration.md, the metrics in docs/metrics.md. These tests fail
// when a flag or metric is added without its row, or a row outlives what
// it describes.
//
// The parsing is deliberately plain, so that a row is easy to add or
// rename by hand: a table is found by its header line, each row is split
// on "|", and the names in its first cell are its `code` spans.

const flagsDoc = "docs/configuration.md"

// TestFlagsTable checks docs/configuration.md's flag table against the
// flag set the binary parses: every flag has a row, every row names
// flags that exist, and a default other than the zero value ("", 0,
// false, 0s) is the first `code` span of the row's default cell. A zero
// default is free text, since the table says what it means ("in-cluster",
// "every node address"). Aliases may share a row: each `--name` span of
// the first cell is a flag.
func TestFlagsTable(t *testing.T) {
	var o options
	fs := newFlagSet(&o, io.Discard)
	documented := map[string]bool{}
	for _, row := range doctable.Rows(t, flagsDoc, "| flag | default | meaning |") {
		if len(row) != 3 {
			t.Errorf("%s: row %q has %d cells, want 3", flagsDoc, row, len(row))
			continue
		}
		var names []string
		for _, span := range doctable.CodeSpans(row[0]) {
			if name, ok := strings.CutPrefix(span, "--"); ok {
				names = append(names, name)
			}
		}
		if len(names) == 0 {
			t.Errorf("%s: row %q names no `--flag`", flagsDoc, row)
		}
		for _, name := range names {
			if documented[name] {
				t.Errorf("%s: --%s has two rows", flagsDoc, name)
			}
			documented[name] = true
			f := fs.Lookup(name)
			if f == nil {
				t.Errorf("%s documents --%s, which the binary does not have: remove its row", flagsDoc, name)
				continue
			}
			if isZeroDefault(f) {
				continue
			}
			spans := doctable.CodeSpans(row[1])
			if len(spans) == 0 || spans[0] != f.DefValue {
				t.Errorf("%s: the default of --%s is %q; its default cell %q must start with `%s`", flagsDoc, name, f.DefValue, row[1], f.DefValue)
			}
		}
	}
	fs.VisitAll(func(f *flag.Flag) {
		if !documented[f.Name] {
			t.Errorf("--%s (default %q: %s) has no row in %s's flag table", f.Name, f.DefValue, f.Usage, flagsDoc)
		}
	})
}

// isZeroDefault says whether f's default is its type's zero value.
func isZeroDefault(f *flag.Flag) bool {
	return slices.Contains([]string{"", "0", "0s", "false"}, f.DefValue)
}
