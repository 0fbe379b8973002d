#!/usr/bin/env bash
# Builds, once per machine, the Debian 12 root file system the system test boots with systemd as
# PID 1 (systemd-nspawn): systemd, libvirt's system daemons, QEMU and the Python packages the
# virt-bitmapd package depends on, so that installing the package there needs no network.
# Prints the rootfs's path. Cached under $ROOTFS_CACHE by a key of this script's content; a
# half-built rootfs is never left under that name. As root.
set -euo pipefail

cache=${ROOTFS_CACHE:-/var/cache/virt-bitmapd-tests}
key=$(sha256sum "$0" | cut -c1-12)
rootfs=$cache/bookworm-$key
if [ -e "$rootfs/.complete" ]; then
  echo "$rootfs"
  exit 0
fi

include=(
  systemd systemd-sysv dbus util-linux iproute2 procps python3 curl
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
  qemu-system-common python3-libvirt python3-structlog python3-prometheus-client
)
# The host's own Debian mirror (deb822 sources or the classic list).
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
  | grep -v security | head -n1 || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi

mkdir -p "$cache"
rm -rf "$cache"/building.* "$cache"/bookworm-*  # earlier keys and interrupted builds
work=$(mktemp -d "$cache/building.XXXXXX")
chmod 0755 "$work"  # the root directory of the machine: mktemp makes it 0700
echo "make_rootfs: debootstrap bookworm from $mirror into $work" >&2
debootstrap --variant=minbase --include="$(IFS=,; echo "${include[*]}")" \
  bookworm "$work" "$mirror" >"$cache/debootstrap.log" 2>&1 \
  || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }

# libvirt-daemon-system's maintainer scripts need the container's own systemd: boot it once and
# install it there, with the host's network (no -n) so apt reaches the mirror.
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$work" -b --register=no --keep-unit \
  --private-network --console=read-only -M vbd-rootfs --system-call-filter=bpf \
  >"$cache/boot.log" 2>&1 </dev/null &
nspawn=$!
trap 'kill "$nspawn" 2>/dev/null || true; wait "$nspawn" 2>/dev/null || true' EXIT
pid1=""
for _ in $(seq 100); do
  pid1=$(pgrep -P "$nspawn" || true)
  [ -n "$pid1" ] && break
  sleep 0.1
done
[ -n "$pid1" ] || { echo "make_rootfs: the container did not boot" >&2; cat "$cache/boot.log" >&2; exit 1; }
inside() { nsenter -t "$pid1" -m -p -u -i -r -w "$@"; }
for _ in $(seq 100); do
  state=$(nsenter -t "$pid1" -m -u -i -n -p -r -w systemctl is-system-running 2>/dev/null || true)
  case $state in running|degraded) break ;; esac
  sleep 0.2
done
inside env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  libvirt-daemon-system >"$cache/apt.log" 2>&1 || { tail -n 20 "$cache/apt.log" >&2; exit 1; }
inside apt-get clean
nsenter -t "$pid1" -m -u -i -n -p -r -w systemctl poweroff || true
wait "$nspawn" || true
trap - EXIT
rm -rf "$work/run/systemd/nspawn"
touch "$work/.complete"
mv "$work" "$rootfs"
echo "$rootfs"
