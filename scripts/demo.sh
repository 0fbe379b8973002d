#!/usr/bin/env bash
# The demo, as root on Debian 12: installs what is missing, brings up a throwaway libvirtd when
# none is running, starts virt-bitmapd, then shows it at work:
#   1. a live active commit done by libvirt: the daemon verifies the base is already consistent;
#   2. an oVirt-style cold merge with qemu-img on the stopped domain, which no libvirt event
#      reports: the daemon finds it on SIGHUP and carries the checkpoint bitmaps into the base.
# Everything it creates (domain, images, state, a libvirtd it started) is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
virsh() { command virsh -q -c qemu:///system "$@"; }

started_libvirtd=no
if ! command virsh -c qemu:///system version >/dev/null 2>&1; then
  bold "no libvirtd is running: starting a throwaway one"
  scripts/libvirt-up.sh
  started_libvirtd=yes
fi

work=$(mktemp -d /var/lib/libvirt/images/virt-bitmapd-demo.XXXXXX)
name="virt-bitmapd-demo-$$"
daemon_pid=""
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  virsh destroy "$name" >/dev/null 2>&1 || true
  virsh undefine "$name" --checkpoints-metadata >/dev/null 2>&1 || true
  rm -rf "$work" "/var/log/libvirt/qemu/$name.log"
  if [ "$started_libvirtd" = yes ]; then pkill -x libvirtd || true; pkill -x virtlogd || true; fi
}
trap cleanup EXIT

type=qemu; [ -w /dev/kvm ] && type=kvm
qemu-img create -q -f qcow2 "$work/disk.qcow2" 1G
qemu-io -f qcow2 -c "write -q -P 0x11 0 1M" "$work/disk.qcow2"
cat > "$work/domain.xml" <<EOF
<domain type='$type'>
  <name>$name</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$work/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
EOF

bold "virt-bitmapd run (console log format; a real install logs to journald)"
.venv/bin/virt-bitmapd run --config /dev/null --state-dir "$work/state" --storage-root "$work" \
  --metrics-listen "" --log-format console &
daemon_pid=$!
sleep 2

bold "an OS-less VM with checkpoints across two external snapshots"
virsh define "$work/domain.xml" >/dev/null
virsh start "$name" >/dev/null
virsh checkpoint-create-as "$name" cp1 >/dev/null
virsh snapshot-create-as "$name" s1 --disk-only --no-metadata --diskspec "vda,file=$work/s1.qcow2" >/dev/null
virsh checkpoint-create-as "$name" cp2 >/dev/null
virsh snapshot-create-as "$name" s2 --disk-only --no-metadata --diskspec "vda,file=$work/s2.qcow2" >/dev/null
virsh checkpoint-create-as "$name" cp3 >/dev/null
virsh domblklist "$name" --details
kill -HUP "$daemon_pid"   # a rescan: the daemon learns the new chain
sleep 2

bold "1. live active commit by libvirt (virsh blockcommit --active --pivot)"
virsh blockcommit "$name" vda --top "$work/s2.qcow2" --base "$work/s1.qcow2" --active --pivot --wait >/dev/null
sleep 2

bold "stop the VM, write known data at rest, take an external snapshot offline"
virsh destroy --graceful "$name" >/dev/null
sleep 1   # the daemon looks at the stopped domain; let it finish before writing
qemu-io -f qcow2 -c "write -q -P 0x22 100M 256k" "$work/s1.qcow2"
qemu-img create -q -f qcow2 -b "$work/s1.qcow2" -F qcow2 "$work/s3.qcow2"
for bitmap in cp1 cp2 cp3; do qemu-img bitmap --add "$work/s3.qcow2" "$bitmap"; done
qemu-img bitmap --add "$work/s3.qcow2" cp4
qemu-io -f qcow2 -c "write -q -P 0x33 500M 64k" "$work/s3.qcow2"
virsh detach-disk "$name" vda --config >/dev/null
virsh attach-disk "$name" "$work/s3.qcow2" vda --driver qemu --subdriver qcow2 --targetbus virtio --config >/dev/null
kill -HUP "$daemon_pid"
sleep 2
.venv/bin/virt-bitmapd inspect "$work/s3.qcow2"

bold "2. oVirt-style cold merge of s1 into the base: qemu-img commit + rebase (no libvirt event)"
qemu-img commit -q "$work/s1.qcow2"
qemu-img rebase -u -b "$work/disk.qcow2" -F qcow2 "$work/s3.qcow2"
echo "bitmaps in the base before virt-bitmapd looks:"
qemu-img info "$work/disk.qcow2" | sed -n '/bitmaps:/,/refcount/p' | grep name || echo "  none"
kill -HUP "$daemon_pid"   # or wait for the periodic rescan
sleep 3

bold "the base now carries every checkpoint of the committed layer"
.venv/bin/virt-bitmapd inspect "$work/s3.qcow2"
