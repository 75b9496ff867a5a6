#!/bin/busybox sh
# shellcheck shell=dash
# PID 1 of a kernel test VM (see kernelvm.go; hack/kernels.sh puts this file
# into each kernel's initramfs as /init, with busybox-static and the 9p
# modules). It mounts the host's root filesystem, shared read-only over
# virtio-9p, at /host with writable tmpfs where tests write, chroots into it
# to run the command that Run left in the shared directory, writes the
# command's output and exit status next to it, and powers off.
#
# Kernel command line (set by Run):
#   kbp_dir=PATH      the host directory shared read-write as "kbpdir", mounted
#                     at the same path; it holds .kernelvm/cmd, where the
#                     results go
#   kbp_kernel=PATH   the kernel's unpacked package on the host, whose
#                     modules modprobe loads (veth, netfilter, ...)
/bin/busybox mkdir -p /proc /sys /dev /bin /sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
/bin/busybox ln -s /bin/busybox /sbin/modprobe
export PATH=/bin:/sbin

fail() {
  echo "kernelvm init: $*"
  echo "KBP-VM-INIT-FAILED"
  poweroff -f
}

mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case "$arg" in
    kbp_dir=*) dir="${arg#kbp_dir=}" ;;
    kbp_kernel=*) kernel="${arg#kbp_kernel=}" ;;
  esac
done
if [ -z "${dir:-}" ] || [ -z "${kernel:-}" ]; then
  fail "kbp_dir= and kbp_kernel= are needed on the kernel command line"
fi

while read -r m; do
  insmod "/lib/modules/$m" || fail "insmod $m"
done < /lib/modules/load

# The root, read-only; cache=loose spares a round trip to the host per
# lookup (the files do not change while the VM runs).
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /host \
  || fail "mounting the host root over 9p"

# Writable places: temporary directories, /run (ip netns add writes
# /run/netns, iptables /run/xtables.lock; /var/run links to it on Debian).
for d in /tmp /var/tmp /run; do
  [ -d "/host$d" ] && { mount -t tmpfs -o mode=1777 tmpfs "/host$d" || fail "tmpfs on $d"; }
done
mount -t proc proc /host/proc || fail "proc"
mount -t sysfs sysfs /host/sys || fail "sysfs"
mount -t devtmpfs devtmpfs /host/dev || fail "devtmpfs"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
# The tests find the cgroup2 mount in /proc/self/mountinfo and make their
# cgroups under it; the datapath pins under a bpffs.
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || fail "cgroup2"
mount -t bpf bpf /host/sys/fs/bpf || fail "bpffs"
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null

# The kernel asks /sbin/modprobe (in this initramfs: the kernel's usermode
# helpers run in its root, not in the chroot) for modules on demand: busybox
# modprobe, over the kernel package's own module tree.
release="$(uname -r)"
mkdir -p "/lib/modules/$release"
mount -o bind,ro "/host$kernel/root/lib/modules/$release" "/lib/modules/$release" \
  || fail "modules of $release under $kernel"
echo /sbin/modprobe > /proc/sys/kernel/modprobe
# iptables-legacy runs modprobe itself for these, and finds none in the
# chroot: the host's /lib/modules has no modules of this kernel.
modprobe -a ip_tables ip6_tables 2>/dev/null

mkdir -p "/host$dir" || fail "mkdir $dir"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 kbpdir "/host$dir" || fail "mounting $dir over 9p"
out="/host$dir/.kernelvm"
[ -f "$out/cmd" ] || fail "no $dir/.kernelvm/cmd"

hostname kernelvm
ip link set lo up
uname -r > "$out/release"
cut -d' ' -f1 /proc/uptime > "$out/booted"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root TERM=dumb /bin/sh "$dir/.kernelvm/cmd" > "$out/output" 2>&1 < /dev/null
echo "$?" > "$out/status"
cut -d' ' -f1 /proc/uptime > "$out/finished"
sync
poweroff -f
