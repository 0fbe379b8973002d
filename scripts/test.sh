#!/usr/bin/env bash
# The whole test suite: lint, types, then every test (unit and real components). As root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
# both readers (libvirt's backup, an offline qemu-nbd export) against what every block reads,
# with and without the daemon (bench/soak.py)
echo "== soak"; python bench/soak.py --seed "${SOAK_SEED:-1}" --minutes "${SOAK_MINUTES:-2.5}"
