"""Build of normfuse._C (csrc/): CPU kernels always, CUDA kernels when a toolkit is found.

    CUDA_HOME=/usr/local/cuda MAX_JOBS=1 pip install --no-build-isolation -e .

Environment:
  NORMFUSE_CPU_ONLY=1      build the CPU kernels only
  NORMFUSE_FORCE_CUDA=1    build the CUDA kernels; fail if no toolkit (nvcc) is found
  TORCH_CUDA_ARCH_LIST     target archs; default "8.0;9.0+PTX" when no GPU is visible (SASS for
                           sm_80 and sm_90, plus compute_90 PTX that newer GPUs JIT-compile),
                           else torch's default (the visible GPUs' archs)
  NORMFUSE_ALLOW_BUILD_ISOLATION=1  build in pip's isolated build environment even though the
                           torch pip downloaded there differs from the installed one (the
                           install then replaces the installed torch)
  NORMFUSE_ALLOW_ANY_TORCH=1  build against a torch outside the supported range
                           (pyproject.toml, [tool.normfuse] torch) instead of failing
  NORMFUSE_PTXAS_VERBOSE=1 pass -Xptxas -v (registers, spills, stack per kernel in the build log)
  NORMFUSE_LINEINFO=1      pass -lineinfo (source lines in profilers / cuobjdump)
  NORMFUSE_DEBUG_INFO=1    keep the C++ debug information (-g, from Python's own CFLAGS); without
                           it the build passes -g0: ~45 MB of DWARF in a 58 MB _C (symbols stay)

The build is tied to the torch it compiles against (C++ ABI): the package metadata requires exactly
that torch version, and normfuse/_build_info.py (generated, not tracked) records it, so that an
import under another torch says so instead of failing on an undefined symbol.

Sources are globbed (csrc/README.md): csrc/*.cpp, csrc/common/*.cpp, csrc/cpu/*.cpp always;
csrc/cuda/*.cpp and csrc/cuda/*.cu in CUDA builds.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else /usr/local/cuda, else the nvcc on PATH: the first that is a
    toolkit (bin/nvcc and include/cuda_runtime.h: an nvcc wrapper script in /usr/local/bin does
    not make /usr/local one)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))

    def toolkit(c):
        return (Path(c) / "bin" / "nvcc").is_file() and \
            (Path(c) / "include" / "cuda_runtime.h").is_file()

    found = next((c for c in candidates if c and toolkit(c)), None)
    for name in ("CUDA_HOME", "CUDA_PATH"):  # a toolkit asked for by name that is none: say so
        asked = os.environ.get(name)
        if asked and not toolkit(asked):
            print(f"normfuse: WARNING: {name}={asked} is not a CUDA toolkit (no bin/nvcc and "
                  f"include/cuda_runtime.h there); using {found or 'none'}", file=sys.stderr)
            break
    return found


def toolkit_cuda_major(cuda_home: str) -> int | None:
    """The toolkit's CUDA major version (``CUDA_VERSION`` in include/cuda.h), or None."""
    try:
        text = (Path(cuda_home) / "include" / "cuda.h").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^#define\s+CUDA_VERSION\s+(\d+)", text, re.M)
    return int(m.group(1)) // 1000 if m else None


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


