#!/usr/bin/env bash
# Installs what virt-bitmapd and its tests need on Debian 12, as root: system packages (only the
# missing ones), then a virtualenv in .venv with the project and its test tools.
# Safe to run again; it does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-utils qemu-system-common qemu-system-x86 qemu-block-extra
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  pkg-config gcc make procps python3-dev python3-venv
  prometheus systemd
  # a real backup tool the tests back up with, online and offline, and restore from
  virtnbdbackup
  # the Debian package (make deb) and the system test that boots it under systemd
  debhelper dh-python pybuild-plugin-pyproject python3-all python3-hatchling lintian
  systemd-container debootstrap
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: $python is older than 3.11" >&2; exit 1; }
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: creating .venv"
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
