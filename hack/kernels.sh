#!/usr/bin/env bash
# Runs the eBPF datapath's kernel tests on the kernels users run (Debian's
# 5.10, 6.1 and 6.12, listed in hack/kernels.list), each in a qemu VM that
# shares this machine's root filesystem read-only, and prints a table of
# kernels by feature (also written to _output/kernels.md).
#
#   hack/kernels.sh           fetch what is missing, run the matrix, print it
#   hack/kernels.sh --fetch   only fetch the kernels and build their initramfs
#
# Each kernel is downloaded once with apt-get from the mirror this machine
# already uses, through a sources list and apt state of our own (the machine's
# apt setup is left as it is), unpacked with dpkg-deb into
# $KBP_CACHE/kernels/NAME, next to an initramfs built here: busybox-static, the
# 9p modules and test/utils/kernelvm's init script. No KVM is needed (qemu falls
# back to TCG): booting takes a few seconds, the tests a minute or two each.
#
#   KBP_CACHE         the cache root (default /var/cache/kube-bpf-proxy for
#                     root, ~/.cache/kube-bpf-proxy otherwise)
#   KBP_KERNEL_TESTS  the tests run in each VM (a -test.run pattern; the
#                     default is in test/utils/kernelvm)
#   KBP_KERNEL_MIRROR the Debian mirror (default: the one in /etc/apt)
set -o errexit -o nounset -o pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi

fetch_only=false
case "${1:-}" in
  --fetch) fetch_only=true ;;
  "") ;;
  *) echo "usage: $0 [--fetch]" >&2; exit 2 ;;
esac

for c in qemu-system-x86_64 cpio dpkg-deb apt-get; do
  command -v "$c" >/dev/null || { echo "$c is missing: run hack/deps.sh" >&2; exit 1; }
done
busybox=/bin/busybox
if ! { [ -x "$busybox" ] && "$busybox" --list | grep -x modprobe >/dev/null; }; then
  echo "busybox-static is missing: run hack/deps.sh" >&2
  exit 1
fi

if [ "$(id -u)" = 0 ]; then
  cache="${KBP_CACHE:-/var/cache/kube-bpf-proxy}"
else
  cache="${KBP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-bpf-proxy}"
fi
kernels="$cache/kernels"
mkdir -p "$kernels"
# One fetch at a time: a second caller waits and then finds the kernels.
exec 9>"$kernels/.lock"
flock -n 9 || { echo "waiting for another hack/kernels.sh to finish fetching" >&2; flock 9; }

mirror="${KBP_KERNEL_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror="$(sed -n 's#^URIs: *\(https\?://[^ ]*/debian\)/\?$#\1#;T;p;q' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
fi
if [ -z "$mirror" ]; then
  mirror="$(sed -n 's#^deb \(\[[^]]*\] \)\?\(https\?://[^ ]*/debian\)/\? .*#\2#;T;p;q' /etc/apt/sources.list 2>/dev/null || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

# apt-get and apt-cache on our own sources list and state; the machine's
# apt.conf.d still applies (proxies), its sources and package lists do not.
apt_dir="$kernels/.apt"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State=$apt_dir/state" -o "Dir::Cache=$apt_dir/cache" -o Dir::State::status=/dev/null
  -o APT::Sandbox::User=root -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
  -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
  -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
)
apt_updated=false
apt_update() {
  $apt_updated && return
  mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial"
  local suites
  suites="$(grep -v '^#' hack/kernels.list | awk 'NF {print $2}' | sort -u)"
  : > "$apt_dir/sources.list"
  for s in $suites; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $s main" >> "$apt_dir/sources.list"
  done
  echo "--- apt-get update ($mirror: ${suites//$'\n'/ })" >&2
  apt-get "${apt_opts[@]}" -qq update >&2
  apt_updated=true
}

# modules_in_order RELEASE_DIR MODULE... prints the .ko paths (relative to the
# release directory) that loading the modules takes, dependencies first.
modules_in_order() {
  local dir="$1"; shift
  declare -A seen=()
  local out=()
  visit() {
    local m="$1" line deps d
    [ -n "${seen[$m]:-}" ] && return
    seen[$m]=1
    line="$(grep -m1 -E "(^|/)$m\.ko(\.[gx]z|\.zst)?:" "$dir/modules.dep" || true)"
    if [ -z "$line" ]; then
      grep -qE "/$m\.ko" "$dir/modules.builtin" && return
      echo "module $m not found in $dir" >&2
      return 1
    fi
    deps="${line#*:}"
    for d in $deps; do
      d="${d##*/}"; d="${d%%.ko*}"
      visit "$d" || return 1
    done
    out+=("${line%%:*}")
  }
  for m in "$@"; do visit "$m" || return 1; done
  printf '%s\n' "${out[@]}"
}

