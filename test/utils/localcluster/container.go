package localcluster

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// imageBinaries are the paths of the proxy's binary in its image, which a
// container's command may name: its own, and kube-proxy's, which the image
// links to it so that kube-proxy's DaemonSets run it with only the image
// changed.
var imageBinaries = map[string]bool{
	"/usr/local/bin/kube-bpf-proxy": true,
	"/usr/local/bin/kube-proxy":     true,
}

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
// with the environment the kubelet gives the container. With Cluster.Image
// set, imageCommand runs it in the image's root filesystem instead.
func (c *Cluster) containerCommand(ctx context.Context, r containerRun) (cmd, env []string, err error) {
	ctr := r.pod.ctr
	// A command replaces the image's entrypoint (kubeadm's kube-proxy
	// DaemonSet names /usr/local/bin/kube-proxy, which the image links to
	// the binary): only the binary's own paths in the image are known here.
	var commandArgs []string
	if len(ctr.Command) > 0 && c.Image == nil {
		if !imageBinaries[ctr.Command[0]] {
			return nil, nil, fmt.Errorf("container %s: its command %q runs %s, which is not simulated (the image's %v are)", ctr.Name, ctr.Command, ctr.Command[0], slices.Sorted(maps.Keys(imageBinaries)))
		}
		commandArgs = ctr.Command[1:]
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
	volumeDirs, err := c.configMapVolumes(ctx, r.pod, filepath.Join(r.staging+"-volumes"))
	if err != nil {
		return nil, nil, err
	}
	mounts, rewrite, err := podMountsIn(r.pod, volumeDirs, c.Image != nil)
	if err != nil {
		return nil, nil, err
	}
	if c.Image != nil {
		return c.imageCommand(r, env, saDir, mounts)
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
	args := make([]string, 0, len(commandArgs)+len(ctr.Args)+len(r.extraArgs))
	for _, a := range slices.Concat(commandArgs, ctr.Args) {
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

// configMapVolumes writes, as the kubelet does, each configMap volume the
// container mounts into a directory of its own under dir (one file per
// key), and returns the directories by volume name.
func (c *Cluster) configMapVolumes(ctx context.Context, pr podRef, dir string) (map[string]string, error) {
	dirs := map[string]string{}
	for _, v := range pr.spec.Volumes {
		if v.ConfigMap == nil || !mountsVolume(pr.ctr, v.Name) {
			continue
		}
		cm, err := c.Client.CoreV1().ConfigMaps(pr.namespace).Get(ctx, v.ConfigMap.Name, metav1.GetOptions{})
		if err != nil {
			if v.ConfigMap.Optional != nil && *v.ConfigMap.Optional {
				cm = &corev1.ConfigMap{}
			} else {
				// The kubelet does not start the pod: FailedMount.
				return nil, fmt.Errorf("volume %q: ConfigMap %s/%s: %w", v.Name, pr.namespace, v.ConfigMap.Name, err)
			}
		}
		if len(v.ConfigMap.Items) > 0 {
			return nil, fmt.Errorf("volume %q: items of a configMap volume are not simulated", v.Name)
		}
		d := filepath.Join(dir, v.Name)
		if err := os.RemoveAll(d); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
		for k, val := range cm.Data {
			if err := os.WriteFile(filepath.Join(d, k), []byte(val), 0o644); err != nil {
				return nil, err
			}
		}
		for k, val := range cm.BinaryData {
			if err := os.WriteFile(filepath.Join(d, k), val, 0o644); err != nil {
				return nil, err
			}
		}
		dirs[v.Name] = d
	}
	return dirs, nil
}

func mountsVolume(ctr *corev1.Container, name string) bool {
	return slices.ContainsFunc(ctr.VolumeMounts, func(vm corev1.VolumeMount) bool { return vm.Name == name })
}

// Image is an unpacked image every container of the cluster runs from, as
// a runtime runs it (imageCommand): the tests and the demo run the proxy
// from the image hack/image.sh builds, not from the host's binary.
type Image struct {
	// Root is the unpacked root filesystem (ociimage.Unpack); it stays
	// as it is: each container gets an overlay of its own on top.
	Root string `json:"root"`
	// Entrypoint is the image config's.
	Entrypoint []string `json:"entrypoint"`
}

// imageCommand is containerCommand for a cluster with an Image: the
// container runs chrooted into a fresh overlay of the image's root
// filesystem, with what a runtime and the kubelet put there:
//
//	unshare --mount --propagation slave   the container's mount namespace
//	sh -c MOUNTS                          a fresh overlay of Image.Root; /proc
//	                                      (/proc/sys read-only), a read-only
//	                                      /sys, a minimal /dev, the
//	                                      ServiceAccount volume, the node's
//	                                      /etc/hosts and resolv.conf, the
//	                                      hostPath mounts where the pod says
//	chroot ROOT setpriv ... ENTRYPOINT    the image's entrypoint (or the
//	                                      container's command) and args; the
//	                                      image's own setpriv drops the
//	                                      capabilities (chroot needs one)
func (c *Cluster) imageCommand(r containerRun, env []string, saDir string, mounts []mount) (cmd, _ []string, err error) {
	ctr := r.pod.ctr
	vars := envMap(env)
	entrypoint := c.Image.Entrypoint
	if len(ctr.Command) > 0 {
		entrypoint = nil
		for _, a := range ctr.Command {
			entrypoint = append(entrypoint, expand(a, vars))
		}
	}
	if len(entrypoint) == 0 {
		return nil, nil, fmt.Errorf("container %s: the image has no entrypoint and the container no command", ctr.Name)
	}
	args := make([]string, 0, len(ctr.Args)+len(r.extraArgs))
	for _, a := range ctr.Args {
		args = append(args, expand(a, vars))
	}
	args = append(args, r.extraArgs...)
	// A fresh root filesystem for each start, as a runtime gives a
	// restarted container: made next to the staging directory, under the
	// cluster's directory.
	if err := os.MkdirAll(filepath.Dir(r.staging), 0o755); err != nil {
		return nil, nil, err
	}
	sc := ctr.SecurityContext
	privileged := sc != nil && sc.Privileged != nil && *sc.Privileged
	cmd = []string{"unshare", "--mount", "--propagation", "slave", "--",
		"sh", "-c", imageMountScript(c.Image.Root, r.staging+"-rootfs", saDir, mounts, privileged), "sh"}
	cmd = append(cmd, capabilityPrefix(ctr)...)
	cmd = append(cmd, entrypoint...)
	cmd = append(cmd, args...)
	return cmd, env, nil
}

// imageMountScript assembles the container's root filesystem in its mount
// namespace and chroots into it to run "$@".
func imageMountScript(image, base, saDir string, mounts []mount, privileged bool) string {
	q := shellQuote
	lines := []string{
		"set -e",
		"d=$(mktemp -d " + q(base+".XXXXXX") + ")",
		`mkdir "$d/upper" "$d/work" "$d/root"`,
		`r="$d/root"`,
		// -n: the machine's /run/mount/utab is none of this namespace's
		// business.
		"mount -n -t overlay overlay -o lowerdir=" + q(image) + `,upperdir="$d/upper",workdir="$d/work" "$r"`,
		`mkdir -p "$r/proc" "$r/sys" "$r/dev"`,
		`mount -n -t proc -o nosuid,nodev,noexec proc "$r/proc"`,
	}
	if privileged {
		lines = append(lines, `mount -n -t sysfs -o nosuid,nodev,noexec sysfs "$r/sys"`)
	} else {
		// As runc mounts them for a container that is not privileged.
		lines = append(lines,
			`mount -n -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"`,
			`mount -n --bind "$r/proc/sys" "$r/proc/sys"`,
			`mount -n -o remount,bind,ro "$r/proc/sys"`)
	}
	lines = append(lines,
		`mount -n -t tmpfs -o nosuid,mode=0755 tmpfs "$r/dev"`,
		`for n in null zero full random urandom tty; do touch "$r/dev/$n"; mount -n --bind "/dev/$n" "$r/dev/$n"; done`,
		`mkdir "$r/dev/shm" "$r/dev/pts"`,
		`mount -n -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$r/dev/shm"`,
		`ln -s /proc/self/fd "$r/dev/fd"`,
		// The kubelet gives a hostNetwork pod the node's hosts file, and
		// dnsPolicy Default the node's resolver.
		`for f in /etc/hosts /etc/resolv.conf; do if [ -f "$f" ]; then rm -f "$r$f"; touch "$r$f"; mount -n --bind "$f" "$r$f"; mount -n -o remount,bind,ro "$r$f"; fi; done`,
	)
	bind := func(source, target string, m mount) {
		if st, err := os.Stat(source); err == nil && !st.IsDir() {
			lines = append(lines, `mkdir -p "$r"`+q(filepath.Dir(target)), `[ -e "$r"`+q(target)+` ] || touch "$r"`+q(target))
		} else {
			lines = append(lines, `mkdir -p "$r"`+q(target))
		}
		lines = append(lines, "mount -n --rbind "+q(source)+` "$r"`+q(target))
		if m.readOnly {
			lines = append(lines, `mount -n -o remount,bind,ro "$r"`+q(target))
		}
		if m.hostToContainer {
			lines = append(lines, `mount -n --make-rslave "$r"`+q(target))
		}
	}
	if saDir != "" {
		bind(saDir, serviceAccountMount, mount{readOnly: true})
	}
	for _, m := range mounts {
		bind(m.source, m.target, m)
	}
	lines = append(lines, `cd /`, `exec env -u PWD -u OLDPWD chroot "$r" "$@"`)
	return strings.Join(lines, "\n")
}
