#!/usr/bin/env bash
# CI, third environment: normfuse.convert on timm's own models (tests/test_timm.py). timm
# needs torchvision, whose wheels require their own torch release and whose import fails beside
# another torch (the lowest-torch venv sees the main environment's packages), so neither is a
# test requirement: this venv is layered over the main environment (--system-site-packages:
# torch and the built normfuse come from there) and adds torchvision 0.29.1 (the pinned torch
# 2.14.1's) and timm, pinned, so that a new timm release cannot turn CI red unannounced (its
# own dependencies, huggingface_hub and safetensors, are not). ~10-25 s of install (small
# wheels), ~30 s of tests.
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
# torchvision's wheels require a torch no older than theirs: constrain torch to the main
# environment's, so pip fails instead of installing another torch into the venv (which would
# shadow the one normfuse was built against, and stay there for later runs).
main_torch=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$main_torch" > "$venv/constraints.txt"
"$py" -m pip install -q -c "$venv/constraints.txt" "torchvision==$TORCHVISION_VERSION" \
  "timm==$TIMM_VERSION"
"$py" - "$venv" <<'PY'
import sys, torch, torchvision, timm
if torch.__file__.startswith(sys.argv[1]):
    sys.exit(f"the timm venv holds a torch of its own ({torch.__file__}): remove {sys.argv[1]}")
print("   torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)
PY
# Serial: xdist's workers would take longer to start than the gain.
"$py" -m pytest -q -p no:cacheprovider tests/test_timm.py
echo "== timm: finished in $(( $(date +%s) - start )) s"
