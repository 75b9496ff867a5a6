package localcluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// containerRun is one container of a pod about to be started, and where
// the pod's kubelet-made files go.
type containerRun struct {
	pod podRef
	// binary is the image's entrypoint.
	binary string
	// extraArgs follow the container's args.
	extraArgs []string
	// tokenTTL is the life of the ServiceAccount token (default 24 h):
	// nothing renews it, unlike a kubelet.
	tokenTTL time.Duration
	// saDir receives the ServiceAccount volume's files; staging is an
	// empty directory where the container's /run is assembled.
	saDir, staging string
}

// imageMount is where a container that runs as another user than root
// finds its entrypoint: the binary's directory on this machine may be
// closed to that user (a test's temporary directory is 0700), as it never
// is in an image.
const imageMount = "/run/kube-bpf-proxy.local-image"

// containerCommand returns the command line and environment with which the
// kubelet and the runtime would start the container, to be run in the
// pod's network namespace (the node's, for hostNetwork):
//
//	unshare --mount --propagation slave   the container's mount namespace
//	sh -c MOUNTS                          ServiceAccount volume and hostPath mounts
//	setpriv --bounding-set=... --reuid=…  its capabilities, no_new_privs and user
//	ENTRYPOINT ARGS                       the container's args ($(VAR) expanded)
//
// with the environment the kubelet gives the container.
func (c *Cluster) containerCommand(ctx context.Context, r containerRun) (cmd, env []string, err error) {
	ctr := r.pod.ctr
	if len(ctr.Command) > 0 {
		return nil, nil, fmt.Errorf("container %s: its command %q replaces the image's entrypoint, which is not simulated", ctr.Name, ctr.Command)
	}
	if real, err := filepath.EvalSymlinks("/var/run"); err != nil || real != "/run" {
		return nil, nil, fmt.Errorf("this machine's /var/run is not a link to /run, where the ServiceAccount volume is mounted (%q, %v)", real, err)
	}
	if env, err = c.podEnv(ctx, r.pod); err != nil {
		return nil, nil, err
	}
	saDir := ""
	if at := r.pod.spec.AutomountServiceAccountToken; at == nil || *at {
		ttl := r.tokenTTL
		if ttl == 0 {
			ttl = 24 * time.Hour
		}
		if err := os.MkdirAll(r.saDir, 0o755); err != nil {
			return nil, nil, err
		}
		if err := c.serviceAccountVolume(ctx, r.pod, r.saDir, ttl); err != nil {
			return nil, nil, err
		}
		saDir = r.saDir
	}
	mounts, rewrite, err := podMounts(r.pod)
	if err != nil {
		return nil, nil, err
	}
	if err := os.MkdirAll(r.staging, 0o755); err != nil {
		return nil, nil, err
	}
	entrypoint := r.binary
	if _, _, nonRoot := runAs(ctr); nonRoot {
		entrypoint = filepath.Join(imageMount, filepath.Base(r.binary))
		mounts = append(mounts, mount{source: r.binary, target: entrypoint, readOnly: true})
	}
	vars := envMap(env)
	args := make([]string, 0, len(ctr.Args)+len(r.extraArgs))
	for _, a := range ctr.Args {
		args = append(args, expand(a, vars))
	}
	args = append(rewriteArgs(args, rewrite), r.extraArgs...)

	cmd = []string{"unshare", "--mount", "--propagation", "slave", "--",
		"sh", "-c", mountScript(r.staging, saDir, mounts), "sh"}
	cmd = append(cmd, capabilityPrefix(ctr)...)
	cmd = append(cmd, entrypoint)
	cmd = append(cmd, args...)
	return cmd, env, nil
}
