"""The CPU kernels of normfuse._C under AddressSanitizer.

A CPU-only variant of the extension (csrc/ops.cpp, csrc/common/*.cpp, csrc/cpu/*.cpp) is compiled
with ``-O1 -g1 -fsanitize=address -fno-omit-frame-pointer -fopenmp`` into
``build/asan/<hash>/normfuse_asan_C.so``; the hash covers every file under csrc/ that the CPU
build reads, the flags, the compiler and torch versions, so the one-off build (~1 min on 2 quiet
cores, one g++ per core; MAX_JOBS caps it) reruns only when those change.  Builds go to a
temporary directory that is renamed into place, so concurrent runs in one checkout do not trip
over each other.

``tests/asan_exercise.py`` then runs in a subprocess under
``LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
ASAN_OPTIONS=detect_leaks=0``: it loads the
library with ``torch.ops.load_library`` (never ``normfuse._C``: both register the ``normfuse``
namespace) and calls every op on awkward shapes, dtypes and both layouts.  A test passes when
the subprocess exits 0 and stderr holds no ``ERROR: AddressSanitizer``.

``test_planted_heap_overflow_is_reported`` builds a one-op library with an off-by-one read the
same way and checks that the same harness reports it: the net holds.

Skipped (not failed) without g++, without libasan, or with NORMFUSE_SKIP_ASAN=1.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = ROOT / "tests" / "asan_exercise.py"
BUILD_DIR = Path(os.environ.get("NORMFUSE_ASAN_BUILD_DIR", ROOT / "build" / "asan"))
CXX = os.environ.get("CXX", "g++")
NAME = "normfuse_asan_C"

# -g1: the line tables a report prints, at ~2/3 of -g's build time (torch's headers' debug info)
SANITIZE = ["-O1", "-g1", "-fsanitize=address", "-fno-omit-frame-pointer", "-fopenmp"]
LDFLAGS = ["-fsanitize=address", "-fopenmp"]
REPORT = "ERROR: AddressSanitizer"
BUILD_TIMEOUT_S = 1200
RUN_TIMEOUT_S = 600


def _runtime(lib: str) -> str | None:
    """Absolute path of one of the compiler's runtime libraries (gcc prints the bare name when
    it has none)."""
    for cc in ("gcc", CXX):
        if shutil.which(cc) is None:
            continue
        try:
            out = subprocess.run([cc, f"-print-file-name={lib}"], capture_output=True,
                                 text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out and os.path.isabs(out) and os.path.exists(out):
            return os.path.realpath(out)
    return None


def _libasan() -> str | None:
    return _runtime("libasan.so")


def _preload() -> str:
    """libasan first (it must come first), then libstdc++: python itself does not link
    libstdc++, so without it ASAN's ``__cxa_throw`` interceptor finds no real function at start-up
    and the first C++ exception (any TORCH_CHECK that fails) dies with
    ``CHECK failed: asan_interceptors.cpp "((__interception::real___cxa_throw)) != (0)"``."""
    libs = [_libasan()]
    stdcxx = _runtime("libstdc++.so.6") or _runtime("libstdc++.so")
    if stdcxx:
        libs.append(stdcxx)
    return " ".join(libs)


def _skip_reason() -> str | None:
    if os.environ.get("NORMFUSE_SKIP_ASAN", "").strip() in ("1", "true", "yes"):
        return "NORMFUSE_SKIP_ASAN is set"
    if not sys.platform.startswith("linux"):
        return "AddressSanitizer run is Linux-only"
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX})"
    if _libasan() is None:
        return "libasan.so not found (gcc -print-file-name=libasan.so)"
    try:
        from torch.utils import cpp_extension  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"torch.utils.cpp_extension unavailable: {exc}"
    return None


SKIP = _skip_reason()
# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share the ASan build of the extension, which a second worker
# would redo.
pytestmark = [
    pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
    pytest.mark.xdist_group("test_cpu_asan"),
]


def _compile_flags(name: str) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = ["-std=c++20", "-fPIC", "-Wno-unknown-pragmas", *SANITIZE,
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-DTORCH_EXTENSION_NAME={name}", "-I", str(ROOT / "csrc")]
    for inc in cpp_extension.include_paths():
        flags += ["-isystem", inc]
    flags += ["-isystem", sysconfig.get_paths()["include"]]
    return flags


def _link_flags() -> list[str]:
    from torch.utils import cpp_extension

    lib = cpp_extension.library_paths()[0]
    return ["-shared", *LDFLAGS, f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


def _compiler_version() -> str:
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _key(files: list[Path], extra: str, flags: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    for p in sorted(files):
        h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p.name).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    h.update(extra.encode())
    h.update(" ".join(flags).encode())
    h.update(_compiler_version().encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def build_library(name: str, sources: list[Path], depends: list[Path] = (),
                  extra_key: str = "") -> Path:
    """Compile ``sources`` with the ASAN flags into ``build/asan/<hash>/<name>.so`` (cached).

    The same flags as torch.utils.cpp_extension.load(extra_cflags=SANITIZE, extra_ldflags=
    LDFLAGS, extra_include_paths=[csrc]) would use, but the library is not loaded into this
    process: that needs the ASAN runtime preloaded, and would register ``normfuse`` twice.
    """
    flags = _compile_flags(name)
    key = _key(list(sources) + list(depends), extra_key + name, flags + _link_flags())
    out_dir = BUILD_DIR / key
    lib = out_dir / f"{name}.so"
    if lib.exists():
        return lib
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=BUILD_DIR))
    try:
        jobs = max(1, min(len(sources), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
        objs, running, logs = [], [], []

        def reap(proc_src):
            proc, src, log = proc_src
            try:
                proc.wait(timeout=BUILD_TIMEOUT_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
            log.seek(0)
            text = log.read().decode(errors="replace")
            log.close()
            if proc.returncode != 0:
                raise RuntimeError(f"ASAN build: compiling {src} failed:\n{text[-6000:]}")

        for i, src in enumerate(sources):
            obj = tmp / f"{i:02d}_{Path(src).stem}.o"
            objs.append(obj)
            log = tempfile.TemporaryFile(dir=tmp)
            proc = subprocess.Popen([CXX, *flags, "-c", str(src), "-o", str(obj)],
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, src, log))
            if len(running) >= jobs:
                reap(running.pop(0))
        while running:
            reap(running.pop(0))
        tmp_lib = tmp / f"{name}.so"
        res = subprocess.run([CXX, *map(str, objs), "-o", str(tmp_lib), *_link_flags()],
                             capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"ASAN build: linking {name} failed:\n{res.stderr[-6000:]}")
        for obj in objs:
            obj.unlink()
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another run put it there first
            if not lib.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib


def cpu_sources() -> tuple[list[Path], list[Path]]:
    """(translation units, every file of csrc/ a CPU build reads) for the CPU-only extension."""
    csrc = ROOT / "csrc"
    sources = ([csrc / "ops.cpp"] + sorted((csrc / "common").glob("*.cpp"))
               + sorted((csrc / "cpu").glob("*.cpp")))
    depends = [p for d in ("common", "cpu") for p in sorted((csrc / d).rglob("*")) if p.is_file()]
    return sources, depends


@pytest.fixture(scope="module")
def asan_library():
    sources, depends = cpu_sources()
    return build_library(NAME, sources, depends)


def run_under_asan(libraries: list[Path], mode: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **extra_env)
    env["LD_PRELOAD"] = _preload()
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=66"
    # The subprocess must not find normfuse._C through PYTHONPATH tricks; it imports torch only.
    env.pop("NORMFUSE_BACKEND", None)
    env["PYTHONPATH"] = ""
    # Spin-waiting OpenMP threads on a shared 2-core machine stall for seconds at each barrier.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", "2")  # exercise the multi-task paths of at::parallel_for
    cmd = [sys.executable, str(EXERCISE), mode, *map(str, libraries)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT / "tests"),
                          timeout=RUN_TIMEOUT_S)


def _assert_clean(res: subprocess.CompletedProcess, mode: str) -> None:
    tail = (res.stdout[-3000:] + "\n--- stderr ---\n" + res.stderr[-12000:])
    assert REPORT not in res.stderr, f"AddressSanitizer report in mode {mode!r}:\n{tail}"
    assert res.returncode == 0, f"exercise {mode!r} exited {res.returncode}:\n{tail}"
    assert "ASAN-EXERCISE-OK" in res.stdout, f"exercise {mode!r} did not finish:\n{tail}"


@pytest.mark.parametrize("mode", ["ops", "rejects"])
def test_cpu_ops_clean_under_asan(asan_library, mode):
    """Every op on awkward shapes / dtypes / layouts (``ops``), and invalid arguments the ops
    refuse (``rejects``): no AddressSanitizer report, every result checked."""
    res = run_under_asan([asan_library], mode)
    _assert_clean(res, mode)
    count = int(res.stdout.split("ASAN-EXERCISE-OK")[1].split()[0])
    assert count >= (1000 if mode == "ops" else 20), f"only {count} op calls ran"


def test_portable_kernels_clean_under_asan(asan_library):
    """``ops`` again with ATEN_CPU_CAPABILITY=default: the portable build of the kernels (the run
    above takes the AVX2 build on a CPU that has it), the fused ReLU's variants included."""
    res = run_under_asan([asan_library], "ops", ATEN_CPU_CAPABILITY="default")
    _assert_clean(res, "ops (portable)")


