"""Build and run CPU-shim drivers (tests/cuda_shim) under ThreadSanitizer / AddressSanitizer.

Used by tests/csrc/test_cuda_shim_*.py and available to any kernel test:

    from shim_build import build_driver, run_driver      # tests/cuda_shim on sys.path
    exe = build_driver([DRIVERS / "my_driver.cpp"], "thread")
    out = run_driver(exe, ["cases.txt"], "thread")       # fails on any sanitizer report

Binaries are cached under build/cuda_shim/<hash>/, the hash covering the driver sources, every
header under csrc/kernels, csrc/common and tests/cuda_shim, the flags and the compiler version,
so a rerun without changes costs nothing. Builds go to a temporary name and are renamed into
place, so concurrent test runs in one checkout do not trip over each other.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = ROOT / "tests" / "cuda_shim"
DRIVERS = SHIM_DIR / "drivers"
BUILD_DIR = Path(os.environ.get("NORMFUSE_SHIM_BUILD_DIR", ROOT / "build" / "cuda_shim"))
CXX = os.environ.get("CXX", "g++")

SANITIZER_FLAGS = {
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-fsanitize-address-use-after-scope"],
    "none": [],
}
# -g1: line tables and function names, all a sanitizer report prints (file:line of each frame);
# full -g costs ~40% more compile time for variable info nobody reads here.
BASE_FLAGS = ["-std=c++20", "-O1", "-g1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Wno-tsan"]
# halt at the first report: the tests only need to know whether there was one, and a racy
# kernel would otherwise print hundreds of them.
SANITIZER_ENV = {
    "thread": {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"},
    "address": {"ASAN_OPTIONS": "halt_on_error=1 exitcode=66 detect_leaks=1 abort_on_error=0"},
    "none": {},
}
REPORT_MARKERS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer")


def compiler_available() -> bool:
    return shutil.which(CXX) is not None


def _dependency_files() -> list[Path]:
    files: list[Path] = []
    for d in (ROOT / "csrc" / "kernels", ROOT / "csrc" / "common", SHIM_DIR):
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix in (".h", ".cuh", ".hpp", ".cpp"):
                files.append(p)
    return files


def _compiler_version() -> str:
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_driver(sources, sanitizer: str = "address", extra_flags=(), name: str | None = None) -> Path:
    """Compile `sources` (paths) with the shim on the include path; return the cached executable."""
    sources = [Path(s).resolve() for s in sources]
    flags = BASE_FLAGS + SANITIZER_FLAGS[sanitizer] + list(extra_flags)
    flags += ["-I", str(ROOT / "csrc"), "-I", str(SHIM_DIR)]
    h = hashlib.sha256()
    for p in sorted(set(sources) | set(_dependency_files())):
        h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p).encode())
        h.update(p.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(_compiler_version().encode())
    name = name or sources[0].stem
    out_dir = BUILD_DIR / h.hexdigest()[:16]
    exe = out_dir / f"{name}_{sanitizer}"
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=exe.name + ".", dir=out_dir)
    os.close(fd)
    cmd = [CXX, *flags, *map(str, sources), "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"shim build failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    os.replace(tmp, exe)
    return exe


def run_driver(exe: Path, args, sanitizer: str, expect_clean: bool = True, timeout: float = 300,
               env: dict | None = None):
    """Run a driver (``env``: extra environment variables); with expect_clean, raise AssertionError
    on a non-zero exit or any sanitizer report."""
    env = {**os.environ, **SANITIZER_ENV[sanitizer], **(env or {})}
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if expect_clean:
        reports = [m for m in REPORT_MARKERS if m in res.stderr]
        assert res.returncode == 0 and not reports, (
            f"{exe.name} rc={res.returncode} reports={reports}\n{res.stderr[-8000:]}"
        )
    return res
