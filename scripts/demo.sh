#!/usr/bin/env bash
# The demo: sets up what is missing, builds a throwaway qcow2 chain with checkpoint bitmaps across
# snapshots, commits it with qemu-img as oVirt's cold merge does, and lets virt-bitmapd carry the
# bitmaps into the base. Everything lives in a temporary folder that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
vbd=.venv/bin/virt-bitmapd
work=$(mktemp -d /tmp/virt-bitmapd-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a disk with checkpoint cp1, then two external snapshots, a checkpoint in each"
qemu-img create -q -f qcow2 "$work/base.qcow2" 1G
qemu-img bitmap --add "$work/base.qcow2" cp1
qemu-io -f qcow2 -c "write -q -P 0x11 0 64k" "$work/base.qcow2"
qemu-img create -q -f qcow2 -b "$work/base.qcow2" -F qcow2 "$work/snap1.qcow2"
qemu-img bitmap --add "$work/snap1.qcow2" cp1
qemu-img bitmap --add "$work/snap1.qcow2" cp2
qemu-io -f qcow2 -c "write -q -P 0x22 10M 128k" "$work/snap1.qcow2"
qemu-img create -q -f qcow2 -b "$work/snap1.qcow2" -F qcow2 "$work/snap2.qcow2"
for b in cp1 cp2 cp3; do qemu-img bitmap --add "$work/snap2.qcow2" "$b"; done
qemu-io -f qcow2 -c "write -q -P 0x33 500M 64k" "$work/snap2.qcow2"
$vbd inspect "$work/snap2.qcow2"

step "qemu-img commit of snap2 and snap1 into base (no bitmap handling of its own)"
qemu-img commit -q -d -b "$work/base.qcow2" "$work/snap2.qcow2"
$vbd inspect "$work/base.qcow2"

step "virt-bitmapd reconcile --dry-run"
$vbd reconcile --top "$work/snap2.qcow2" --base "$work/base.qcow2" --dry-run

step "virt-bitmapd reconcile"
$vbd reconcile --top "$work/snap2.qcow2" --base "$work/base.qcow2"
$vbd inspect "$work/base.qcow2"

step "run again: nothing left to do"
$vbd reconcile --top "$work/snap2.qcow2" --base "$work/base.qcow2"
