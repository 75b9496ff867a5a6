// Package doctable reads the Markdown tables of the project's docs, so that
// tests can hold a table (the flags, the metrics) equal to the code. The
// format is kept simple on purpose, for rows edited by hand: a table is
// found by its header line, each row is split on "|", and the names in a
// cell are its `code` spans.
package doctable

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// Rows returns the rows of every table of the doc at path (relative to the
// repository's root) whose header line is exactly header, each row as its
// trimmed cells, separator rows left out. It fails the test if the doc has
// no such table.
func Rows(t testing.TB, path, header string) [][]string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root(t), path))
	if err != nil {
		t.Fatalf("reading the doc: %v", err)
	}
	var rows [][]string
	in, found := false, false
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == header:
			in, found = true, true
		case in && (strings.HasPrefix(line, "|---") || strings.HasPrefix(line, "| ---")):
		case in && strings.HasPrefix(line, "|"):
			cells := strings.Split(strings.Trim(line, "|"), "|")
			for i := range cells {
				cells[i] = strings.TrimSpace(cells[i])
			}
			rows = append(rows, cells)
		default:
			in = false
		}
	}
	if !found {
		t.Fatalf("%s has no table with the header %q", path, header)
	}
	return rows
}

var codeSpan = regexp.MustCompile("`([^`]*)`")

// CodeSpans returns the contents of the `code` spans of a cell, in order.
func CodeSpans(cell string) []string {
	var out []string
	for _, m := range codeSpan.FindAllStringSubmatch(cell, -1) {
		out = append(out, m[1])
	}
	return out
}

// root is the repository's root: the nearest directory above the test's
// own holding go.mod.
func root(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}
