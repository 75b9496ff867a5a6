package localcluster

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// A container's command may name the image's binary under either of its
// paths; any other program is refused, not run from the host.
func TestContainerCommandRefusesUnknownPrograms(t *testing.T) {
	for _, command := range [][]string{{"/bin/sh", "-c", "true"}, {"kube-proxy"}} {
		ctr := &corev1.Container{Name: "kube-proxy", Command: command}
		var c Cluster
		_, _, err := c.containerCommand(context.Background(), containerRun{pod: podRef{ctr: ctr, spec: &corev1.PodSpec{}}})
		if err == nil || !strings.Contains(err.Error(), "is not simulated") {
			t.Errorf("command %q: error %v, want it refused", command, err)
		}
	}
}

// A configMap volume whose mount point this machine lacks is made in an
// overlay of its nearest existing parent, before the bind.
func TestMountScriptCreatesMissingTargets(t *testing.T) {
	staging := t.TempDir()
	target := filepath.Join(t.TempDir(), "var", "lib", "kube-proxy")
	script := mountScript(staging, "", []mount{{source: "/cm/kube-proxy", target: target, readOnly: true, createTarget: true}})
	parent := filepath.Dir(filepath.Dir(filepath.Dir(target)))
	for _, want := range []string{
		"mount -n -t overlay overlay -o 'lowerdir=" + parent + ",upperdir=" + staging + "/.overlay-0/upper,workdir=" + staging + "/.overlay-0/work' '" + parent + "'",
		"mkdir -p '" + target + "'\nmount -n --rbind '/cm/kube-proxy' '" + target + "'\nmount -n -o remount,bind,ro '" + target + "'",
	} {
		if !strings.Contains(script, want) {
			t.Errorf("script lacks %q:\n%s", want, script)
		}
	}
}
