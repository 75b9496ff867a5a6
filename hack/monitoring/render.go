package monitoring

import (
	"fmt"
	"path"
)

// Dir is where the rendered files live, from the repository's root.
const Dir = "manifests/monitoring"

// Files of Dir that Render writes.
const (
	RulesFile          = "prometheus/kube-bpf-proxy-rules.yaml"
	PrometheusRuleFile = "prometheus-operator/prometheusrule.yaml"
	DashboardsDir      = "dashboards"
)

// Render returns every generated file by its path under Dir.
func Render() (map[string][]byte, error) {
	files := map[string][]byte{}
	rules, err := rulesFile()
	if err != nil {
		return nil, fmt.Errorf("rendering the rules file: %w", err)
	}
	files[RulesFile] = rules
	pr, err := prometheusRule()
	if err != nil {
		return nil, fmt.Errorf("rendering the PrometheusRule: %w", err)
	}
	files[PrometheusRuleFile] = pr
	ds, err := Dashboards()
	if err != nil {
		return nil, err
	}
	for _, d := range ds {
		files[path.Join(DashboardsDir, d.File)] = d.JSON
	}
	return files, nil
}