# build_initramfs DIR RELEASE: DIR/initrd.img with busybox, the init script and
# the modules that mounting the host's root over virtio-9p needs.
build_initramfs() {
  local dir="$1" release="$2" tmp mods ko name
  tmp="$(mktemp -d)"
  mkdir -p "$tmp"/{bin,sbin,proc,sys,dev,host,lib/modules}
  cp "$busybox" "$tmp/bin/busybox"
  cp test/utils/kernelvm/init.sh "$tmp/init"
  chmod 755 "$tmp/init"
  local moddir="$dir/root/lib/modules/$release"
  # 9p, its virtio transport and the PCI device they sit on; whatever of
  # them the kernel has built in is skipped.
  mods="$(modules_in_order "$moddir" virtio_pci 9pnet_virtio 9p)"
  : > "$tmp/lib/modules/load"
  for ko in $mods; do
    name="$(basename "$ko")"
    case "$name" in
      *.xz) xz -dc "$moddir/$ko" > "$tmp/lib/modules/${name%.xz}"; name="${name%.xz}" ;;
      *.gz) gzip -dc "$moddir/$ko" > "$tmp/lib/modules/${name%.gz}"; name="${name%.gz}" ;;
      *.zst) zstd -qdc "$moddir/$ko" > "$tmp/lib/modules/${name%.zst}"; name="${name%.zst}" ;;
      *) cp "$moddir/$ko" "$tmp/lib/modules/$name" ;;
    esac
    echo "$name" >> "$tmp/lib/modules/load"
  done
  (cd "$tmp" && find . | cpio --quiet -o -H newc -R 0:0) | gzip -1 > "$dir/initrd.img.tmp"
  mv "$dir/initrd.img.tmp" "$dir/initrd.img"
  rm -rf "$tmp"
}

while read -r name suite meta; do
  case "$name" in ''|'#'*) continue ;; esac
  dir="$kernels/$name"
  if [ ! -f "$dir/.complete" ]; then
    apt_update
    info="$(apt-cache "${apt_opts[@]}" show "$meta/$suite")"
    pkg="$(sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/;T;p;q' <<< "$info")"
    [ -n "$pkg" ] || { echo "no kernel image behind $meta in $suite" >&2; exit 1; }
    echo "--- fetching $pkg ($suite) into $dir" >&2
    started=$SECONDS
    rm -rf "$dir"
    mkdir -p "$dir/deb"
    (cd "$dir/deb" && apt-get "${apt_opts[@]}" -qq download "$pkg/$suite" >&2)
    # The kernel, its config and the modules a test VM may load: networking,
    # filesystems and what they build on; not the hardware drivers, which
    # are most of the package (unpacking and depmod then take seconds, not
    # a minute).
    mkdir -p "$dir/root"
    dpkg-deb --fsys-tarfile "$dir"/deb/*.deb | tar -x -C "$dir/root" --wildcards \
      --exclude='*/drivers/net/wireless/*' --exclude='*/drivers/net/ethernet/*' \
      --exclude='*/drivers/net/usb/*' --exclude='*/drivers/net/can/*' \
      './boot/*' '*/modules.*' '*/kernel/net/*' '*/kernel/fs/*' '*/kernel/lib/*' \
      '*/kernel/crypto/*' '*/kernel/arch/*' '*/kernel/drivers/net/*' '*/kernel/drivers/virtio/*' \
      '*/kernel/drivers/char/*'
    # Merged-/usr packages (trixie) put the modules under usr/lib only.
    [ -e "$dir/root/lib" ] || ln -s usr/lib "$dir/root/lib"
    releases=("$dir"/root/lib/modules/*/)
    release="$(basename "${releases[0]}")"
    # The package leaves modules.dep and modules.alias to depmod at
    # install time; busybox's depmod writes them (it reads .ko.xz too).
    "$busybox" depmod -b "$dir/root" "$release"
    echo "$(dpkg-deb -f "$dir"/deb/*.deb Package) $(dpkg-deb -f "$dir"/deb/*.deb Version)" > "$dir/package"
    echo "$release" > "$dir/release"
    ln -sf "root/boot/vmlinuz-$release" "$dir/vmlinuz"
    rm -rf "$dir/deb"
    touch "$dir/.complete"
    echo "    fetched and unpacked in $((SECONDS - started)) s" >&2
  fi
  # The initramfs is rebuilt when the init script differs from the one in it.
  if [ ! -f "$dir/initrd.img" ] || ! cmp -s test/utils/kernelvm/init.sh "$dir/init.sh"; then
    build_initramfs "$dir" "$(cat "$dir/release")"
    cp test/utils/kernelvm/init.sh "$dir/init.sh"
  fi
  echo "$name: $(cat "$dir/package") ($(cat "$dir/release"))" >&2
done < hack/kernels.list

# The VMs only read the cache: the lock is for fetching.
exec 9>&-
$fetch_only && exit 0

mkdir -p _output
rm -f _output/kernels.md
KBP_CACHE="$cache" KBP_REQUIRE_KERNELS=1 KBP_KERNELS_REPORT="$PWD/_output/kernels.md" \
  go test -count=1 -v -timeout 30m -run '^TestKernelMatrix$' ./test/utils/kernelvm | grep -v '^=== ' || status=$?
echo
cat _output/kernels.md 2>/dev/null || true
exit "${status:-0}"
