#!/usr/bin/env bash
# Starts a real libvirtd (with virtlogd) on a machine where systemd does not run it, as root.
# Does nothing when one already answers on qemu:///system. Used by the demo and the tests.
set -euo pipefail

if virsh -c qemu:///system version >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "libvirt-up: no libvirtd answers on qemu:///system, and starting one needs root" >&2
  exit 1
fi

# libvirt parses its compiled-in default user before it reads qemu.conf: the user must exist.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 \
  || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

# Without systemd there are no cgroups, namespaces or security drivers to lean on.
conf=/etc/libvirt/qemu.conf
marker="# virt-bitmapd: plain machine settings"
if ! grep -qsF "$marker" "$conf"; then
  cat >> "$conf" <<CONF
$marker
user = "root"
group = "root"
dynamic_ownership = 0
namespaces = [ ]
cgroup_controllers = [ ]
security_driver = "none"
remember_owner = 0
CONF
fi
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/lib/libvirt/images \
  /var/cache/libvirt/qemu /run/libvirt

# A libvirtd that is still shutting down does not answer: let it finish first.
for _ in $(seq 100); do
  pgrep -x libvirtd >/dev/null || break
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d 2>/dev/null
for _ in $(seq 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "libvirt-up: libvirtd did not answer on qemu:///system within 10 s" >&2
exit 1
