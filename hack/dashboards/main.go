// Command dashboards writes the Grafana dashboards and the alerting rules
// defined in hack/monitoring into manifests/monitoring (run from the
// repository's root: `go run ./hack/dashboards`). The files are committed
// for users to import; hack/monitoring's tests fail when they differ
// from what this writes.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/hack/monitoring"
)

func main() {
	out := flag.String("out", monitoring.Dir, "directory to write into")
	flag.Parse()
	files, err := monitoring.Render()
	if err != nil {
		fmt.Fprintln(os.Stderr, "dashboards:", err)
		os.Exit(1)
	}
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for k := range files {
			if !yield(k) {
				return
			}
		}
	}) {
		p := filepath.Join(*out, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "dashboards:", err)
			os.Exit(1)
		}
		if err := os.WriteFile(p, files[name], 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "dashboards:", err)
			os.Exit(1)
		}
		fmt.Println("wrote", p)
	}
}
