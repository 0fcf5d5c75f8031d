"""Build of normfuse._C (csrc/): CPU kernels always, CUDA kernels when a toolkit is found.

    CUDA_HOME=/usr/local/cuda MAX_JOBS=1 pip install --no-build-isolation -e .

Environment:
  NORMFUSE_CPU_ONLY=1      build the CPU kernels only
  NORMFUSE_FORCE_CUDA=1    build the CUDA kernels; fail if no toolkit (nvcc) is found
  TORCH_CUDA_ARCH_LIST     target archs; default "8.0;9.0" when no GPU is visible, else torch's
                           default (the visible GPUs' archs)
  NORMFUSE_PTXAS_VERBOSE=1 pass -Xptxas -v (registers, spills, stack per kernel in the build log)
  NORMFUSE_LINEINFO=1      pass -lineinfo (source lines in profilers / cuobjdump)

Sources are globbed (csrc/README.md): csrc/*.cpp, csrc/common/*.cpp, csrc/cpu/*.cpp always;
csrc/cuda/*.cpp and csrc/cuda/*.cu in CUDA builds.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else /usr/local/cuda, else the nvcc on PATH: the first with bin/nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file():
            return c
    return None


def nvidia_pip_include() -> str | None:
    """site-packages/nvidia/cu13/include (cusparse.h etc. are there, not in the toolkit)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cu12"):
            inc = Path(base) / sub / "include"
            if inc.is_dir():
                return str(inc)
    return None


def rel_glob(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


cpu_only = env_flag("NORMFUSE_CPU_ONLY")
force_cuda = env_flag("NORMFUSE_FORCE_CUDA")
if cpu_only and force_cuda:
    sys.exit("NORMFUSE_CPU_ONLY and NORMFUSE_FORCE_CUDA are both set")
cuda_home = None if cpu_only else find_cuda_home()
if force_cuda and cuda_home is None:
    sys.exit("NORMFUSE_FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc) found; set CUDA_HOME")
with_cuda = cuda_home is not None
if with_cuda:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported; without it torch guesses.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    gpu_visible = False
    try:
        gpu_visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a broken driver counts as no GPU
        gpu_visible = False
    if not gpu_visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

sources = rel_glob("csrc/*.cpp") + rel_glob("csrc/common/*.cpp") + rel_glob("csrc/cpu/*.cpp")
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers; without the
# flag it silently runs on one thread.
cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
link_flags = ["-fopenmp"]
define_macros: list[tuple[str, str | None]] = []

if with_cuda:
    sources += rel_glob("csrc/cuda/*.cpp") + rel_glob("csrc/cuda/*.cu")
    define_macros.append(("NORMFUSE_WITH_CUDA", None))
    pip_inc = nvidia_pip_include()
    if pip_inc:
        # After every -I, so the toolkit's own headers win where both have one.
        cxx_flags += ["-idirafter", pip_inc]
    nvcc_flags = ["-O3", "-DNORMFUSE_WITH_CUDA", "-std=c++17"]
    if env_flag("NORMFUSE_PTXAS_VERBOSE"):
        nvcc_flags += ["-Xptxas", "-v"]
    if env_flag("NORMFUSE_LINEINFO"):
        nvcc_flags += ["-lineinfo"]
    ext = CUDAExtension(
        "normfuse._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "normfuse._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

print(
    f"normfuse: building normfuse._C with {'CPU + CUDA (' + cuda_home + ')' if with_cuda else 'CPU only'}; "
    f"arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)') if with_cuda else '-'}; "
    f"{len(sources)} sources",
    file=sys.stderr,
)

setup(
    packages=find_packages(include=["normfuse", "normfuse.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
