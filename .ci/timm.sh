#!/usr/bin/env bash
# CI, third environment: normfuse.convert on timm's own models (tests/test_timm.py). timm
# needs torchvision, whose wheels pin a torch (and whose import fails beside another torch: the
# lowest-torch venv sees the main environment's packages), so neither is a test requirement:
# this venv is layered over the main environment (--system-site-packages: torch and the built
# normfuse come from there) and adds torchvision 0.29.1 (the pinned torch 2.14.1's) and timm,
# pinned, so that a new timm release cannot turn CI red unannounced. ~10 s of install (small
# wheels), ~20 s of tests.
#
#   bash .ci/timm.sh            (from the repository root, after the README's install)
set -euo pipefail
cd "$(dirname "$0")/.."

TIMM_VERSION=${NORMFUSE_TIMM:-1.0.31}
TORCHVISION_VERSION=${NORMFUSE_TORCHVISION:-0.29.1}
venv=${NORMFUSE_TIMM_DIR:-/tmp/normfuse-timm}/venv
start=$(date +%s)
echo "== timm: timm $TIMM_VERSION, torchvision $TORCHVISION_VERSION in $venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q "torchvision==$TORCHVISION_VERSION" "timm==$TIMM_VERSION"
"$py" -c "import torch, torchvision, timm; print('   torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
# Serial: ~12 s of tests, less than xdist's workers take to start.
"$py" -m pytest -q -p no:cacheprovider tests/test_timm.py
echo "== timm: finished in $(( $(date +%s) - start )) s"