def test_zero_sized_statistics_under_asan(asan_library):
    """(N, 0) / (0, C) statistics and empty inputs, which only direct op calls can produce."""
    res = run_under_asan([asan_library], "degenerate")
    _assert_clean(res, "degenerate")


def test_assoc_backward_zero_channels_under_asan(asan_library):
    res = run_under_asan([asan_library], "assoc-c0")
    _assert_clean(res, "assoc-c0")


PLANTED = r"""
// A planted bug for tests/test_cpu_asan.py: an off-by-one read one element past the input,
// as a kernel with a wrong loop bound would make.  Compiled with the same flags as the
// ASAN build of normfuse._C; the harness must report a heap-buffer-overflow here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace {
at::Tensor read_past_end(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous());
  at::Tensor y = at::empty_like(x);
  const float* in = x.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) out[i] = in[i + 1];  // BUG: reads in[numel]
  return y;
}
}  // namespace

TORCH_LIBRARY(normfuse_asan_planted, m) { m.def("read_past_end(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(normfuse_asan_planted, CPU, m) { m.impl("read_past_end", &read_past_end); }
"""


@pytest.fixture(scope="module")
def planted_library():
    src_dir = BUILD_DIR / "planted_src"
    src_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / "planted_read_past_end.cpp"
    if not src.exists() or src.read_text() != PLANTED:
        fd, tmp = tempfile.mkstemp(dir=src_dir, suffix=".cpp")
        with os.fdopen(fd, "w") as f:
            f.write(PLANTED)
        os.replace(tmp, src)
    return build_library("normfuse_asan_planted", [src])


def test_planted_heap_overflow_is_reported(planted_library):
    """The net holds: the same build flags, preload and harness catch an off-by-one read."""
    res = run_under_asan([planted_library], "planted")
    assert REPORT in res.stderr, ("planted off-by-one read was NOT reported by AddressSanitizer:"
                                  f"\nrc={res.returncode}\n{res.stdout[-2000:]}\n"
                                  f"{res.stderr[-4000:]}")
    assert "heap-buffer-overflow" in res.stderr, res.stderr[-4000:]
    assert "read_past_end" in res.stderr, "report should point at the planted function"
    assert res.returncode != 0 and "ASAN-EXERCISE-OK" not in res.stdout
