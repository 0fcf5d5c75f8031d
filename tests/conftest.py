"""Shared fixtures of the normfuse test suite.

* ``backend``: parametrized over every concrete backend in ``normfuse.available_backends()``
  (so kernel backends are tested as soon as they are built), active through
  ``normfuse.use_backend`` for the duration of the test.
* ``device``: the device the active backend runs on ("cuda" for the GPU backends).
* ``seed``: a per-test seed (a stable hash of the test id), also applied to torch's global RNG.
* the helpers (``make_input``, ``assert_close_dtype``, ...) are in tests/oracles.py.

Markers: ``slow`` (expensive combinations, e.g. Triton through its CPU interpreter; deselect
with ``-m "not slow"``).  ``NORMFUSE_TEST_BACKENDS=torch,cpu`` restricts the backends tested.

The "triton" backend without a GPU: this conftest sets ``TRITON_INTERPRET=1`` for the test
process (before normfuse or any Triton kernel is imported, and only when no CUDA device is
visible and the variable is not set already), so the Triton kernels run in Triton's CPU
interpreter and ``normfuse.available_backends()`` lists "triton" here.  The interpreter is slow
(the whole public-API suite takes ~8 min on 2 cores), so by default the interpreter-backed
"triton" parameters run only for the curated tests in ``TRITON_INTERPRETER_TESTS`` below (every
layer, train and eval, forward and gradients vs the float64 oracles, both memory formats,
awkward shapes, the error contract, large-offset and NaN/Inf numerics, gradgradcheck) and are
deselected elsewhere.  ``NORMFUSE_TEST_TRITON=all`` runs the full triton matrix,
``NORMFUSE_TEST_TRITON=none`` none of it.  With a GPU the compiled Triton kernels run in every
test.
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)

# Triton's interpreter is chosen when a kernel is decorated (normfuse.triton_kernels imports its
# kernels at the first op call) and normfuse caches which backends are available at the first
# ask: set the variable before either happens.  Only the test process (and what it starts;
# test_aot.py removes it for its compiler subprocess) sees it: normfuse itself never sets it.
if (not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
        and "normfuse.triton_kernels.moments" not in sys.modules):
    os.environ["TRITON_INTERPRET"] = "1"

# Helpers live in tests/oracles.py (imported by name from the test files): "conftest" is not
# a unique module name once tests/csrc etc. have their own conftest.py.
from oracles import device_for_backend  # noqa: E402

try:
    import normfuse  # noqa: E402
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - reported by every test that needs it
    normfuse = None
    _IMPORT_ERROR = exc


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist nobody calls it
def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto`` (the README's test command): one per core this process may use, at
    most 8 (each worker imports torch; past that, start-up and memory cost more than they save).
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still overrides (xdist's own hook reads it)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return max(1, min(8, len(os.sched_getaffinity(0))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: expensive combination (deselect with -m 'not slow')")


# --------------------------------------------------------- triton through the CPU interpreter
# "file::test" -> None (every parametrization) or a predicate on the test's parameters.  Tests
# not listed run without the interpreter-backed "triton" parameter (NORMFUSE_TEST_TRITON=all
# runs them all).  ~3.5 min on 2 cores.
TRITON_INTERPRETER_TESTS = {
    # every layer, train and eval, output + input and parameter gradients + running statistics
    # vs the float64 oracles; ranks 2-5, odd L, L = 1, N = 1, C = 1
    "test_modules.py::test_forward_backward_float32": None,
    "test_modules.py::test_eps_zero_on_ordinary_planes": None,
    "test_modules.py::test_eval_one_value_per_channel": None,
    "test_modules.py::test_instance_and_group_paths_allow_n1": None,
    "test_modules.py::test_bin_1d_one_element_per_plane": None,
    "test_modules.py::test_bias_false": None,
    "test_modules.py::test_bin_one_value_per_plane_dx_accuracy": None,
    # float64 (the interpreter only), float16, bfloat16 inputs
    "test_modules.py::test_dtypes": None,
    # memory formats: channels_last / channels_last_3d / (N, L, C), dy in either layout
    "test_modules.py::test_channels_last": None,
    "test_modules.py::test_contiguous_output_is_contiguous": None,
    "test_modules.py::test_strided_views": None,
    # running statistics over several steps, momentum None
    "test_modules.py::test_running_stats_several_steps": None,
    "test_functional.py::test_functional_matches_oracle": None,
    "test_functional.py::test_functional_no_affine_and_no_running_stats": None,
    # the error contract: every row, and no partial state over a sequence of bad calls
    "test_error_contract.py::test_error_contract_row": None,
    "test_error_contract.py::test_rows_raise_without_partial_state_over_a_sequence": None,
    "test_error_contract.py::test_backend_consistency": None,
    "test_error_contract.py::test_coefficient_ops_refuse_alike": None,
    "test_error_contract.py::test_batch_coefficient_ops_refuse_alike": None,
    "test_error_contract.py::test_momentum_none_checks_the_counter_before_reading_it": None,
    "test_error_contract.py::test_inference_input_is_refused_by_every_layer": None,
    "test_error_contract.py::test_inference_input_is_accepted_where_nothing_saves_it": None,
    "test_error_contract.py::test_strided_input_aliased_by_a_running_statistic_is_refused": None,
    "test_bad_input.py::test_functional_bad_parameter": None,
    # BIN on 2-d inputs as batch norm of one sample (normfuse/_autograd.py, _bin_as_one_sample):
    # parameter gradients alone, eval far from 0, what it saves (~3 s)
    "test_modules.py::test_bin_one_value_per_plane_parameter_gradients_alone": None,
    "test_modules.py::test_bin_one_value_per_plane_eval_far_from_zero": None,
    "test_modules.py::test_bin_one_value_per_plane_eval_eps_zero": None,
    "test_saved_for_backward.py::test_bin_on_one_value_per_plane_saves_channel_statistics": None,
    # numerics: 1e4 offsets, NaN / Inf (nn.BatchNorm's behaviour), constant planes
    # (AssocNorm's statistics are per sample, so its (256, 3) case repeats (64, 5) at 4x the
    # interpreter's time: ~25 s a case)
    "test_numerics.py::test_float32_large_offset":
        lambda p: p["kind"] != "assoc" or p["shape"] != (256, 3),
    "test_numerics.py::test_nan_inf_input_returns": None,
    "test_numerics.py::test_bin_gate1_matches_batchnorm_with_nan_inf": None,
    "test_numerics.py::test_constant_planes": None,
    # second order (float64): the 16-element shape (~10-25 s a case in the interpreter);
    # AssocNorm has no train/eval difference, so its "eval" case would repeat "train"
    "test_numerics.py::test_gradgradcheck_float64":
        lambda p: p["shape"] == (2, 4, 2, 1) and (p["kind"] != "assoc" or p["training"]),
    "test_numerics.py::test_double_backward_matches_oracle": None,
    # hypothesis: random shapes (L = 1, N = 1, C = 1, primes), dtypes, layouts, strided views,
    # train / eval against the float64 oracles (~15 s)
    "test_properties.py::test_layer_matches_oracle": None,
    "test_properties.py::test_functional_matches_oracle": None,
    # ILM-Norm: the generic kernels under its reference coefficient step (~1 min)
    "test_ilm.py::test_forward_backward_float32": None,
    "test_ilm.py::test_dtypes": None,
    "test_ilm.py::test_channels_last": None,
    "test_ilm.py::test_strided_views": None,
    "test_ilm.py::test_functional_matches_oracle": None,
    "test_ilm.py::test_gradcheck_float64": lambda p: p["layout"] == "contiguous",
    "test_ilm.py::test_loads_the_authors_checkpoint": None,
    "test_ilm.py::test_float32_large_offset": None,
    "test_ilm.py::test_nan_inf_stays_in_its_sample": None,
    "test_ilm.py::test_generic_kernels_come_from_the_backend": None,
    "test_ilm.py::test_module_bad_input": None,
    "test_ilm.py::test_functional_bad_input": None,
    "test_ilm.py::test_constant_input": None,
    "test_ilm.py::test_reduced_precision_module": None,
    "test_ilm.py::test_contiguous_output_is_contiguous": None,
    "test_ilm.py::test_state_dict_round_trip": None,
    # the fused activation: every layer vs the oracles, reduced dtypes, channels-last, and the
    # fused layer == the unfused one + torch.relu (~30 s; its gradcheck is left out: ~90 s in the
    # interpreter, and the second derivative is the torch backend's recomputation on every backend)
    "test_activation.py::test_module_matches_oracle": lambda p: len(p["shape"]) == 4,
    "test_activation.py::test_dtypes_and_layouts": lambda p: p["dtype"] != torch.float64,
    "test_activation.py::test_same_backend_unfused_then_relu": None,
}


def _triton_mode():
    mode = os.environ.get("NORMFUSE_TEST_TRITON", "ci").strip().lower() or "ci"
    if mode not in ("ci", "all", "none"):
        raise pytest.UsageError(f"NORMFUSE_TEST_TRITON={mode!r}: expected ci, all or none")
    return mode


def _interpreted_triton(item) -> bool:
    spec = getattr(item, "callspec", None)
    return (spec is not None and spec.params.get("backend") == "triton"
            and device_for_backend("triton") == "cpu")


def _selected(item) -> bool:
    rel = os.path.relpath(str(item.path), TESTS_DIR).replace(os.sep, "/")
    key = f"{rel}::{getattr(item, 'originalname', item.name)}"
    if key not in TRITON_INTERPRETER_TESTS:
        return False
    keep = TRITON_INTERPRETER_TESTS[key]
    return keep is None or bool(keep(item.callspec.params))


def pytest_collection_modifyitems(config, items):
    """Keep the interpreter-backed "triton" parameters only for the curated tests (above)."""
    mode = _triton_mode()
    if mode == "all":
        return
    kept, dropped = [], []
    for item in items:
        if _interpreted_triton(item) and (mode == "none" or not _selected(item)):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _backend_names():
    if normfuse is None:
        return ["torch"]
    try:
        names = [n for n in normfuse.available_backends() if n != "auto"]
    except Exception:  # pragma: no cover
        names = ["torch"]
    only = os.environ.get("NORMFUSE_TEST_BACKENDS")
    if only:
        names = [n for n in names if n in only.split(",")]
    return names or ["torch"]


BACKENDS = _backend_names()


def _backend_param(name):
    # Triton on the CPU runs through its interpreter (numpy, ~0.5 s a test): mark it slow.
    if name == "triton" and device_for_backend(name) == "cpu":
        return pytest.param(name, marks=pytest.mark.slow)
    return name


@pytest.fixture(params=[_backend_param(n) for n in BACKENDS])
def backend(request):
    if normfuse is None:
        pytest.fail(f"normfuse does not import: {_IMPORT_ERROR!r}")
    with normfuse.use_backend(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    return device_for_backend(backend)


@pytest.fixture
def nf():
    if normfuse is None:
        pytest.fail(f"normfuse does not import: {_IMPORT_ERROR!r}")
    return normfuse


@pytest.fixture(autouse=True)
def seed(request):
    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    return s


