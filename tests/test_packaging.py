"""The sdist and the wheel carry what the build and the run need (CI only tests an editable
install from the repository root, where a missing file never shows).

No build: MANIFEST.in is applied the way ``setup.py sdist`` applies it (setuptools' own FileList,
after the package modules sdist adds by default), and setup.py's source globs and package list
are read from its text.  Under a second each.
"""
from __future__ import annotations

import importlib.machinery
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = (ROOT / "setup.py").read_text()

# Tracked on purpose but not shipped in the sdist (MANIFEST.in prunes them: measured results
# and their plots, megabytes a build does not need).
NOT_SHIPPED = ("bench/results/", ".gitignore")


def sdist_files() -> set[str]:
    """The files ``setup.py sdist`` would pack: what its defaults add (setup.py, pyproject.toml,
    MANIFEST.in and the package modules, the generated normfuse/_build_info.py among them, as a
    build leaves it in the source tree), then MANIFEST.in's lines in order."""
    from setuptools._distutils.filelist import FileList

    fl = FileList()
    fl.allfiles = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        rel = Path(dirpath).relative_to(ROOT)
        fl.allfiles += [str(rel / f) for f in filenames]
    fl.files = sorted({str(p.relative_to(ROOT)) for p in (ROOT / "normfuse").rglob("*.py")}
                      | {"normfuse/_build_info.py", "setup.py", "pyproject.toml", "MANIFEST.in"})
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            fl.process_template_line(line)
    return set(fl.files)


def compiled_sources() -> list[Path]:
    """Every file setup.py compiles, CUDA builds' included (its rel_glob patterns)."""
    patterns = re.findall(r'rel_glob\("([^"]+)"\)', SETUP)
    assert any(p.endswith(".cu") for p in patterns), patterns
    return sorted(p for pattern in patterns for p in ROOT.glob(pattern))


def local_includes(path: Path) -> set[Path]:
    """The project's files ``path`` includes (``#include "..."``), recursively: resolved next to
    the including file, else under csrc/ (setup.py's include dir)."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        f = todo.pop()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read_text(), re.M):
            for base in (f.parent, ROOT / "csrc"):
                cand = (base / name).resolve()
                if cand.is_file():
                    if cand not in seen:
                        seen.add(cand)
                        todo.append(cand)
                    break
            else:
                pytest.fail(f"{f.relative_to(ROOT)} includes \"{name}\", found neither next to "
                            "it nor under csrc/")
    return seen


def test_sdist_holds_every_compiled_source_and_what_it_includes():
    shipped = sdist_files()
    needed = set(compiled_sources())
    for src in list(needed):
        needed |= local_includes(src)
    missing = sorted(str(p.relative_to(ROOT)) for p in needed
                     if str(p.relative_to(ROOT)) not in shipped)
    assert not missing, f"MANIFEST.in leaves out files the build needs: {missing}"


def test_sdist_holds_every_tracked_file():
    """The sdist is a whole source release (tests, bench, .ci, docs, examples, scripts): what
    git tracks ships, but for the measured results."""
    try:
        res = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git is not available")
    if res.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist?)")
    shipped = sdist_files()
    missing = [f for f in res.stdout.splitlines()
               if f not in shipped and not f.startswith(NOT_SHIPPED)]
    assert not missing, f"tracked files the sdist leaves out (MANIFEST.in): {missing}"


def test_sdist_leaves_out_the_generated_build_record():
    """normfuse/_build_info.py records the torch / CUDA of one build; from an sdist it is that of
    the machine that packed it, and an unpacked sdist's normfuse/ then reports an extension it
    does not hold. The build writes its own."""
    assert "normfuse/_build_info.py" not in sdist_files()


def test_only_a_build_writes_the_build_record(tmp_path):
    """setup.py run without building (an sdist, ``setup.py --version``) leaves
    normfuse/_build_info.py alone: it used to rewrite it with the torch and flags that run saw,
    so an in-place _C was then refused under its own torch, or loaded under another (found by
    a packaging review). The build_ext command writes it, beside the _C it built."""
    import shutil

    for name in ("setup.py", "pyproject.toml", "MANIFEST.in"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "normfuse", tmp_path / "normfuse",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__", "_build_info.py"))
    record = tmp_path / "normfuse" / "_build_info.py"
    record.write_text("TORCH_VERSION = 'the build that made _C'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path,
                         env=env | {"NORMFUSE_CPU_ONLY": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert record.read_text() == "TORCH_VERSION = 'the build that made _C'\n"
    assert "class BuildExtensionWithRecord" in SETUP and '"build_ext": BuildExtensionWithRecord' in SETUP


def test_setup_packages_every_normfuse_subpackage():
    """setup.py's package list is what the wheel holds: every directory of normfuse/ with Python
    files is a package (an __init__.py, or find_packages skips it) and is listed."""
    from setuptools import find_packages

    include = re.search(r"find_packages\(include=(\[[^\]]*\])\)", SETUP)
    assert include, "setup.py: packages=find_packages(include=[...]) not found"
    listed = set(find_packages(str(ROOT), include=eval(include.group(1))))  # noqa: S307
    dirs = {p.parent for p in (ROOT / "normfuse").rglob("*.py") if "__pycache__" not in p.parts}
    no_init = sorted(str(d.relative_to(ROOT)) for d in dirs if not (d / "__init__.py").is_file())
    assert not no_init, f"directories with Python files but no __init__.py: {no_init}"
    expected = {".".join(d.relative_to(ROOT).parts) for d in dirs}
    assert listed == expected, (listed, expected)
    assert not any(p.split(".")[0] in ("tests", "bench", "examples") for p in listed)


def test_extension_names_the_installed_copy_a_source_tree_shadows(tmp_path, monkeypatch):
    """Run from a checkout (or an unpacked sdist) after a non-editable install, ``import
    normfuse`` finds the source tree's normfuse/ first, which has no _C: the reason given must
    point at that, not at a missing build."""
    from normfuse import _extension

    site = tmp_path / "site-packages"
    (site / "normfuse").mkdir(parents=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (site / "normfuse" / f"_C{suffix}").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(ROOT), str(tmp_path / "nothing"), str(site)])
    assert _extension._shadowed_install(ROOT / "normfuse") == str(site / "normfuse")
    monkeypatch.setattr(sys, "path", [str(ROOT)])
    assert _extension._shadowed_install(ROOT / "normfuse") == ""