def supported_torch() -> str:
    """The supported torch range, from pyproject.toml ([tool.normfuse] torch = "...")."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^\[tool\.normfuse\][^\[]*?^torch\s*=\s*"([^"]+)"', text, re.M | re.S)
    if not m:
        sys.exit("pyproject.toml: [tool.normfuse] torch = \"<range>\" is missing")
    return m.group(1)


def check_torch_version(version: str, spec: str) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    base = Version(version).base_version  # "2.14.1+cu130" -> "2.14.1"
    if Version(base) in SpecifierSet(spec):
        return
    msg = (f"normfuse supports torch {spec} (pyproject.toml); this build would compile against "
           f"torch {version}")
    if not env_flag("NORMFUSE_ALLOW_ANY_TORCH"):
        sys.exit(msg + ". Install a supported torch, or set NORMFUSE_ALLOW_ANY_TORCH=1 to try anyway.")
    print("normfuse: WARNING: " + msg, file=sys.stderr)


def build_info_text(torch_version: str, with_cuda: bool, arch_list: str | None,
                    without_cuda_why: str = "") -> str:
    """normfuse/_build_info.py: what normfuse._C was compiled against (read by _extension.py),
    and why the CUDA kernels were left out, if they were."""
    return (
        '"""Generated by setup.py at build time (not tracked): what normfuse._C was built against."""\n'
        f"TORCH_VERSION = {torch_version!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"WITHOUT_CUDA_WHY = {without_cuda_why!r}\n"
    )


def rel_glob(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


cpu_only = env_flag("NORMFUSE_CPU_ONLY")
force_cuda = env_flag("NORMFUSE_FORCE_CUDA")
if cpu_only and force_cuda:
    sys.exit("NORMFUSE_CPU_ONLY and NORMFUSE_FORCE_CUDA are both set")
cuda_home = None if cpu_only else find_cuda_home()
if force_cuda and cuda_home is None:
    sys.exit("NORMFUSE_FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) "
             "found; set CUDA_HOME")
with_cuda = cuda_home is not None
if with_cuda:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported; without it torch guesses.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402

# A toolkit alone does not make a CUDA build: torch must be a CUDA build of the same major
# version (a +cpu torch has no c10_cuda to link; another major fails torch's version check).
without_cuda_why = ("NORMFUSE_CPU_ONLY=1 was set" if cpu_only else
                    "no CUDA toolkit was found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on "
                    "PATH)" if not with_cuda else "")
if with_cuda:
    toolkit_major = toolkit_cuda_major(cuda_home)
    if torch.version.cuda is None:
        without_cuda_why = f"torch {torch.__version__} is a CPU-only build"
    elif toolkit_major is not None and toolkit_major != int(torch.version.cuda.split(".")[0]):
        without_cuda_why = (f"the CUDA toolkit at {cuda_home} is CUDA {toolkit_major}, torch "
                            f"{torch.__version__} was built with CUDA {torch.version.cuda}")
    if without_cuda_why:
        if force_cuda:
            sys.exit(f"NORMFUSE_FORCE_CUDA=1 but {without_cuda_why}")
        print(f"normfuse: building without CUDA kernels: {without_cuda_why}", file=sys.stderr)
        with_cuda, cuda_home = False, None


def installed_torch_version() -> str | None:
    """``torch.__version__`` of the environment pip installs into, asked from inside pip's
    isolated build environment (this interpreter in a subprocess, without the PYTHONPATH and
    sitecustomize through which pip hides that environment's packages; torch/version.py read,
    not imported); None without torch."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    code = ("import importlib.metadata as m, re\n"
            "path = m.distribution('torch').locate_file('torch/version.py')\n"
            "print(re.search(r\"__version__ = '([^']+)'\", open(path).read()).group(1))\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True,
                         text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def check_build_isolation() -> None:
    """A build-isolated ``pip install`` builds against a torch pip downloaded (the newest in
    range), and the extension then fits exactly that torch: with another torch installed, pip
    would replace it, or (the same release, another build: +cpu, +cu126...) leave an extension
    that does not load. Stop in both cases, naming both torches; a fresh environment without
    torch, or the very same torch, goes ahead. Only pip's isolation is recognised (uv builds
    where the installed torch cannot be seen)."""
    if "pip-build-env-" not in torch.__file__ or env_flag("NORMFUSE_ALLOW_BUILD_ISOLATION"):
        return
    built, installed = torch.__version__, installed_torch_version()
    if installed is None or installed == built:
        return
    release = built.split("+")[0]
    why = (f"the extension would not load under your torch {installed} (same release, another "
           f"build)" if installed.split("+")[0] == release else
           f"the install would require torch=={release} and pip would replace your torch "
           f"{installed} with it")
    sys.exit(f"normfuse: pip's isolated build environment downloaded torch {built} to build "
             f"against: {why}. Build against your torch instead: `pip install "
             "--no-build-isolation <normfuse>` (with setuptools, wheel and ninja installed); "
             "or set NORMFUSE_ALLOW_BUILD_ISOLATION=1 to go ahead (e.g. `pip wheel` for "
             "another machine).")


check_build_isolation()
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    gpu_visible = False
    try:
        gpu_visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a broken driver counts as no GPU
        gpu_visible = False
    if not gpu_visible:
        # +PTX: compute_90 PTX as well, which the driver JIT-compiles on newer GPUs (Blackwell
        # sm_100 / sm_120) instead of failing there with "no kernel image is available".
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

check_torch_version(torch.__version__, supported_torch())
BUILD_INFO = build_info_text(torch.__version__, with_cuda,
                             os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
                             without_cuda_why)


class BuildExtensionWithRecord(BuildExtension.with_options(use_ninja=True)):
    """build_ext that writes normfuse/_build_info.py beside the _C it built: into the build
    directory (what a wheel is made from) and, for an in-place or editable build, into the source
    tree. Only a build writes it: written whenever setup.py ran (an sdist, `setup.py --version`),
    it stamped the checkout with whatever torch that run imported, so an editable _C was refused
    under its own torch, or loaded under another."""

    def run(self):
        super().run()
        targets = [Path(self.build_lib) / "normfuse" / "_build_info.py"]
        if self.inplace or getattr(self, "editable_mode", False):
            targets.append(ROOT / "normfuse" / "_build_info.py")
        for path in targets:
            if path.parent.is_dir() and (not path.exists() or path.read_text() != BUILD_INFO):
                path.write_text(BUILD_INFO)


sources = rel_glob("csrc/*.cpp") + rel_glob("csrc/common/*.cpp") + rel_glob("csrc/cpu/*.cpp")
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers; without the
# flag it silently runs on one thread.
cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
# Python's CFLAGS carry -g: debug information made _C 58 MB, 45 of them DWARF that a user's
# install never reads (function symbols stay for profilers and backtraces). Last -g wins.
if not env_flag("NORMFUSE_DEBUG_INFO"):
    cxx_flags.append("-g0")
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
    # The compiled extension works only with the torch it was built against (pyproject.toml says
    # "dependencies" are dynamic for this reason; the supported range is [tool.normfuse] torch).
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
    packages=find_packages(include=["normfuse", "normfuse.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtensionWithRecord},
    zip_safe=False,
)
