#!/usr/bin/env bash
# Builds the kube-bpf-proxy image as an archive, without a registry or a
# container engine: _output/kube-bpf-proxy-image.tar holds both an OCI image
# layout and a docker-archive manifest.json, so docker load, podman load,
# ctr images import and kind load image-archive all take it (docs/image.md).
#
#   1. a Debian bookworm root filesystem: debootstrap --variant=minbase, then
#      the packages in hack/image/packages installed and every package
#      upgraded from bookworm-updates and bookworm-security, trimmed as
#      debian:bookworm-slim is (no docs, man pages or locales) and stripped of
#      what differs from run to run (apt lists and caches, logs). Built once
#      into the cache, keyed by the package list, the mirror, the snapshot and
#      this recipe, so later builds reuse it;
#   2. the static binary (hack/build.sh) at /usr/local/bin/kube-bpf-proxy and
#      a link /usr/local/bin/kube-proxy to it, for kubeadm's DaemonSet;
#   3. hack/image, which writes one reproducible layer (sorted entries, every
#      mtime at SOURCE_DATE_EPOCH, the commit's time) and the archive.
#
# Two builds of one commit from one cached root filesystem give the same
# image digest. Prints the archive's path and digest.
#
#   IMAGE            the image's name (default kube-bpf-proxy:<git describe>)
#   DEBIAN_MIRROR    the Debian mirror (default: the one apt uses here, else
#                    http://deb.debian.org/debian)
#   DEBIAN_SNAPSHOT  a snapshot.debian.org timestamp (20250520T000000Z): build
#                    the root filesystem from that day's archive instead
#   KBP_CACHE        the cache root (default /var/cache/kube-bpf-proxy)
#   KBP_IMAGE_ROOTFS print the cached root filesystem's directory and stop
#                    (used by the tests): 1 builds it if missing, "cached"
#                    exits 3 instead
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "building the image's root filesystem needs root (debootstrap, chroot): run it with sudo" >&2
  exit 1
fi
cache="${KBP_CACHE:-/var/cache/kube-bpf-proxy}"
suite=bookworm
mapfile -t packages < <(grep -v '^\s*\(#\|$\)' hack/image/packages)

if [ -n "${DEBIAN_SNAPSHOT:-}" ]; then
  mirror="http://snapshot.debian.org/archive/debian/$DEBIAN_SNAPSHOT"
  security="http://snapshot.debian.org/archive/debian-security/$DEBIAN_SNAPSHOT"
else
  mirror="${DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    # The mirror this machine's apt uses for the main archive.
    mirror="$(sed -n 's#^URIs: *\(https\?://[^ ]*/debian\)/\?$#\1#p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
    mirror="${mirror:-http://deb.debian.org/debian}"
  fi
  security="${mirror%/debian}/debian-security"
fi

# The recipe's version: change it when the steps below change what the root
# filesystem holds, so the cache is rebuilt.
recipe=1
key="$(printf '%s\n' "recipe=$recipe" "suite=$suite" "mirror=$mirror" "security=$security" \
  "snapshot=${DEBIAN_SNAPSHOT:-}" "${packages[@]}" | sha256sum | cut -c1-16)"
rootfs_dir="$cache/image-rootfs-$suite-$key"

need() { # command package
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing $2 (for $1)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >&2
}

build_rootfs() {
  need debootstrap debootstrap
  local tmp="$rootfs_dir.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  echo "debootstrap $suite from $mirror into $rootfs_dir (once; later builds reuse it)" >&2
  debootstrap --variant=minbase --arch=amd64 \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$suite" "$tmp/rootfs" "$mirror" >&2
  local r="$tmp/rootfs"
  # debian:bookworm-slim's dpkg filter: no docs (but the copyrights), man
  # pages, info or locales. Written before the packages are installed so
  # dpkg skips those files; the base system's are removed below.
  cat > "$r/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
  cat > "$r/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f "$r/etc/apt/sources.list"
  # apt in the root filesystem, as the Dockerfile's RUN does, in a mount
  # namespace of its own so /proc and /dev are gone when it ends. The
  # script is single-quoted on purpose: the inner sh expands it.
  # shellcheck disable=SC2016
  unshare --mount --propagation private -- sh -ec '
    r="$1"; shift
    mount -t proc proc "$r/proc"
    mount --rbind /dev "$r/dev"
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C
    # A snapshot'"'"'s Release files are past their Valid-Until.
    chroot "$r" apt-get ${DEBIAN_SNAPSHOT:+-o Acquire::Check-Valid-Until=false} update
    chroot "$r" apt-get -y upgrade
    chroot "$r" apt-get install -y --no-install-recommends "$@"
    chroot "$r" apt-get clean
  ' sh "$r" "${packages[@]}" >&2
  # What the filter would have kept out of the base system.
  find "$r/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$r/usr/share/groff"/* "$r/usr/share/info"/* "$r/usr/share/linda"/* \
    "$r/usr/share/lintian/overrides"/* "$r/usr/share/man"/*
  find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  # What differs from one debootstrap to the next and has no use in an
  # image: apt's lists and caches, logs, debconf's and dpkg's backups.
  rm -rf "$r/var/lib/apt/lists"/* "$r/var/cache/apt"/* "$r/var/cache/ldconfig/aux-cache" \
    "$r/var/cache/debconf"/*-old "$r/var/lib/dpkg"/*-old "$r/var/lib/dpkg/lock"* \
    "$r/var/lib/apt/extended_states"
  mkdir -p "$r/var/lib/apt/lists/partial" "$r/var/cache/apt/archives/partial"
  find "$r/var/log" -type f -delete
  rm -f "$r/etc/machine-id" "$r/var/lib/dbus/machine-id" "$r/etc/hostname" "$r/etc/resolv.conf"
  # The runtime provides /dev, /proc and /sys; debootstrap left device
  # nodes in /dev.
  find "$r/dev" "$r/proc" "$r/sys" "$r/tmp" -mindepth 1 -delete
  # What went in, for docs/image.md and the curious.
  # dpkg-query's format, not the shell's.
  # shellcheck disable=SC2016
  chroot "$r" dpkg-query -W -f '${Package} ${Version}\n' > "$tmp/packages.txt"
  mv "$tmp" "$rootfs_dir"
}

if [ "${KBP_IMAGE_ROOTFS:-}" = cached ] && [ ! -d "$rootfs_dir/rootfs" ]; then
  echo "no cached root filesystem in $rootfs_dir: make image builds it" >&2
  exit 3
fi
mkdir -p "$cache"
exec 9>"$rootfs_dir.lock"
flock 9
[ -d "$rootfs_dir/rootfs" ] || build_rootfs
exec 9>&-
if [ -n "${KBP_IMAGE_ROOTFS:-}" ]; then
  echo "$rootfs_dir/rootfs"
  exit 0
fi

hack/build.sh >&2
version="$(git describe --tags --always --dirty 2>/dev/null || echo unknown)"
# The commit's time: the same for every build of one commit.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
go run ./hack/image \
  -rootfs "$rootfs_dir/rootfs" \
  -binary _output/kube-bpf-proxy \
  -name "${IMAGE:-kube-bpf-proxy:$version}" \
  -version "$version" \
  -revision "$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -o _output/kube-bpf-proxy-image.tar
