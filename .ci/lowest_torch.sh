#!/usr/bin/env bash
# CI, second environment: normfuse on the LOWEST torch we support (pyproject.toml,
# [tool.normfuse] torch-range), on the CPU. GPU machines ship their own torch (the first GPU run
# had torch 2.11, where the Triton ops did not register); this is how such a regression shows up
# without a GPU. In it normfuse builds (CPU + CUDA glue) and imports, every backend that can run
# here registers, opcheck passes on every op, and the module, torch.compile and autocast tests
# and the curated Triton-interpreter tests pass, as do python -m normfuse and the benchmark's and
# GPU probes' smoke runs (the GPU machines run the benchmark on this torch), export (dynamic
# shapes, ONNX, a saved program loaded in a fresh process: users export there), and every Triton
# kernel configuration compiles for sm_90 (the GPU machines with this torch are H100 / H200) with
# this torch's Triton without spilling (test_aot.py: Triton 3.6 spilled a kernel that Triton 3.8
# did not).
#
# The environment is a venv layered over the main one (--system-site-packages): torch and triton
# are installed into it with --no-deps, everything else (numpy, pytest, and the nvidia-* runtime
# wheels that torch's CUDA build loads at import, same major versions) comes from the main
# environment, so this costs one wheel download instead of ~3 GB. The tree is built in a copy, so
# the main checkout's build (against the pinned torch) stays as it is.
#
#   bash .ci/lowest_torch.sh            (from the repository root; CI runs it after the main job)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

TORCH_VERSION=${NORMFUSE_LOWEST_TORCH:-2.11.0}
TRITON_VERSION=${NORMFUSE_LOWEST_TRITON:-3.6.0}
work=${NORMFUSE_LOWEST_DIR:-/tmp/normfuse-lowest-torch}
venv="$work/venv"
tree="$work/tree"
start=$(date +%s)
echo "== lowest torch: torch $TORCH_VERSION, triton $TRITON_VERSION in $work"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  # numpy < 2.4 too: triton 3.6's interpreter converts 1-element arrays with int(), which numpy
  # 2.4 refuses (its own release predates that numpy; compiled kernels on a GPU are unaffected).
  "$py" -m pip install -q --no-deps "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy<2.4"
fi
"$py" -c "import torch, triton, numpy; print('   torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

# A copy of the tracked (and untracked, not ignored) files: no build outputs of the main tree.
rm -rf "$tree"
mkdir -p "$tree"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$tree"
cd "$tree"
echo "== lowest torch: build ($(( $(date +%s) - start )) s)"
# sm_90 only, as for the AOT check below: the machines that ship this torch are H100 / H200, and
# the CUDA kernels' sm_80 build is checked by the main job (a second arch is ~1 min of nvcc here).
TORCH_CUDA_ARCH_LIST="9.0" "$py" setup.py -q build_ext --inplace > "$work/build.log" 2>&1 ||
  { tail -50 "$work/build.log"; exit 1; }

echo "== lowest torch: tests ($(( $(date +%s) - start )) s)"
# What must hold there (see the header); the rest of the suite runs on the pinned torch.
NORMFUSE_AOT_ARCHS=90 "$py" -m pytest -q -p no:cacheprovider -n auto --dist loadgroup \
  tests/test_torch_support.py \
  tests/triton_kernels/test_schemas.py \
  tests/test_backends.py \
  tests/test_modules.py \
  tests/test_one_call_step.py \
  tests/csrc/test_layer_steps.py \
  tests/csrc/test_layer_autograd.py \
  tests/test_ilm.py \
  tests/test_error_contract.py \
  "tests/csrc/test_generic_ops.py::test_opcheck" \
  "tests/csrc/test_layer_direction_ops.py::test_opcheck" \
  "tests/csrc/test_layer_direction_ops.py::test_meta_opcheck" \
  "tests/csrc/test_coefficients_ops.py::test_opcheck" \
  "tests/csrc/test_coefficients_ops.py::test_opcheck_with_counter" \
  "tests/csrc/test_coefficients_ops.py::test_batch_counter_cpu" \
  "tests/csrc/test_relu_cpu.py::test_opcheck_relu" \
  "tests/csrc/test_relu_cpu.py::test_relu_ops_equal_plain_ops_on_relu_output" \
  tests/test_compile.py \
  "tests/test_functional.py::test_autocast_leaves_a_float32_layer_in_float32" \
  tests/test_activation.py \
  tests/test_convert_fuse.py \
  tests/test_norm_act.py \
  tests/triton_kernels/test_relu.py \
  tests/triton_kernels/test_opcheck.py \
  tests/triton_kernels/test_streaming.py \
  tests/triton_kernels/test_coefficients.py \
  tests/triton_kernels/test_coefficients_ilm.py \
  "tests/csrc/test_ilm_coefficients.py::test_opcheck" \
  tests/test_info.py \
  tests/test_empty_input.py \
  tests/test_saved_for_backward.py \
  tests/test_fx.py \
  tests/test_functorch.py \
  tests/test_checkpointing.py \
  tests/test_export.py \
  tests/test_bench_smoke.py \
  tests/triton_kernels/test_aot.py
echo "== lowest torch: done in $(( $(date +%s) - start )) s"
