package ociimage

import (
	"os"
	"path/filepath"
	"testing"
)

// Build takes the repository as the e2e tests name it, relative to their
// package's directory ("../.."), and runs its hack/image.sh there.
func TestBuildRelativeRepo(t *testing.T) {
	repo := t.TempDir()
	if err := os.MkdirAll(filepath.Join(repo, "hack"), 0o755); err != nil {
		t.Fatal(err)
	}
	script := "#!/bin/sh\nmkdir -p _output && : > _output/kube-bpf-proxy-image.tar\n"
	if err := os.WriteFile(filepath.Join(repo, "hack/image.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	// As from test/e2e.
	pkg := filepath.Join(repo, "test/e2e")
	if err := os.MkdirAll(pkg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Chdir(pkg)
	rel := "../.."
	got, err := Build(rel)
	if err != nil {
		t.Fatalf("Build(%q): %v", rel, err)
	}
	if want := filepath.Join(repo, "_output/kube-bpf-proxy-image.tar"); got != want {
		t.Errorf("Build(%q) = %q, want %q", rel, got, want)
	}
}
